"""A griffe extension that renders porder's numpydoc docstrings as they are written.

porder's docstrings follow numpydoc, with Sphinx's roles and reST literal blocks
(STYLE.md). mkdocstrings renders docstrings as Markdown, so at build time, and only
in the documentation (the code is not changed), this extension:

- turns a role (``:func:`porder.reorder```, ``:class:`~porder.nn.PatchReorder```,
  ``:mod:`.pickles```) into a cross-reference. A name that griffe resolves links to
  its entry where the API reference shows it, and is plain code otherwise. A name
  that resolves to nothing stays a required reference, so ``mkdocs build --strict``
  fails on a stale name in a rendered docstring;
- turns a reST literal block (a paragraph ending in ``::`` and the indented block
  after it) into a fenced code block;
- writes a parameter's choices ``{'a', 'b'}`` as ``'a' | 'b'``: griffe would take
  the first choice for the default (numpydoc's convention), which is not always
  porder's, so the default shown is the signature's;
- splits an entry that documents several parameters at once (``mean, std : ...``)
  into one entry per name, so that each shows its own default;
- keeps a type written in words (``path-like``, ``uint8 array (N, S, S, C)``) as
  the words: griffe would read it as a Python expression (``path - like``).

mkdocs.yml names this file in the mkdocstrings options (``extensions``).
"""
from __future__ import annotations

import html
import re

import griffe

ROLE = re.compile(r":(?:py:)?(func|class|mod|data|attr|meth|exc|obj|const):`(~?)([^`<>]+)`")
CALLABLE_ROLES = ("func", "class", "meth", "exc", "data", "attr", "obj", "const")


_ONE_TYPE = r"(?:[A-Za-z_][\w.]*(?:\[[\w., \[\]|]*\])?|'[^']*')"   # a dotted name[...] or a literal
TYPE_LIKE = re.compile(rf"{_ONE_TYPE}(?:\s*\|\s*{_ONE_TYPE})*")


def _words_stay_words() -> None:
    """Let griffe read only type expressions in a docstring's types, words as words."""
    try:
        from griffe._internal.docstrings import numpy as numpy_parser
    except ImportError:  # griffe moved it: types written in words render as expressions
        return
    parse = numpy_parser.parse_docstring_annotation
    if getattr(parse, "porder_words", False):
        return

    def parse_types_only(annotation, docstring, *args, **kwargs):
        if TYPE_LIKE.fullmatch(annotation.strip()):
            return parse(annotation, docstring, *args, **kwargs)
        return annotation

    parse_types_only.porder_words = True
    numpy_parser.parse_docstring_annotation = parse_types_only


_words_stay_words()


class PorderDocstrings(griffe.Extension):
    """Rewrite every docstring of the package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        seen: set[int] = set()
        for obj in _walk(pkg, set()):
            doc = obj.docstring
            if doc is None or id(doc) in seen:
                continue
            seen.add(id(doc))
            doc.value = _literal_blocks(_roles(_entries(doc.value), obj, pkg))


def _walk(obj, visited: set[str]):
    if obj.path in visited:
        return
    visited.add(obj.path)
    yield obj
    for member in list(obj.members.values()):
        if member.is_alias:
            continue
        yield from _walk(member, visited)


def _lookup(pkg: griffe.Module, path: str):
    """The object at a full dotted path inside the package, or None."""
    if path == pkg.path:
        return pkg
    if not path.startswith(pkg.path + "."):
        return None
    try:
        return pkg[path[len(pkg.path) + 1:]]
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _resolve(name: str, obj, pkg: griffe.Module) -> str | None:
    """The full path a role's name stands for in the scope of ``obj``, or None."""
    if name.startswith("."):  # relative to the current package, as Sphinx reads it
        module = obj if obj.is_module else obj.module
        base = module.path if module.is_package else module.path.rpartition(".")[0]
        stripped = name.lstrip(".")
        for _ in range(len(name) - len(stripped) - 1):
            base = base.rpartition(".")[0]
        candidates = [f"{base}.{stripped}"]
    elif name == pkg.path or name.startswith(pkg.path + "."):
        candidates = [name]
    else:
        candidates = []
        try:
            candidates.append(obj.resolve(name))
        except Exception:  # noqa: BLE001 - griffe raises several kinds; any means "not in scope"
            pass
        module = obj if obj.is_module else obj.module
        candidates.append(f"{module.path}.{name}")
        if obj.parent is not None and obj.parent.is_class:
            candidates.append(f"{obj.parent.path}.{name}")
    for path in candidates:
        if _lookup(pkg, path) is not None:
            return path
    return None


def _roles(text: str, obj, pkg: griffe.Module) -> str:
    def replace(m: re.Match) -> str:
        role, tilde, name = m.groups()
        shown = name.rsplit(".", 1)[-1] if tilde else name
        path = _resolve(name, obj, pkg)
        if path is None:
            if name.startswith("porder") or "." not in name:
                return f"[`{shown}`][{name}]"  # a stale name: fails --strict where rendered
            return f"`{shown}`"  # another package's name (torch.utils.data.Dataset, ...)
        target = _lookup(pkg, path)
        # porder.reorder is both a module and the function the package re-exports:
        # griffe keeps the module; a function role means the function.
        if role in CALLABLE_ROLES and target is not None and target.is_module:
            short = path.rsplit(".", 1)[-1]
            if short in target.members:
                path = f"{path}.{short}"
        code = f"<code>{html.escape(shown)}</code>"
        return f'<autoref identifier="{html.escape(path)}" optional>{code}</autoref>'

    return ROLE.sub(replace, text)


SECTIONS_WITH_NAMES = ("parameters", "other parameters", "attributes")
SECTIONS_WITH_TYPES = SECTIONS_WITH_NAMES + ("returns", "yields", "receives", "raises", "warns")
ENTRY = re.compile(r"^(?P<names>[A-Za-z_*][\w*]*(?:, [A-Za-z_*][\w*]*)*)(?P<type> : .*)?$")


def _entries(text: str) -> str:
    """One entry per name, choices as a union, and roles in a type line as plain names."""
    lines = text.splitlines()
    out: list[str] = []
    section = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if line.strip() and re.fullmatch(r"-{3,}", nxt.strip()) and not line.startswith(" "):
            section = line.strip().lower()
            out += [line, nxt]
            i += 2
            continue
        m = ENTRY.match(line) if section in SECTIONS_WITH_TYPES else None
        if m is None:
            out.append(line)
            i += 1
            continue
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or lines[j].startswith(" ")):
            j += 1
        body = lines[i + 1:j]
        kind = m.group("type") or ""
        kind = re.sub(r"\{([^{}]+)\}", lambda c: " | ".join(x.strip() for x in c.group(1).split(",")),
                      kind)
        kind = ROLE.sub(lambda r: r.group(3).rsplit(".", 1)[-1] if r.group(2) else r.group(3), kind)
        names = m.group("names").split(", ") if section in SECTIONS_WITH_NAMES else [m.group("names")]
        for name in names:
            out.append(name + kind)
            out += body
        i = j
    return "\n".join(out)


def _literal_blocks(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.rstrip().endswith("::"):
            out.append(line)
            i += 1
            continue
        stripped = line.rstrip()[:-2].rstrip()
        if stripped:
            out.append(stripped + ":")
        indent = len(line) - len(line.lstrip())
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        block: list[str] = []
        while j < len(lines) and (not lines[j].strip()
                                  or len(lines[j]) - len(lines[j].lstrip()) > indent):
            block.append(lines[j])
            j += 1
        while block and not block[-1].strip():
            block.pop()
        if not block:
            i += 1
            continue
        inner = min(len(b) - len(b.lstrip()) for b in block if b.strip())
        lang = _language(block)
        out += ["", " " * indent + f"```{lang}"]
        out += [" " * indent + b[inner:] if b.strip() else "" for b in block]
        out += [" " * indent + "```", ""]
        i = j
    return "\n".join(out)


def _language(block: list[str]) -> str:
    text = "\n".join(block)
    if re.search(r"^\s*\[[\w.\-\"]+\]\s*$", text, re.M):
        return "toml"
    if re.search(r"^\s*(import |from |def |class )|\w+\(.*\)", text, re.M):
        return "python"
    return "text"

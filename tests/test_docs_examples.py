"""The documentation is true: every example runs, every option exists (issue 19).

- Every ```python block of README.md and docs/*.md runs as a script of its own, in a
  fresh process, in a temporary folder that holds ``demo.h5`` (a small MI cache, as
  ``porder reorder -m mi -p 8 synthetic:200 demo.h5`` writes it). A block that needs a
  GPU or large data is marked by an HTML comment just before it,
  ``<!-- skip: needs a GPU -->``, and is reported as skipped with that reason.
- A block that makes a ``DataLoader`` uses worker processes started by ``spawn``, so an
  example that could not run on macOS, Windows or Python 3.14's Linux (a lambda
  transform, code outside ``if __name__ == "__main__":``) fails here.
- Every ``porder COMMAND --option`` the docs show, in code blocks and inline code, is an
  option in that command's ``--help``.
- Every test that docs/promises.md names exists.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
from click.testing import CliRunner

from porder.cli import main
from porder.pipeline import CacheSpec, build_cache

from .conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ ]*$",
                   re.M | re.S)
SKIP = re.compile(r"<!--\s*skip:\s*(?P<reason>.+?)\s*-->")
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
EXAMPLE_SECONDS = 180      # one example, on a loaded machine (a few seconds on a quiet one)


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _blocks(path: Path):
    """(lang, line, body, skip reason or None) of every fenced block of a Markdown file."""
    text = path.read_text(encoding="utf-8")
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip().rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        indent = len(m.group("indent"))
        body = "\n".join(ln[indent:] for ln in m.group("body").splitlines())
        yield m.group("lang").lower(), line, body, skip.group("reason") if skip else None


def _python_examples():
    for path in DOCS:
        for lang, line, body, reason in _blocks(path):
            if lang in ("python", "py"):
                marks = [pytest.mark.skip(reason=reason)] if reason else []
                yield pytest.param(body, id=f"{_rel(path)}:{line}", marks=marks)


PYTHON_EXAMPLES = list(_python_examples())


def test_the_docs_have_python_examples():
    assert len(PYTHON_EXAMPLES) >= 8, [p.id for p in PYTHON_EXAMPLES]
    assert any(p.id.startswith("README.md:") for p in PYTHON_EXAMPLES)


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory) -> Path:
    """demo.h5: what `porder reorder -m mi -p 8 synthetic:200 demo.h5` writes."""
    out = tmp_path_factory.mktemp("docs-cache") / "demo.h5"
    return build_cache(CacheSpec("synthetic:200", out, measure="mi", patch=8)).path


@pytest.mark.parametrize("code", PYTHON_EXAMPLES)
def test_python_example_runs(code, demo_cache, tmp_path):
    shutil.copy(demo_cache, tmp_path / "demo.h5")
    (tmp_path / "example.py").write_text(code + "\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=EXAMPLE_SECONDS)
    assert proc.returncode == 0, f"the example failed:\n{code}\n--- stderr ---\n{proc.stderr}"


def test_dataloader_examples_use_spawned_workers():
    """A DataLoader example must run where workers are spawned: num_workers > 0 and
    multiprocessing_context="spawn", so that the example test above catches a lambda."""
    seen = 0
    for path in DOCS:
        for lang, line, body, _ in _blocks(path):
            if lang not in ("python", "py") or "DataLoader(" not in body:
                continue
            seen += 1
            where = f"{_rel(path)}:{line}"
            workers = re.findall(r"num_workers\s*=\s*(\d+)", body)
            assert workers and all(int(w) > 0 for w in workers), f"{where}: num_workers > 0"
            assert re.search(r"multiprocessing_context\s*=\s*['\"]spawn['\"]", body), \
                f'{where}: multiprocessing_context="spawn"'
    assert seen, "no DataLoader example found"


# ------------------------------------------------------------------ options in the docs
@lru_cache(maxsize=None)
def _help_options(command: str | None) -> frozenset[str]:
    """Every option string in `porder [COMMAND] --help`'s Options section."""
    args = [command, "--help"] if command else ["--help"]
    res = CliRunner().invoke(main, args, prog_name="porder")
    assert res.exit_code == 0, res.output
    options, inside = set(), False
    for line in res.output.splitlines():
        if line.strip() == "Options:":
            inside = True
            continue
        if inside and line and not line.startswith(" "):
            inside = False
        if inside and line.lstrip().startswith("-"):
            column = re.split(r"\s{2,}", line.strip())[0]
            options.update(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", column))
    return frozenset(options)


PORDER = re.compile(r"(?<![\w.-])porder(?=[ \t])")
STOP = ("#", "|", ";", "&&", "||", ">", "<", "2>")
COMMAND_SPAN = re.compile(r"(?:\S*/)?porder\s|(?:python3?|torchrun)\s.*-m porder\s")


def _porder_commands(text: str):
    """(command or None, [option, ...]) for every `porder ...` command line in text."""
    for m in PORDER.finditer(text):
        words = text[m.end():].split()
        if not words:
            continue
        for i, w in enumerate(words):
            if w.startswith(STOP) or (i and w.startswith(("`", '"', "'", ")"))):
                words = words[:i]
                break
        words = [w.rstrip("\"',;)`") for w in words]
        if not words or not words[0]:
            continue
        if words[0].startswith("-"):
            yield None, [w.split("=")[0] for w in words if w.startswith("-")]
        elif re.fullmatch(r"[a-z][a-z-]*", words[0]):
            yield words[0], [w.split("=")[0] for w in words[1:] if re.match(r"--?[A-Za-z]", w)]


def _shell_lines(path: Path):
    """(line number, text) of every code line and inline code span that may run porder."""
    text = path.read_text(encoding="utf-8")
    for lang, line, body, _ in _blocks(path):
        if lang in ("python", "py", "toml", "text"):
            continue
        for k, ln in enumerate(body.replace("\\\n", " ").splitlines()):
            if not ln.lstrip().startswith("#"):
                yield line + 1 + k, re.split(r"\s#", ln)[0]      # without a trailing comment
    outside = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for m in INLINE.finditer(outside):
        span = m.group(1).replace("\\|", "|")
        if COMMAND_SPAN.match(span):                  # not a message that names porder
            yield outside.count("\n", 0, m.start()) + 1, span


def test_every_porder_option_in_the_docs_is_in_its_help():
    commands = set(main.commands)
    checked, wrong = 0, []
    for path in DOCS:
        for line, text in _shell_lines(path):
            for command, options in _porder_commands(text):
                where = f"{_rel(path)}:{line}: {text.strip()}"
                if command is not None and command not in commands:
                    wrong.append(f"{where}: no command {command!r}")
                    continue
                known = _help_options(command)
                wrong += [f"{where}: {opt} is not in `porder {command or ''} --help`"
                          for opt in options if opt not in known]
                checked += 1
    assert not wrong, "\n".join(wrong)
    assert checked > 50, checked


# ------------------------------------------------------------------ promises name real tests
def test_every_test_named_in_the_promises_exists():
    text = (REPO / "docs" / "promises.md").read_text(encoding="utf-8")
    paragraphs = [p for p in text.split("\n\n") if p.startswith("**Tests:**")]
    assert len(paragraphs) >= 20, len(paragraphs)
    missing, named = [], 0
    for para in paragraphs:
        current = None
        for token in re.findall(r"`([^`]+)`", para):
            file, _, name = token.partition("::")
            if file.endswith(".py"):
                current = REPO / "tests" / file
                if not current.is_file():
                    missing.append(f"tests/{file}")
                    current = None
                    continue
            elif file.startswith("test_"):
                name = file
            else:
                continue
            if name:
                name = name.split("[")[0]
                named += 1
                if current is None or not re.search(rf"^\s*def {name}\(", current.read_text(),
                                                    re.M):
                    missing.append(f"{token} (in {_rel(current) if current else 'no file'})")
    assert not missing, "named in docs/promises.md but not found:\n" + "\n".join(missing)
    assert named > 60, named


def test_a_skip_comment_marks_the_block_after_it(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Text.\n\n<!-- skip: needs a GPU -->\n```python\nimport cupy\n```\n\n"
                    "```python\nprint(1)\n```\n\n  ```sh\n  porder measures --json\n  ```\n")
    assert list(_blocks(page)) == [("python", 4, "import cupy", "needs a GPU"),
                                   ("python", 8, "print(1)", None),
                                   ("sh", 12, "porder measures --json", None)]

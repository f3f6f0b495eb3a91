"""How the CLI and the sources are layered: what `--help` imports, no import cycle among
the decoders, one definition of what the CLI shares with the library."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest

from ..conftest import REPO

# Run the CLI with ARGS in a fresh interpreter, then print the heavy modules it imported.
_PROBE = """\
import json, sys
from porder.cli import main
try:
    main(args=sys.argv[1:], prog_name="porder")
except SystemExit:
    pass
print(json.dumps(sorted(m for m in ("h5py", "torch") if m in sys.modules)), file=sys.stderr)
"""
HELPS = [["--help"], ["reorder", "--help"], ["train", "--help"], ["compare", "--help"]]


def heavy_imports(args: list[str]) -> list[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO)] + sys.path)}
    res = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=120)
    assert res.returncode == 0 and "Usage:" in res.stdout, res.stderr
    return json.loads(res.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("args", HELPS, ids=" ".join)
def test_help_does_not_import_torch(args):
    assert "torch" not in heavy_imports(args)


@pytest.mark.parametrize("args", HELPS, ids=" ".join)
def test_help_does_not_import_h5py(args):
    assert "h5py" not in heavy_imports(args)


def _sibling_imports(path) -> set[str]:
    """The modules of porder.sources that ``path`` imports (at any depth of the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {a.name for a in node.names}
    return found


def test_pillow_decoding_is_a_leaf_and_the_decoders_have_no_cycle():
    folder = REPO / "porder" / "sources"
    graph = {p.stem: _sibling_imports(p) for p in folder.glob("*.py")}
    assert graph["pillow"] <= {"base", "fastjpeg"}
    for leaf in ("base", "fastjpeg"):
        assert not graph[leaf], leaf

    def reaches(start, goal, seen=()):
        return any(m == goal or (m not in seen and reaches(m, goal, (*seen, m)))
                   for m in graph.get(start, ()))

    for module in graph:
        assert not reaches(module, module), f"porder.sources.{module} imports itself back"


def test_cli_and_library_share_one_definition():
    import porder.cli.train as cli_train
    import porder.train.config as config
    import porder.train.fm as fm
    import porder.trainspec as spec
    from porder.train.models import MODELS

    assert tuple(MODELS) == spec.ARCHS
    assert cli_train.ARCHS is spec.ARCHS and cli_train.FM_POINTS_HELP is spec.FM_POINTS_HELP
    assert cli_train.MAX_WIDTH is config.MAX_WIDTH is spec.MAX_WIDTH
    assert config.DEVICES is spec.DEVICES and fm.FM_POINTS is config.FM_POINTS is spec.FM_POINTS
    assert fm.parse_fm_spec is spec.parse_fm_spec


def test_train_and_compare_declare_their_shared_options_once():
    from porder.cli import main
    from porder.cli.train import SHARED_OPTIONS

    for name, (flags, attrs) in SHARED_OPTIONS.items():
        types = []
        for command in ("train", "compare"):
            option = next(p for p in main.commands[command].params if p.name == name)
            assert option.opts + option.secondary_opts == [
                f for flag in flags for f in flag.split("/")], (command, name)
            types.append(option.type)
        if "type" in attrs:
            assert types[0] is types[1] is attrs["type"], name

"""`porder export` end to end through the CLI (the library is tested in tests/test_export.py)."""
from __future__ import annotations

import numpy as np
from click.testing import CliRunner
from PIL import Image

from porder.cli import main
from porder.store import read_split


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_export_imagefolder_and_npz_round_trip(tmp_path):
    cache = tmp_path / "c.h5"
    assert invoke("reorder", "-m", "mi", "-p", "8", "--no-progress", "synthetic:40:3",
                  cache).exit_code == 0
    res = invoke("export", cache, tmp_path / "png", "--no-progress")
    assert res.exit_code == 0, res.output
    assert "Wrote" in res.output and "imagefolder" in res.output
    train = read_split(cache, "train")
    pngs = sorted((tmp_path / "png" / "train").rglob("*.png"))
    assert len(pngs) == len(train["labels"])
    res = invoke("export", cache, tmp_path / "npz", "--format", "npz", "--split", "test",
                 "--restore", "--no-progress")
    assert res.exit_code == 0, res.output
    z = np.load(tmp_path / "npz" / "test.npz")
    test = read_split(cache, "test")
    assert np.array_equal(z["labels"], test["labels"])
    first = np.asarray(Image.open(pngs[0]).convert("RGB"))
    assert first.shape == train["images"].shape[1:]


def test_export_refuses_a_foreign_folder(tmp_path):
    cache = tmp_path / "c.h5"
    assert invoke("reorder", "-m", "none", "--no-progress", "synthetic:10", cache).exit_code == 0
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    res = invoke("export", cache, out, "--overwrite", "--no-progress")
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1].startswith("Error: ")
    assert (out / "precious.txt").read_text() == "keep"


def test_reorder_backends_write_identical_files(tmp_path):
    """`--backend compiled` (the default) and `--backend generic` give the same file."""
    files = {}
    for backend in ("compiled", "generic"):
        files[backend] = tmp_path / f"{backend}.h5"
        res = invoke("reorder", "-m", "mi", "-p", "4", "--backend", backend, "--no-progress",
                     "synthetic:60:3", files[backend])
        assert res.exit_code == 0, res.output
    for split in ("train", "test"):
        a, b = read_split(files["compiled"], split), read_split(files["generic"], split)
        assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["perm"], b["perm"])
    res = invoke("reorder", "--backend", "fast", "synthetic:10", tmp_path / "x.h5")
    assert res.exit_code == 2 and "--backend" in res.output

"""`--json` on every command that produces a result: one JSON document on stdout (the schemas
of docs/cli-grammar.md), progress and messages on stderr only."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from porder.cli import main
from porder.store import read_meta


def run_json(*args):
    res = CliRunner().invoke(main, [*map(str, args), "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout), res  # stdout holds the JSON document alone


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Two shards and a whole file of synthetic:40:2 (reordered by mi at patch 8)."""
    tmp = tmp_path_factory.mktemp("json")
    out = {}
    for i in range(2):
        out[i] = run_json("reorder", "--no-progress", "--shard", f"{i}/2", "synthetic:40:2",
                          tmp / f"s{i}.h5")[0]
    out["whole"], out["res"] = run_json("reorder", "--no-progress", "synthetic:40:2",
                                        tmp / "whole.h5")
    out["tmp"] = tmp
    return out


def test_reorder(made):
    r, res = made["whole"], made["res"]
    assert set(r) == {"path", "rows", "skipped", "processed", "resumed", "seconds",
                      "images_per_s", "compile_seconds", "stages", "options"}
    assert r["rows"] == {"train": 36, "test": 4} == read_meta(r["path"])["splits"]
    assert r["skipped"] == {"train": 0, "test": 0} and r["processed"] == 40
    assert r["resumed"] is False and r["images_per_s"] > 0
    assert r["options"]["measure"] == "mi" and r["options"]["source"] == "synthetic:40:2"
    assert "train: 36/36 images" in res.stderr and "Wrote" not in res.output


def test_merge(made):
    tmp = made["tmp"]
    r, _ = run_json("merge", "--no-progress", made[0]["path"], made[1]["path"],
                    tmp / "merged.h5")
    assert set(r) == {"path", "rows", "skipped", "shards", "copy"}
    assert r["rows"] == made["whole"]["rows"] and r["copy"] is False
    assert r["shards"] == [made[0]["path"], made[1]["path"]]


def test_export_show_inspect(made):
    tmp, whole = made["tmp"], made["whole"]["path"]
    r, _ = run_json("export", "--no-progress", whole, tmp / "npz", "--format", "npz")
    assert set(r) == {"path", "format", "restored", "splits", "record"}
    assert r["format"] == "npz" and r["splits"] == {"train": 36, "test": 4}
    assert json.loads(open(r["record"]).read())["splits"] == r["splits"]
    r, res = run_json("show", whole, "-o", tmp / "g.png", "-n", "3")
    assert set(r) == {"path", "file", "split", "samples", "start", "scale", "width", "height"}
    assert r["samples"] == 3 and r["width"] > 0 and "Wrote" not in res.output
    r, _ = run_json("inspect", whole)
    assert r["splits"] == {"train": 36, "test": 4} and r["measure"] == "mi"


def test_measures_is_a_list():
    r, _ = run_json("measures")
    assert isinstance(r, list) and {"mi", "none"} <= {m["name"] for m in r}
    assert set(r[0]) == {"name", "kind", "direction", "origin", "summary"}


def test_train(made):
    tmp = made["tmp"]
    r, res = run_json("train", made["whole"]["path"], "--steps", "2", "--eval-every", "1",
                      "-b", "4", "--width", "0.0625", "--device", "cpu", "-j", "1",
                      "--no-progress", "-o", tmp / "run")
    assert set(r) == {"out", "file", "arch", "device", "world_size", "resumed_from", "step",
                      "final", "seconds", "compile_seconds", "files"}
    assert r["step"] == 2 and r["final"]["step"] == 2 and r["device"] == "cpu"
    assert 0 <= r["final"]["test_acc"] <= 1 and r["world_size"] == 1
    for name, path in r["files"].items():
        assert path.endswith(name) and (tmp / "run" / name).is_file()
    assert "vgg: step 1/2" in res.stderr


def test_compare_dry_run_and_run(tmp_path):
    args = ["compare", "synthetic:40:2", "-o", tmp_path / "c", "-m", "none", "--seeds", "1",
            "-a", "vgg", "--width", "0.0625", "--steps", "2", "--eval-every", "1", "-b", "8",
            "--size", "16", "--device", "cpu", "-j", "1", "--no-progress"]
    plan, _ = run_json(*args, "--dry-run")
    assert plan["dry_run"] is True and plan["conflicts"] == 0
    assert [c["state"] for c in plan["caches"]] == ["build"]
    assert [(x["arch"], x["measure"], x["seed"], x["state"]) for x in plan["runs"]] == [
        ("vgg", "none", 0, "new")]
    assert plan["settings"]["steps"] == 2 and plan["seconds_left"] > 0
    r, res = run_json(*args)
    assert r["dry_run"] is False and r["summary"].endswith("summary.md")
    assert len(r["runs"]) == 1 and r["runs"][0]["steps"] == 2
    assert {"csv", "md"} <= {f.rsplit(".", 1)[-1] for f in r["files"]}
    assert "# " not in res.stdout.split("{", 1)[0]  # not the Markdown summary

"""Run ``porder train --resume`` over mutated run folders and caches (in a subprocess).

``python -m tests.fuzz_resume WORKDIR SEED COUNT`` (from the repository root) writes a
tiny cache, trains a tiny run on it to step 1 of 2 (``--steps 1``, then resumed with
``--steps 2``) and the same run uninterrupted (the reference), then makes COUNT seeded
cases, each in its own folder ``WORKDIR/case-N`` holding a copy of the cache and of
the run folder (with a user's ``notes.txt`` in it), one of them mutated: the checkpoint
truncated, its bytes flipped, a field of it edited, or it deleted; ``metrics.jsonl``,
``config.json`` or ``result.json`` edited, deleted or planted; stray temporary files;
the cache corrupted as tests/fuzz_files.py does, replaced by another valid cache (other
metadata, or the same metadata with other data), or touched.

Every case must end either in exit 0 with a finished run (result.json complete at step
2, the metrics ending at step 2, the checkpoint at step 2; for a mutation that changes
nothing a resume reads, exactly the reference's metrics) or in exit 1/2 with one
``Error:`` line (after progress lines), leaving the checkpoint and metrics as they were.
Whatever the outcome, the cache and the user's file are intact, and no temporary or
lock file is left. A cache whose bytes changed must be refused. It prints one JSON line
per case: {case, what, code, output, seconds, problems}; before each case
{"start": case}. tests/test_fuzz_resume.py runs it and checks the lines.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from click.testing import CliRunner

from porder.cli.train import train as train_cmd

from .fuzz_files import KINDS as CORRUPTIONS
from .fuzz_files import corrupt, emit
from .train.test_train import strip, write_file

ARGS = ["--arch", "resnet", "--width", "0.0625", "--eval-every", "1", "-b", "8",
        "--device", "cpu", "-j", "1", "--no-progress"]
PROGRESS = re.compile(r"^\w+: step \d+/\d+ ")
NEUTRAL = ("config-edit", "result-edit", "stray-files", "cache-touched", "ckpt-delete")
KINDS = ("ckpt-truncate", "ckpt-flip", "ckpt-field", "metrics-edit", "cache-corrupt",
         "cache-other") + NEUTRAL
TEMPORARY = ("checkpoint.pt.tmp", "metrics.jsonl.tmp", "config.json.tmp", "result.json.tmp",
             ".porder.lock")
NOTE = "my notes: do not delete\n"


def run_train(cache: Path, out: Path, steps: int, *extra):
    return CliRunner().invoke(train_cmd, [str(cache), *ARGS, "--steps", str(steps),
                                          "--out", str(out), *extra])


def _ckpt_field(path: Path, rng) -> str:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    how = int(rng.integers(0, 9))
    if how in (3, 4, 5, 6) and not isinstance(ckpt.get("file_state"), dict):
        how = 8                   # a checkpoint without the record (an older porder's)
    if how == 0:
        ckpt["step"] = [0, 2, 3, -1, 1.5, True][int(rng.integers(0, 6))]
        what = f"step {ckpt['step']!r}"
    elif how == 1:
        ckpt["config"]["lr"] = 0.01
        what = "config lr 0.01"
    elif how == 2:
        ckpt["file"]["created"] = "2001-01-01T00:00:00+00:00"
        what = "file created 2001"
    elif how == 3:
        ckpt["file_state"]["sha256"] = "0" * 64
        what = "file_state sha256 zeroed"
    elif how == 4:
        del ckpt["file_state"]
        what = "file_state removed (an older porder's checkpoint)"
    elif how == 5:
        ckpt["file_state"]["size"] += 1
        what = "file_state size + 1"
    elif how == 6:
        ckpt["file_state"] = {"sha256": 5}
        what = "file_state malformed"
    elif how == 7:
        name = sorted(ckpt["model"])[int(rng.integers(0, len(ckpt["model"])))]
        del ckpt["model"][name]
        what = f"model tensor {name} removed"
    else:
        del ckpt["rng"]
        what = "rng removed"
    torch.save(ckpt, path)
    return what


def _metrics_edit(path: Path, rng) -> str:
    lines = path.read_text().splitlines(keepends=True)
    how = int(rng.integers(0, 7))
    if how == 0:
        i = int(rng.integers(0, len(lines)))
        del lines[i]
        what = f"line {i + 1} deleted"
    elif how == 1:
        i = int(rng.integers(0, len(lines)))
        lines.insert(i, lines[i])
        what = f"line {i + 1} repeated"
    elif how == 2:
        lines.append("garbage {\n")
        what = "a garbage line appended"
    elif how == 3:
        text = "".join(lines)
        lines = [text[:int(rng.integers(1, len(text)))]]
        what = "cut mid-file"
    elif how == 4:
        lines = []
        what = "emptied"
    elif how == 5:
        lines = lines[::-1]
        what = "lines reversed"
    else:
        path.unlink()
        return "metrics.jsonl deleted"
    path.write_text("".join(lines))
    return f"metrics.jsonl {what}"


def mutate(kind: str, cache: Path, run: Path, base_cache: Path, rng) -> str:
    """Apply mutation ``kind`` to the case's ``cache`` and ``run``; returns what was done."""
    ckpt = run / "checkpoint.pt"
    if kind == "ckpt-truncate":
        data = ckpt.read_bytes()
        n = int(rng.integers(0, len(data)))
        ckpt.write_bytes(data[:n])
        return f"checkpoint truncated to {n} of {len(data)} bytes"
    if kind == "ckpt-flip":
        data = bytearray(ckpt.read_bytes())
        where = sorted(int(i) for i in rng.integers(0, len(data), int(rng.integers(1, 9))))
        for i in where:
            data[i] ^= int(rng.integers(1, 256))
        ckpt.write_bytes(bytes(data))
        return f"checkpoint bytes flipped at {where}"
    if kind == "ckpt-field":
        return "checkpoint " + _ckpt_field(ckpt, rng)
    if kind == "ckpt-delete":
        ckpt.unlink()
        return "checkpoint deleted (metrics.jsonl kept)"
    if kind == "metrics-edit":
        return _metrics_edit(run / "metrics.jsonl", rng)
    if kind == "config-edit":
        how = int(rng.integers(0, 4))
        p = run / "config.json"
        if how == 0:
            p.unlink()
        else:
            p.write_text(["garbage {", "[1, 2]", json.dumps({"config": {"lr": 0.5}})][how - 1])
        return f"config.json {['deleted', 'garbage', 'a list', 'lr 0.5'][how]}"
    if kind == "result-edit":
        how = int(rng.integers(0, 3))
        p = run / "result.json"
        if how == 0:
            p.unlink()
        else:
            p.write_text(["{not json", json.dumps({"complete": True, "steps": 2})][how - 1])
        return f"result.json {['deleted', 'garbage', 'claims step 2'][how]}"
    if kind == "stray-files":
        for name in TEMPORARY[:3]:
            (run / name).write_bytes(b"\x00junk")
        return "checkpoint.pt.tmp, metrics.jsonl.tmp, config.json.tmp planted"
    if kind == "cache-touched":
        t = int(rng.integers(1, 2**40)) * 1000
        os.utime(cache, ns=(t, t))
        return f"cache touched (mtime {t} ns)"
    if kind == "cache-corrupt":
        how = CORRUPTIONS[int(rng.integers(0, len(CORRUPTIONS)))]
        return f"cache {how}: " + corrupt(base_cache, cache, rng, how)
    if kind == "cache-other":
        if rng.random() < 0.5:
            other = write_file(cache.with_name("other.h5"), seed=int(rng.integers(1, 99)))
            os.replace(other, cache)
            return "cache replaced by another cache (other metadata)"
        with h5py.File(cache, "r+") as f:
            f["train/labels"][...] = 1 - f["train/labels"][()]
        return "cache rewritten in place: the same metadata, other labels"
    raise ValueError(kind)


def _read(p: Path):
    return p.read_bytes() if p.exists() else None


def check(kind: str, res, cache: Path, run: Path, base_cache: Path, before: dict,
          reference: list) -> list[str]:
    """What is wrong with the outcome of a case (an empty list when nothing)."""
    problems = []
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    changed_cache = cache.read_bytes() != base_cache.read_bytes()
    if isinstance(res.exception, Exception) and not isinstance(res.exception, SystemExit):
        return [f"crash {type(res.exception).__name__}: {res.exception}"]
    if "Traceback" in res.output:
        problems.append("traceback")
    if _read(cache) != before["cache"]:
        problems.append("the cache was modified")
    if _read(run / "notes.txt") != NOTE.encode():
        problems.append("the user's notes.txt was changed or deleted")
    left = [n for n in TEMPORARY if (run / n).exists()]
    if left:
        problems.append(f"left {left}")
    if res.exit_code == 0:
        if changed_cache:
            problems.append("a cache whose bytes changed was trained on")
        result = json.loads((run / "result.json").read_text())
        rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in rows]
        ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
        if not (result.get("complete") and result.get("steps") == 2 and ckpt["step"] == 2
                and steps and steps[-1] == 2 and steps == sorted(set(steps))
                and result["final_test_acc"] == rows[-1]["test_acc"]):
            problems.append(f"not a finished run: steps {steps}, result {result}")
        if kind in NEUTRAL and strip(rows) != reference:
            problems.append("metrics differ from the uninterrupted run's")
    elif res.exit_code in (1, 2):
        if not (lines and lines[-1].startswith("Error: ") and len(lines[-1]) < 500
                and all(PROGRESS.match(ln) for ln in lines[:-1])):
            problems.append("not one Error: line (after progress lines)")
        for name in ("checkpoint.pt", "metrics.jsonl"):
            if _read(run / name) != before[name]:
                problems.append(f"{name} changed by a refused resume")
        if kind in NEUTRAL:
            problems.append("refused a resume that should go on")
    else:
        problems.append(f"exit {res.exit_code}")
    return problems


def main_(work: Path, seed: int, count: int) -> None:
    torch.set_num_threads(1)
    base_cache = write_file(work / "base.h5")
    base_run, ref_run = work / "base-run", work / "reference"
    for out, steps in ((base_run, 1), (ref_run, 2)):
        res = run_train(base_cache, out, steps)
        assert res.exit_code == 0, res.output
    reference = strip([json.loads(ln) for ln in
                       (ref_run / "metrics.jsonl").read_text().splitlines()])
    rng = np.random.default_rng(seed)
    for case in range(count):
        kind = KINDS[case % len(KINDS)]
        emit(start=case, kind=kind)
        folder = work / f"case-{case}"
        folder.mkdir()
        cache, run = folder / "cache.h5", folder / "run"
        shutil.copy(base_cache, cache)
        shutil.copytree(base_run, run)
        (run / "notes.txt").write_text(NOTE)
        what = f"{kind}: " + mutate(kind, cache, run, base_cache, rng)
        before = {"cache": _read(cache), "checkpoint.pt": _read(run / "checkpoint.pt"),
                  "metrics.jsonl": _read(run / "metrics.jsonl")}
        t0 = time.perf_counter()
        res = run_train(cache, run, 2, "--resume")
        seconds = time.perf_counter() - t0
        problems = check(kind, res, cache, run, base_cache, before, reference)
        emit(case=case, what=what, code=res.exit_code, output=res.output[-1500:],
             seconds=seconds, problems=problems)
    emit(done=True)


if __name__ == "__main__":
    main_(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))

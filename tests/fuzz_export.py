"""Run ``porder export`` over corrupted caches and hostile output folders (in a subprocess).

``python -m tests.fuzz_export BASE.h5 WORKDIR SEED COUNT`` (from the repository
root) makes COUNT seeded cases, each in its own folder ``WORKDIR/case-N``: half
export a corrupted copy of BASE.h5 (the corruptions of tests/fuzz_files.py) to a
new folder; half export BASE.h5 with random options onto a hostile OUT: a
user's folder, forged, damaged or foreign ``porder-export.json`` records, a
genuine earlier export with a user's file, link, FIFO or edit inside it,
symbolic links to any of those, a file, a missing parent. The user's files
planted there are "sentinels" (path and content).

Every case must end either in exit 0 with OUT holding exactly a correct export
(its record lists what is there; its images, labels and perm are the cache's)
or in exit 1/2 with one ``Error:`` line after progress lines; and whatever the
outcome every sentinel is intact, and nothing in the case's folder changed
beyond OUT's target (nothing left: no hidden ``.part``/``.old`` folders). It
prints one JSON line per case: {case, what, code, output, seconds, problems};
before each case {"start": case}, so that a crash of the process names it.
tests/test_fuzz_export.py runs it and checks the lines.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import sys
import time
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from porder.cli import main
from porder.export import MANIFEST, export
from porder.patches import restore_images
from porder.store import read_meta, read_split

from .fuzz_files import KINDS as CORRUPTIONS
from .fuzz_files import corrupt, emit

PROGRESS = re.compile(r"^\w+: \d+/\d+ images \(")
ODD_NAMES = ["thesis.tex", "a\nb.txt", "\x1b[31mred", "caf\udce9.txt", " lead", "-rf",
             "porder-export.json.bak", "00.png", ".hidden"]


def snapshot(root: Path) -> dict:
    """Every entry under ``root`` (links not followed): kind and content."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                state[str(p)] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                state[str(p)] = ("dir",)
            elif stat.S_ISREG(st.st_mode):
                state[str(p)] = ("file", p.read_bytes())
            else:
                state[str(p)] = ("other", stat.S_IFMT(st.st_mode))
    return state


def plant(path: Path, content: bytes, sentinels: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    sentinels[str(path)] = content


def _mutate_record(rec: dict, rng: np.random.Generator) -> str:
    """One random change to a genuine record; returns what it did."""
    key = str(rng.choice(sorted(rec)))
    how = int(rng.integers(0, 5))
    if how == 0:
        del rec[key]
        return f"deleted {key}"
    if how == 1:
        value = [None, 0, -1, 2**70, "", "x", [], {}, True, 1.5][int(rng.integers(0, 10))]
        rec[key] = value
        return f"set {key} to {value!r}"
    if how == 2 and isinstance(rec.get("files"), dict):
        name = ["thesis.tex", "../outside.txt", "train/../../outside.txt", "/etc/passwd",
                "train/x/00.png", "train.npz", "test/" + "a" * 300 + "/0.png"][
            int(rng.integers(0, 7))]
        rec["files"][name] = 10
        return f"listed {name!r}"
    if how == 3 and isinstance(rec.get("folders"), list) and rec["folders"]:
        value = ["..", ".", "", "a/b", "x\x00y", rec["folders"][-1]][int(rng.integers(0, 6))]
        rec["folders"][0] = value
        return f"folder 0 set to {value!r}"
    rec["record_version"] = int(rng.choice([0, 2, 99]))
    return f"record_version {rec['record_version']}"


def hostile_out(case_dir: Path, base: Path, rng: np.random.Generator, sentinels: dict,
                ) -> tuple[Path, str]:
    """Build a hostile OUT in ``case_dir``; returns (OUT, what it is)."""
    out = case_dir / "out"
    kind = str(rng.choice(["users", "empty-record", "garbage-record", "forged", "intruder",
                           "genuine", "link-genuine", "link-users", "dangling-link", "file",
                           "no-parent", "odd-record-file", "foreign-format", "deleted"]))
    name = ODD_NAMES[int(rng.integers(0, len(ODD_NAMES)))]
    genuine_fmt = str(rng.choice(["imagefolder", "npz"]))
    if kind in ("users", "link-users"):
        target = case_dir / "mine" if kind == "link-users" else out
        target.mkdir()
        plant(target / name, b"keep", sentinels)
        if rng.random() < 0.5:
            plant(target / "sub" / "deep.txt", b"deep", sentinels)
        if kind == "link-users":
            out.symlink_to(target)
        return out, f"{kind} ({name!r})"
    if kind in ("empty-record", "garbage-record"):
        out.mkdir()
        data = b"{}" if kind == "empty-record" else rng.bytes(int(rng.integers(0, 200)))
        (out / MANIFEST).write_bytes(data)
        plant(out / name, b"keep", sentinels)
        return out, f"{kind} + {name!r}"
    if kind == "file":
        plant(out, b"a file", sentinels)
        return out, kind
    if kind == "no-parent":
        return case_dir / "missing" / "out", kind
    if kind == "dangling-link":
        out.symlink_to(case_dir / "elsewhere")
        return out, kind
    # the rest start from a genuine earlier export
    real = case_dir / "real" if kind == "link-genuine" else out
    export(base, real, format=genuine_fmt)
    if kind == "link-genuine":
        out.symlink_to(real)
    what = f"{kind} ({genuine_fmt})"
    rec = json.loads((real / MANIFEST).read_text())
    if kind == "forged":
        what += ": " + _mutate_record(rec, rng)
        (real / MANIFEST).write_text(json.dumps(rec))
        plant(real / name, b"keep", sentinels)
    elif kind == "foreign-format":
        rec["format"] = "npz" if genuine_fmt == "imagefolder" else "imagefolder"
        (real / MANIFEST).write_text(json.dumps(rec))
    elif kind == "odd-record-file":
        m = real / MANIFEST
        m.unlink()
        how = int(rng.integers(0, 3))
        if how == 0:
            m.mkdir()
        elif how == 1:
            os.mkfifo(m)
        else:
            (case_dir / "record.json").write_text(json.dumps(rec))
            m.symlink_to(case_dir / "record.json")
        what += f": record {['a folder', 'a FIFO', 'a link'][how]}"
    elif kind == "deleted":   # a user removed some of porder's files: still porder's
        files = sorted(rec["files"])
        for f in files[: int(rng.integers(1, len(files) + 1))]:
            (real / f).unlink()
    elif kind == "intruder":
        dirs = [""] + rec["dirs"]
        where = dirs[int(rng.integers(0, len(dirs)))]
        spot = real / where / name
        if spot.exists():      # a name porder uses there ("00.png"): the user's is beside it
            spot = spot.with_name(spot.name + "-mine")
        how = int(rng.integers(0, 5))
        if how == 0:
            plant(spot, b"keep", sentinels)
        elif how == 1:
            plant(case_dir / "outside.txt", b"outside", sentinels)
            spot.symlink_to(case_dir / "outside.txt")
        elif how == 2:
            os.mkfifo(spot)
        elif how == 3:
            spot.mkdir()
            plant(spot / "inner.txt", b"inner", sentinels)
        else:   # the user edited one of porder's files: theirs now
            f = real / sorted(rec["files"])[int(rng.integers(0, len(rec["files"])))]
            plant(f, f.read_bytes()[:-1] + b"!edited", sentinels)
            spot = f
        what += f": {['file', 'link', 'FIFO', 'folder', 'edit'][how]} at {spot.relative_to(real)}"
    return out, what


def check_export(out: Path, cache: Path, fmt: str, split, restore: bool) -> list[str]:
    """Problems with a finished export at ``out`` (an empty list when it is correct)."""
    problems = []
    rec = json.loads((out / MANIFEST).read_text())
    listed = set(rec["files"]) | set(rec["dirs"]) | {MANIFEST}
    there = {str(p.relative_to(out)) for p in out.rglob("*")}
    if there != listed:
        problems.append(f"OUT holds {sorted(there ^ listed)[:5]} against its record")
    for f, size in rec["files"].items():
        if (out / f).is_file() and (out / f).stat().st_size != size:
            problems.append(f"{f}: size {(out / f).stat().st_size}, recorded {size}")
    meta = read_meta(cache)
    splits = [split] if split else [s for s in ("train", "test") if s in meta["splits"]]
    if sorted(rec["splits"]) != sorted(splits):
        problems.append(f"splits {sorted(rec['splits'])}, asked {splits}")
    for s in splits:
        want = read_split(cache, s)
        images = restore_images(want["images"], want["perm"], int(meta["patch"])) \
            if restore else want["images"]
        if fmt == "npz":
            with np.load(out / f"{s}.npz", allow_pickle=False) as z:
                got, labels = z["images"], z["labels"]
                if not np.array_equal(z["perm"], want["perm"]):
                    problems.append(f"{s}: perm differs")
        else:
            rows = sorted((int(p.stem), rec["folders"].index(p.parent.name), p)
                          for p in (out / s).rglob("*.png"))
            if [r[0] for r in rows] != list(range(len(want["labels"]))):
                problems.append(f"{s}: rows {[r[0] for r in rows][:5]}...")
                continue
            got = np.stack([np.asarray(Image.open(r[2])) for r in rows]) if rows else \
                np.zeros((0,) + images.shape[1:], np.uint8)
            labels = np.array([r[1] for r in rows], np.int64)
        if not (np.array_equal(got, images) and np.array_equal(labels, want["labels"])):
            problems.append(f"{s}: images or labels differ from the cache's")
    return problems


def run_case(case: int, case_dir: Path, base: Path, rng: np.random.Generator) -> None:
    sentinels: dict[str, bytes] = {}
    if case % 2 == 0:     # a corrupted cache, exported to a new folder
        cache = case_dir / "bad.h5"
        kind = CORRUPTIONS[(case // 2) % len(CORRUPTIONS)]
        what = f"cache {kind}: {corrupt(base, cache, rng, kind)}"
        out, overwrite = case_dir / "out", False
    else:                 # the good cache onto a hostile folder
        cache = base
        out, what = hostile_out(case_dir, base, rng, sentinels)
        overwrite = bool(rng.random() < 0.85)
    fmt = str(rng.choice(["imagefolder", "npz"]))
    split = [None, "train", "test"][int(rng.integers(0, 3))]
    restore = bool(rng.random() < 0.3)
    args = ["export", "--no-progress", "-f", fmt, *(["--split", split] if split else []),
            *(["--restore"] if restore else []), *(["--overwrite"] if overwrite else []),
            str(cache), str(out)]
    target = Path(os.path.realpath(out))
    before = snapshot(case_dir)
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, args)
    seconds = time.perf_counter() - t0
    problems = []
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    if isinstance(res.exception, Exception) and not isinstance(res.exception, SystemExit):
        problems.append(f"crash: {type(res.exception).__name__}: {res.exception}")
    elif res.exit_code not in (0, 1, 2):
        problems.append(f"exit {res.exit_code}")
    elif res.exit_code:
        if not (lines and lines[-1].startswith("Error: ")
                and all(PROGRESS.match(ln) for ln in lines[:-1])):
            problems.append("not one Error: line (after progress lines)")
        after = snapshot(case_dir)
        if after != before:
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            problems.append(f"refused, but changed {changed[:5]}")
    else:
        after = snapshot(case_dir)
        inside = str(target) + os.sep
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)
                         and k != str(target) and not k.startswith(inside))
        if changed:
            problems.append(f"changed beside OUT: {changed[:5]}")
        try:
            problems += check_export(target, cache, fmt, split, restore)
        except Exception as e:  # noqa: BLE001 - reported, and failed by the test
            problems.append(f"the export cannot be checked: {type(e).__name__}: {e}")
    if "Traceback" in res.output:
        problems.append("traceback")
    for path, content in sentinels.items():
        p = Path(path)
        if not (p.is_file() and not p.is_symlink() and p.read_bytes() == content):
            problems.append(f"the user's {path!r} was removed or changed")
    emit(case=case, what=what, code=res.exit_code, output=res.output[-600:],
         seconds=seconds, problems=problems)


def main_(base: Path, work: Path, seed: int, count: int) -> None:
    rng = np.random.default_rng(seed)
    for case in range(count):
        emit(start=case)
        case_dir = work / f"case-{case}"
        case_dir.mkdir()
        run_case(case, case_dir, base, rng)
        shutil.rmtree(case_dir, ignore_errors=True)
    emit(done=True)


if __name__ == "__main__":
    main_(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))

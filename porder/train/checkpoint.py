"""Checkpoints of a run (``checkpoint.pt``): what identifies the file trained on, the RNG
states, and loading (checked against the options and the file) and atomic saving.

The file trained on is identified twice: by its metadata (:func:`file_identity`: what
made it) and by its bytes (:func:`file_state`: size and SHA-256, and the stat that
lets a resume skip the hashing). A resume refuses a file whose bytes changed since the
run started (:func:`check_file_state`), even when it was rewritten in place under the
same name with the same metadata.
"""
from __future__ import annotations

import datetime
import math
import os
from pathlib import Path
from typing import Optional

import torch

from ..sources.identity import DIGEST_ALL, file_digest
from .config import TrainConfig, identity_diff
from .metrics import METRICS, read_metrics

CHECKPOINT = "checkpoint.pt"
# What a checkpoint records of the bytes of the file trained on (see file_state).
STAT_KEYS = ("size", "mtime_ns", "ctime_ns", "inode", "device")
_DIGESTS: dict = {}      # stat key -> digest: each file version is hashed once per process


def file_identity(meta: dict) -> dict:
    """What identifies the file a run trains on (from its :func:`porder.store.read_meta`)."""
    keys = ("measure", "patch", "bins", "image_size", "source", "seed", "created")
    return {k: meta.get(k) for k in keys} | {"splits": meta.get("splits"),
                                             "classes": len(meta.get("classes", []))}


def file_state(path, known: Optional[dict] = None) -> dict:
    """What identifies the bytes of the file at ``path`` now.

    Returns ``{"size", "mtime_ns", "ctime_ns", "inode", "device", "sha256",
    "sampled"}``: the file's stat, and the SHA-256 of its bytes (``sampled``:
    of 64 spread 1 MiB samples and the size, for files over
    :data:`porder.sources.identity.DIGEST_ALL`). The hash is the only cost:
    it is taken from ``known`` (an earlier ``file_state`` of the same file)
    when the stat is unchanged, and computed at most once per process for
    each stat otherwise. A file rewritten under the same name has a new
    modification and change time (and, replaced by a rename, a new inode),
    so its stat differs and it is hashed again; ``touch`` changes the stat
    only, and the hash shows the bytes are the same.
    """
    st = os.stat(path)
    stat = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "inode": st.st_ino, "device": st.st_dev}
    key = tuple(stat.values())
    sampled = st.st_size > DIGEST_ALL
    if known is not None and all(known.get(k) == v for k, v in stat.items()):
        return stat | {"sha256": known["sha256"], "sampled": sampled}
    if key not in _DIGESTS:
        if len(_DIGESTS) >= 64:
            _DIGESTS.clear()
        _DIGESTS[key] = file_digest(path, st.st_size)
    return stat | {"sha256": _DIGESTS[key], "sampled": sampled}


def is_file_state(state) -> bool:
    """A well-formed :func:`file_state` record (as read back from a checkpoint)."""
    return (isinstance(state, dict)
            and all(isinstance(state.get(k), int) and not isinstance(state.get(k), bool)
                    for k in STAT_KEYS)
            and isinstance(state.get("sha256"), str) and len(state["sha256"]) == 64)


def state_changes(recorded: dict, path) -> tuple[Optional[dict], str]:
    """(the file's :func:`file_state` now, "") when its bytes are those ``recorded``;
    (None, what changed) otherwise. A file of another size is not hashed."""
    try:
        st = os.stat(path)
    except OSError as e:
        return None, f"it cannot be read ({e.strerror or e})"
    when = datetime.datetime.fromtimestamp(st.st_mtime).isoformat(sep=" ", timespec="seconds")
    modified = f"modified {when}" if st.st_mtime_ns != recorded["mtime_ns"] else ""
    if st.st_size != recorded["size"]:
        return None, ", ".join(filter(None, [f"size {recorded['size']} -> {st.st_size} bytes",
                                             modified]))
    now = file_state(path, recorded)
    if now["sha256"] != recorded["sha256"]:
        return None, ", ".join(filter(None, ["content digest differs", modified]))
    return now, ""


def check_file_state(out: Path, path, ckpt: dict) -> Optional[dict]:
    """The :func:`file_state` of ``path`` now, checked against the one checkpoint ``ckpt``
    of run ``out`` recorded; CheckpointError naming what changed. None when ``ckpt``
    records none (made by an older porder: such a run resumes on the metadata alone,
    and records the file's state from then on)."""
    recorded = ckpt.get("file_state")
    if recorded is None:
        return None
    now, what = state_changes(recorded, path)
    if now is None:
        raise CheckpointError(f"cannot resume '{out}': '{path}' changed since the run started "
                              f"({what}); train on it in a new run folder, or put back the "
                              f"file the run was trained on")
    return now


def resume_note(out) -> Optional[str]:
    """The line ``train --resume`` shows when run folder ``out`` holds no checkpoint,
    so that the run starts afresh (None when there is one to resume)."""
    out = Path(out)
    if (out / CHECKPOINT).exists():
        return None
    return f"Nothing to resume in {out}: it holds no {CHECKPOINT}; starting a new run."


def rng_state(device: str) -> dict:
    """torch's random-number states: the CPU generator's, and every GPU's on CUDA."""
    st = {"torch": torch.get_rng_state()}
    if device == "cuda":
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict, device: str) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(st["torch"])
    if device == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state_all(st["cuda"])


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: unreadable, malformed, or made for another run."""


def _bad(ckpt_path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint '{ckpt_path}' {what}; delete it (or the run folder) "
                           f"to start afresh")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_rng(st, ckpt_path: Path, name: str) -> None:
    if not isinstance(st, dict) or not isinstance(st.get("torch"), torch.Tensor) \
            or st["torch"].dtype != torch.uint8 \
            or st["torch"].shape != torch.get_rng_state().shape:
        raise _bad(ckpt_path, f"has a malformed random-number state ({name!r})")
    cuda = st.get("cuda")
    if cuda is not None and (not isinstance(cuda, (list, tuple)) or not all(
            isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda)):
        raise _bad(ckpt_path, f"has a malformed CUDA random-number state ({name!r})")


def _check_structure(ckpt, ckpt_path: Path) -> None:
    """Every entry a resume reads is there, with the right type (shapes are checked on loading)."""
    if not isinstance(ckpt, dict):
        raise _bad(ckpt_path, f"holds a {type(ckpt).__name__}, not a porder checkpoint")
    missing = [k for k in ("config", "step", "wall_s", "file", "model", "optimizer", "scaler",
                           "rng") if k not in ckpt]
    if missing:
        raise _bad(ckpt_path, f"has no {', '.join(repr(k) for k in missing)} "
                   f"(not a porder checkpoint, or damaged)")
    step = ckpt["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise _bad(ckpt_path, f"has step {step!r}; expected an integer >= 0")
    if not _is_number(ckpt["wall_s"]) or ckpt["wall_s"] < 0:
        raise _bad(ckpt_path, f"has wall_s {ckpt['wall_s']!r}; expected a number >= 0")
    for key in ("config", "file", "model", "optimizer", "scaler"):
        if not isinstance(ckpt[key], dict):
            raise _bad(ckpt_path, f"has a {type(ckpt[key]).__name__} as {key!r}; "
                       f"expected a dict")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor)
               for k, v in ckpt["model"].items()):
        raise _bad(ckpt_path, "has a 'model' that is not a state dict of tensors")
    if not {"state", "param_groups"} <= set(ckpt["optimizer"]):
        raise _bad(ckpt_path, "has an 'optimizer' that is not an optimizer state dict")
    _check_rng(ckpt["rng"], ckpt_path, "rng")
    if ckpt.get("file_state") is not None and not is_file_state(ckpt["file_state"]):
        raise _bad(ckpt_path, "has a malformed 'file_state' (what identifies the file "
                   "trained on)")
    ranks = ckpt.get("rng_ranks")
    if ranks is not None:
        if not isinstance(ranks, (list, tuple)):
            raise _bad(ckpt_path, "has a malformed 'rng_ranks'")
        for st in ranks:
            _check_rng(st, ckpt_path, "rng_ranks")


def load_checkpoint(out: Path, cfg: TrainConfig, meta: dict,
                    path=None) -> Optional[dict]:
    """The checkpoint of run folder ``out`` (None when there is none), checked for resuming.

    ValueError (:class:`CheckpointError`) naming the checkpoint when it cannot
    be read or lacks what a resume needs, has a negative step, was made with
    other :data:`IDENTITY` options or on another file (``meta`` is the file's
    :func:`porder.store.read_meta`), or is beyond ``cfg.steps``; with ``path``
    (the file), also when the file's bytes changed since the run started
    (:func:`check_file_state`): then ``ckpt["file_state"]`` is the file's
    state now. Tensor shapes are checked when the states are loaded (:func:`restore`).
    """
    ckpt_path = out / CHECKPOINT
    if not ckpt_path.exists():
        return None
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a damaged file
        raise _bad(ckpt_path, f"cannot be read ({' '.join(str(e).split())[:200]})") from None
    _check_structure(ckpt, ckpt_path)
    old = ckpt["config"]
    diff = identity_diff(old, cfg)
    if diff:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {getattr(cfg, k)!r}" for k in diff)
        raise CheckpointError(f"cannot resume '{out}': options differ ({detail})")
    if ckpt["file"] != file_identity(meta):
        raise CheckpointError(f"cannot resume '{out}': it was trained on another file "
                              f"({ckpt.get('path')})")
    if ckpt["step"] > cfg.steps:
        raise CheckpointError(f"cannot resume '{out}': its checkpoint is at step "
                              f"{ckpt['step']}, beyond --steps {cfg.steps}")
    if path is not None:
        ckpt["file_state"] = check_file_state(out, path, ckpt)
    return ckpt


def resume_rows(out: Path, step: int) -> list[dict]:
    """The rows of ``out/metrics.jsonl`` that a resume at ``step`` keeps (those up to it).

    ValueError naming the file when they are not in order (steps >= 0, each
    greater than the last) or lack the row of ``step`` itself (a run writes
    that row just before its checkpoint): such a file was edited, or belongs
    to another checkpoint, and would give curves and a result that are not
    those of the run.
    """
    path = Path(out) / METRICS
    rows = [r for r in read_metrics(out) if r["step"] <= step]
    last = -1
    for r in rows:
        if r["step"] <= last:
            raise ValueError(f"'{path}' lists step {r['step']} after step {last}; repair or "
                             f"delete the file")
        last = r["step"]
    if last != step:
        raise ValueError(f"'{path}' has no row for step {step}, the step of the checkpoint "
                         f"beside it: put back the run's own metrics.jsonl, or delete the "
                         f"folder to start afresh")
    return rows


def restore(ckpt: dict, ckpt_path: Path, model, opt, scaler) -> None:
    """Load the model, optimizer and scaler states; CheckpointError when they do not fit."""
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()
        detail = " ".join(first[1].split()) if len(first) > 1 else " ".join(str(e).split())
        raise _bad(ckpt_path, f"does not fit the model ({detail[:200]})") from None
    try:
        opt.load_state_dict(ckpt["optimizer"])
        for param, st in opt.state.items():
            for key in ("exp_avg", "exp_avg_sq"):
                t = st.get(key)
                if not isinstance(t, torch.Tensor) or t.shape != param.shape:
                    raise ValueError(f"its {key} does not match a parameter of shape "
                                     f"{tuple(param.shape)}")
        scaler.load_state_dict(ckpt["scaler"])
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as e:
        raise _bad(ckpt_path, f"has an optimizer state that does not fit the model "
                   f"({' '.join(str(e).split())[:200]})") from None


def save_checkpoint(out: Path, state: dict) -> None:
    """Write ``state`` to ``out/checkpoint.pt`` atomically (a temporary file, then a rename)."""
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out / CHECKPOINT)

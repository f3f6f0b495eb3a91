"""Checkpoints of a run (``checkpoint.pt``): what identifies the file trained on, the RNG
states, and loading (checked against the options and the file) and atomic saving."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import torch

from .config import TrainConfig, identity_diff

CHECKPOINT = "checkpoint.pt"


def file_identity(meta: dict) -> dict:
    """What identifies the file a run trains on (from its :func:`porder.store.read_meta`)."""
    keys = ("measure", "patch", "bins", "image_size", "source", "seed", "created")
    return {k: meta.get(k) for k in keys} | {"splits": meta.get("splits"),
                                             "classes": len(meta.get("classes", []))}


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
    ranks = ckpt.get("rng_ranks")
    if ranks is not None:
        if not isinstance(ranks, (list, tuple)):
            raise _bad(ckpt_path, "has a malformed 'rng_ranks'")
        for st in ranks:
            _check_rng(st, ckpt_path, "rng_ranks")


def load_checkpoint(out: Path, cfg: TrainConfig, meta: dict) -> Optional[dict]:
    """The checkpoint of run folder ``out`` (None when there is none), checked for resuming.

    ValueError (:class:`CheckpointError`) naming the checkpoint when it cannot
    be read or lacks what a resume needs, has a negative step, was made with
    other :data:`IDENTITY` options or on another file (``meta`` is the file's
    :func:`porder.store.read_meta`), or is beyond ``cfg.steps``. Tensor shapes
    are checked when the states are loaded (:func:`restore`).
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
    return ckpt


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

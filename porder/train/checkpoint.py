"""Checkpoints of a run (``checkpoint.pt``): what identifies the file trained on, the RNG
states, and loading (checked against the options and the file) and atomic saving."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from .config import TrainConfig, identity_diff

CHECKPOINT = "checkpoint.pt"


def _file_identity(meta: dict) -> dict:
    keys = ("measure", "patch", "bins", "image_size", "source", "seed", "created")
    return {k: meta.get(k) for k in keys} | {"splits": meta.get("splits"),
                                             "classes": len(meta.get("classes", []))}


def _rng_state(device: str) -> dict:
    st = {"torch": torch.get_rng_state()}
    if device == "cuda":
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict, device: str) -> None:
    torch.set_rng_state(st["torch"])
    if device == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state_all(st["cuda"])



def load_checkpoint(out: Path, cfg: TrainConfig, meta: dict) -> Optional[dict]:
    """The checkpoint of run folder ``out`` (None when there is none), checked for resuming.

    ValueError when it cannot be read, was made with other :data:`IDENTITY`
    options or on another file (``meta`` is the file's :func:`porder.store.read_meta`),
    or is beyond ``cfg.steps``.
    """
    ckpt_path = out / CHECKPOINT
    if not ckpt_path.exists():
        return None
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a damaged file
        raise ValueError(f"cannot read checkpoint '{ckpt_path}' ({e}); delete it to "
                         "start afresh") from None
    old = ckpt["config"]
    diff = identity_diff(old, cfg)
    if diff:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {getattr(cfg, k)!r}" for k in diff)
        raise ValueError(f"cannot resume '{out}': options differ ({detail})")
    if ckpt["file"] != _file_identity(meta):
        raise ValueError(f"cannot resume '{out}': it was trained on another file "
                         f"({ckpt['path']})")
    if ckpt["step"] > cfg.steps:
        raise ValueError(f"cannot resume '{out}': its checkpoint is at step {ckpt['step']}, "
                         f"beyond --steps {cfg.steps}")
    return ckpt


def save_checkpoint(out: Path, state: dict) -> None:
    """Write ``state`` to ``out/checkpoint.pt`` atomically (a temporary file, then a rename)."""
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out / CHECKPOINT)

"""Several training processes (torchrun): rank and world size from the environment,
the process group, each rank's dropout seed, and the all-reduce of the training
statistics. Each rank's share of the test split is
:func:`porder.pipeline.shard_range`; see :mod:`porder.train.loop` for the scheme."""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """This process's place among the processes training together (rank 0 of 1 alone)."""

    rank: int = 0
    local_rank: int = 0          # index on this machine: the GPU it trains on
    world_size: int = 1
    local_world_size: int = 1    # processes on this machine (they share its CPU cores)

    @property
    def active(self) -> bool:
        return self.world_size > 1


def dist_env(environ=None) -> DistEnv:
    """Rank and world size from torchrun's environment (or an initialised process group).

    WORLD_SIZE unset or 1 means a single process. With WORLD_SIZE > 1, RANK,
    LOCAL_RANK, MASTER_ADDR and MASTER_PORT must be set too, as torchrun does;
    ValueError otherwise.
    """
    env = os.environ if environ is None else environ
    if environ is None and dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        return DistEnv(dist.get_rank(), int(env.get("LOCAL_RANK", 0)), world,
                       int(env.get("LOCAL_WORLD_SIZE", world)))
    world = _env_int(env, "WORLD_SIZE", "1")
    if world <= 1:
        return DistEnv()
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} is set but not {', '.join(missing)}; launch "
                         "several processes with torchrun --nproc-per-node N -m porder train")
    rank, local = _env_int(env, "RANK"), _env_int(env, "LOCAL_RANK")
    local_world = _env_int(env, "LOCAL_WORLD_SIZE", str(world))
    if not (0 <= rank < world and 0 <= local < local_world):
        raise ValueError(f"RANK={rank}, LOCAL_RANK={local} out of range for WORLD_SIZE={world}, "
                         f"LOCAL_WORLD_SIZE={local_world}")
    return DistEnv(rank, local, world, local_world)


def _env_int(env, key: str, default: Optional[str] = None) -> int:
    value = env.get(key, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """Dropout seed of rank > 0 from step ``step`` (rank 0 goes on with the single-process stream)."""
    return ((seed * 1_000_003 + rank) * 1_000_033 + step) % 2 ** 63


@contextmanager
def process_group(env: DistEnv, device: str):
    """Join the process group of a torchrun job (gloo on CPU, NCCL on CUDA) for one run.

    A group the caller initialised is used as it is; one made here is destroyed
    after. Ends with a barrier, so no rank writes before every rank has read the
    run folder.
    """
    if not env.active:
        yield
        return
    if device == "cuda":
        if env.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {env.local_rank} needs GPU {env.local_rank}, but torch "
                             f"sees {torch.cuda.device_count()}; start at most that many "
                             "processes per machine")
        torch.cuda.set_device(env.local_rank)   # "cuda" now means cuda:LOCAL_RANK
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    try:
        barrier(device, env)
        yield
    finally:
        if own:
            dist.destroy_process_group()


def barrier(device: str, env: DistEnv) -> None:
    """Wait for every rank (on this rank's GPU under NCCL)."""
    dist.barrier(device_ids=[env.local_rank] if device == "cuda" else None)


def all_reduce_stats(loss_sum, correct, seen, waited, dt, world) -> dict:
    """An interval's training statistics over the global batch: sums over the ranks (waits: their mean)."""
    sums = torch.stack([loss_sum, correct.double(),
                        torch.tensor(float(seen), dtype=torch.float64, device=loss_sum.device),
                        torch.tensor(waited, dtype=torch.float64, device=loss_sum.device)])
    dist.all_reduce(sums)
    loss, right, n, wait = sums.tolist()
    return {"train_loss": loss / n, "train_acc": right / n, "images_per_s": n / dt,
            "wall_s": None, "data_wait": wait / world / dt}

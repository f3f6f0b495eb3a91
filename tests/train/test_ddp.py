"""`porder train` under torchrun: DistributedDataParallel over gloo, two CPU processes on loopback.

What a run of N processes guarantees, and what is checked here (N = 2):

* the batch of step s is the single-process batch of --batch-size images; rank r
  trains on its contiguous slice [r B/N, (r+1) B/N), so the slices are disjoint
  and their union is the global batch;
* each step equals, to float rounding, a single-process Adam step on the global
  batch whose loss is the mean of the per-rank mean losses, with batch-norm
  statistics per rank (torch has no SyncBatchNorm on the CPU) and the running
  statistics of rank 0. :func:`emulate` computes that reference in one process;
* test metrics are those of one evaluation of the whole test split with that
  model; the step-0 row equals a single-process run's;
* rank 0 alone writes the run folder and prints progress; --resume continues on
  every rank from rank 0's checkpoint;
* a --batch-size that does not split over the processes is a one-line error.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from porder.cli.train import train as train_cmd
from porder.pipeline import shard_range
from porder.train import batch_indices, build_model, evaluate, read_metrics, train
from porder.train.batches import Data
from porder.train.checkpoint import CHECKPOINT
from porder.train.config import TrainConfig
from porder.train.device import torch_settings
from porder.train.distributed import dist_env

from .test_train import write_file

WORLD = 2
ARGS = ["--arch", "resnet", "--width", "0.0625", "--eval-every", "3", "--batch-size", "8",
        "--device", "cpu", "--threads", "1"]
CFG = dict(arch="resnet", width=0.0625, eval_every=3, batch_size=8, device="cpu", threads=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, cwd, nproc=WORLD):
    """``torchrun --nproc-per-node nproc -m porder train *args`` on loopback."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "porder", "train", *map(str, args)]
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def emulate(path, steps, *, world=WORLD, eval_every=3):
    """The documented computation of a ``world``-process run, in this process.

    Returns ``{step: ((train_loss, train_acc, test_loss, test_acc), state_dict)}``
    for every evaluation after step 0.
    """
    cfg = TrainConfig(**CFG, steps=steps)
    with torch_settings("cpu", True, 1):
        data = Data(path, device="cpu")
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.arch, num_classes=2, in_size=data.size, width=cfg.width)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
        b = cfg.batch_size // world
        rows, loss_sum, right = {}, 0.0, 0
        model.train()
        for s in range(steps):
            idx = batch_indices(s, len(data.train_y), cfg.batch_size, cfg.seed)
            opt.zero_grad()
            for r in range(world):                       # rank r's slice of the global batch
                part = idx[r * b:(r + 1) * b]
                x, y = data.to_input(data.train_x[part]), data.train_y[part]
                running = [t.clone() for t in model.buffers()]
                logits = model(x)                        # BN: this slice's statistics
                loss = F.cross_entropy(logits, y)
                (loss / world).backward()                # DDP: mean of the ranks' gradients
                if r:                                    # DDP keeps rank 0's running statistics
                    for t, v in zip(model.buffers(), running):
                        t.copy_(v)
                loss_sum += loss.item() * b
                right += int((logits.argmax(1) == y).sum())
            opt.step()
            if (s + 1) % eval_every == 0:
                seen = eval_every * cfg.batch_size
                metrics = (loss_sum / seen, right / seen, *evaluate(model, data, cfg, "cpu"))
                rows[s + 1] = metrics, {k: v.clone() for k, v in model.state_dict().items()}
                loss_sum, right = 0.0, 0
    return rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_file(tmp_path_factory.mktemp("ddp-data") / "tiny.h5")


@pytest.fixture(scope="module")
def reference(tiny):
    return emulate(tiny, 9)


@pytest.fixture(scope="module")
def ddp_run(tiny, tmp_path_factory):
    """A fresh two-process run of 6 steps: (run folder, finished process)."""
    tmp = tmp_path_factory.mktemp("ddp-run")
    proc = torchrun(tiny, *ARGS, "--steps", "6", "--out", tmp / "run", cwd=tmp)
    return tmp / "run", proc


def assert_matches(row, state, ref):
    """A metrics row and a model state against the reference at the same step."""
    (train_loss, train_acc, test_loss, test_acc), want = ref
    assert row["train_loss"] == pytest.approx(train_loss, rel=1e-6)
    assert row["train_acc"] == train_acc
    assert row["test_loss"] == pytest.approx(test_loss, rel=1e-5)   # float32 sums per shard
    assert row["test_acc"] == test_acc
    if state is not None:
        assert state.keys() == want.keys()
        for k, v in state.items():
            torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6, msg=k)


# ------------------------------------------------------------------ units
@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_slices_partition_the_global_batch(world):
    for step in range(7):                               # crosses epoch boundaries (n = 10)
        whole = batch_indices(step, 10, 8, seed=3)
        parts = [batch_indices(step, 10, 8, 3, rank=r, world_size=world) for r in range(world)]
        assert all(len(p) == 8 // world for p in parts)
        assert torch.equal(torch.cat(parts), whole)     # contiguous, in rank order
    with pytest.raises(ValueError, match="does not split evenly over 3 processes"):
        batch_indices(0, 10, 8, 0, rank=0, world_size=3)


def test_test_split_shares_cover_it_once():
    for n in (0, 1, 7, 16):
        for world in (1, 2, 3, 5):
            shares = [shard_range(n, (r, world)) for r in range(world)]
            assert [i for lo, hi in shares for i in range(lo, hi)] == list(range(n))


def test_dist_env():
    assert dist_env({}).world_size == 1 and not dist_env({"WORLD_SIZE": "1"}).active
    env = dist_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (3, 1, 4, 2)
    with pytest.raises(ValueError, match="not RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; launch"):
        dist_env({"WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        dist_env({"WORLD_SIZE": "two"})


def test_indivisible_batch_is_a_one_line_error(tiny, tmp_path, monkeypatch):
    # The variables torchrun sets for rank 1 of 2; the check comes before any connection.
    for k, v in dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    r = CliRunner().invoke(train_cmd, [str(tiny), *ARGS, "--batch-size", "7", "--steps", "2",
                                       "--out", str(tmp_path / "r")])
    assert r.exit_code == 1
    assert r.output == ("Error: rank 1: --batch-size 7 is the global batch and must split evenly "
                        "over the 2 processes; use a multiple of 2\n")
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ two processes
def test_two_processes_train_as_documented(tiny, ddp_run, reference, tmp_path):
    out, proc = ddp_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    # Rank 0 alone reports: one line per evaluation, one summary.
    assert log.count("resnet: step 3/6") == 1 and log.count("Wrote ") == 1
    assert "tiny.h5 (cpu x 2 processes): step 6" in log
    assert "Traceback" not in log

    lines = (out / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows] == [0, 3, 6]
    assert all(r["world_size"] == WORLD for r in rows)
    assert [r["epoch"] for r in rows] == [0, 0.5, 1.0]              # global batch: 8 of 48
    assert rows[1]["images_per_s"] > 0
    assert json.loads((out / "config.json").read_text())["world_size"] == WORLD
    result = json.loads((out / "result.json").read_text())
    assert result["complete"] and result["steps"] == 6 and result["world_size"] == WORLD
    assert (out / "curves.png").stat().st_size > 1000
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt", "config.json", "curves.png", "metrics.jsonl", "result.json"]

    # Step 0: the untrained model, evaluated as one process evaluates it.
    single = train(tiny, TrainConfig(**CFG, steps=3), tmp_path / "single").rows
    assert rows[0]["test_loss"] == pytest.approx(single[0]["test_loss"], rel=1e-6)
    assert rows[0]["test_acc"] == single[0]["test_acc"]

    # Every step: the documented computation (disjoint slices, averaged gradients, BN per rank).
    ckpt = torch.load(out / CHECKPOINT, weights_only=True)
    assert ckpt["step"] == 6 and ckpt["world_size"] == WORLD and len(ckpt["rng_ranks"]) == WORLD
    assert_matches(rows[1], None, reference[3])
    assert_matches(rows[2], ckpt["model"], reference[6])

    # The checkpoint, evaluated by one process on the whole test split, gives the last row.
    model = build_model("resnet", num_classes=2, in_size=16, width=0.0625)
    model.load_state_dict(ckpt["model"])
    data = Data(tiny, device="cpu")
    test_loss, test_acc = evaluate(model, data, TrainConfig(**CFG), "cpu")
    assert rows[-1]["test_loss"] == pytest.approx(test_loss, rel=1e-5)
    assert rows[-1]["test_acc"] == test_acc


def test_two_processes_resume(tiny, ddp_run, reference, tmp_path):
    out, proc = ddp_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    shutil.copytree(out, run)
    before = read_metrics(run)
    proc = torchrun(tiny, *ARGS, "--steps", "9", "--out", run, "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [0, 3, 6, 9]
    assert rows[:3] == before
    ckpt = torch.load(run / CHECKPOINT, weights_only=True)
    assert_matches(rows[-1], ckpt["model"], reference[9])   # as if never interrupted


def test_two_processes_refuse_an_indivisible_batch(tiny, tmp_path):
    proc = torchrun(tiny, *ARGS, "--batch-size", "7", "--steps", "2", "--out", tmp_path / "r",
                    cwd=tmp_path)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if "--batch-size 7" in line]
    assert ours and all(line.startswith("Error: ") and line.endswith("use a multiple of 2")
                        for line in ours)
    assert not (tmp_path / "r").exists()

"""Training data streamed from the file: the same batches, evaluations and runs as held data.

:class:`porder.train.batches.Data` holds a split on the device when it fits a budget and
reads it from the file batch by batch otherwise (:class:`~porder.train.batches.FileImages`).
Where the data lives must change nothing a run computes: these tests force streaming (a
budget of nothing, or ``in_memory=False``) and compare against the held data bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from porder.data import Normalize, channel_stats, read_rows
from porder.store import open_file, read_split
from porder.train import TIMING_FIELDS, TrainConfig, batches, evaluate, get_batch, memory, read_metrics, train
from porder.train import lockstep as ls
from porder.train.batches import Data, FileImages
from porder.train.checkpoint import CHECKPOINT
from porder.train.models import build_model

from .test_lockstep import float64, no_plot  # noqa: F401 - the fixture, and what it uses
from .test_train import write_file


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """40 train and 14 test 16x16 images, unmodified (``--measure`` reorders on the fly)."""
    return write_file(tmp_path_factory.mktemp("data") / "tiny.h5", n_train=40, n_test=14)


def cfg(**kw):
    base = dict(arch="resnet", width=1 / 16, batch_size=8, steps=6, eval_every=3,
                device="cpu", threads=1)
    return TrainConfig(**(base | kw))


def held_and_streamed(path, **kw):
    held = Data(path, device="cpu", in_memory=True, **kw)
    streamed = Data(path, device="cpu", in_memory=False, **kw)
    assert held.in_memory == {"train": True, "test": True}
    assert streamed.in_memory == {"train": False, "test": False}
    assert isinstance(streamed.train_x, FileImages) and isinstance(streamed.test_x, FileImages)
    assert isinstance(held.train_x, torch.Tensor) and isinstance(held.test_x, torch.Tensor)
    return held, streamed


def strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


# ------------------------------------------------------------------ batches
@pytest.mark.parametrize("measure", [None, "entropy", "random"])
def test_streamed_batches_equal_held_ones(tiny, measure):
    kw = {} if measure is None else dict(reorder=measure, patch=4, order_seed=3)
    held, streamed = held_and_streamed(tiny, **kw)
    c = cfg(**({} if measure is None else dict(reorder=measure, patch=4, order_seed=3)))
    assert torch.equal(held.mean, streamed.mean) and torch.equal(held.std, streamed.std)
    assert torch.equal(held.train_y, streamed.train_y) and torch.equal(held.test_y, streamed.test_y)
    for step in (0, 4, 5, 9):                  # step 4 crosses from epoch 0 into epoch 1
        x, y = get_batch(held, step, c)
        xs, ys = get_batch(streamed, step, c)
        assert x.dtype == xs.dtype == torch.get_default_dtype()
        assert torch.equal(x, xs) and torch.equal(y, ys)
        for rank in (0, 1):                    # data-parallel shares, too
            x, y = get_batch(held, step, c, rank=rank, world_size=2)
            xs, ys = get_batch(streamed, step, c, rank=rank, world_size=2)
            assert torch.equal(x, xs) and torch.equal(y, ys)
    # The test split, reordered once when held and block by block when streamed
    assert torch.equal(streamed.test_x[0:14], held.test_x)
    pick = torch.tensor([13, 2, 2, 7, 0])      # any order, repeats
    assert torch.equal(streamed.test_x[pick], held.test_x[pick])
    assert torch.equal(streamed.test_x[3:9], held.test_x[3:9])


def test_streamed_batches_in_float64(tiny, float64):  # noqa: F811 - the fixture
    held, streamed = held_and_streamed(tiny)
    x, _ = get_batch(held, 2, cfg())
    assert x.dtype == torch.float64 and torch.equal(x, get_batch(streamed, 2, cfg())[0])


def test_file_images_index_like_a_tensor(tiny):
    images = torch.from_numpy(read_split(tiny, "train")["images"])        # (40, 16, 16, 3)
    fi = Data(tiny, device="cpu", in_memory=False).train_x
    assert len(fi) == 40 and fi.shape == tuple(images.shape) and fi.device.type == "cpu"
    for key in (slice(0, 40), slice(5, 6), slice(38, 100), slice(7, 7),
                torch.tensor([39, 0, 17, 17, 18, 19, 3]), np.array([4, -1]),
                torch.tensor([], dtype=torch.int64)):
        assert torch.equal(fi[key], images[key]), key
    for bad in (torch.tensor([1.0]), torch.tensor([True, False]), np.array([[1]]), 3):
        with pytest.raises(TypeError, match="slice or integer indices"):
            fi[bad]
    fi.close()
    assert torch.equal(fi[1:4], images[1:4])                              # reopened


def test_read_rows_any_order(tiny):
    want = read_split(tiny, "test")["images"]
    with open_file(tiny) as f:
        ds = f["test/images"]
        for index in ([3, 1, 2], [0, 13, 13, 5, 6, 7, 8, 2], list(range(14)), [],
                      np.random.default_rng(0).integers(0, 14, 30)):
            got = read_rows(tiny, ds, index)
            assert got.shape == (len(index), 16, 16, 3)
            assert np.array_equal(got, want[np.asarray(index, dtype=np.int64)])
        with pytest.raises(IndexError, match="rows 0..14 of"):
            read_rows(tiny, ds, [0, 14])


# ------------------------------------------------------------------ evaluation and runs
@pytest.mark.parametrize("measure", [None, "random"])
def test_streamed_evaluation_equals_held(tiny, measure, one_thread):
    kw = {} if measure is None else dict(reorder=measure, patch=4, order_seed=3)
    held, streamed = held_and_streamed(tiny, **kw)
    torch.manual_seed(0)
    model = build_model("resnet", num_classes=2, in_size=16, width=1 / 16)
    for c in (cfg(eval_batch=5), cfg(eval_batch=4, eval_images=9)):
        for full in (True, False):
            assert evaluate(model, held, c, "cpu", full=full) == \
                evaluate(model, streamed, c, "cpu", full=full)


def force_streaming(monkeypatch):
    """Every split over the budget: ``porder train`` streams both."""
    monkeypatch.setattr(memory, "DATA_SHARE", 0.0)


def assert_same_run(a, b):
    assert strip(a.rows) == strip(b.rows)
    ca = torch.load(a.out / CHECKPOINT, weights_only=True)
    cb = torch.load(b.out / CHECKPOINT, weights_only=True)
    assert ca["step"] == cb["step"] and ca["model"].keys() == cb["model"].keys()
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k


@pytest.mark.parametrize("kw", [{}, dict(reorder="random", patch=4, order_seed=2),
                                dict(reorder="entropy", patch=8, eval_images=6)],
                         ids=["plain", "random", "entropy-subset"])
def test_a_streamed_run_equals_a_held_one(tiny, tmp_path, monkeypatch, one_thread, kw):
    held = train(tiny, cfg(**kw), tmp_path / "held")
    force_streaming(monkeypatch)
    seen = []
    monkeypatch.setattr(batches.Data, "_read", _recording(batches.Data._read, seen))
    streamed = train(tiny, cfg(**kw), tmp_path / "streamed")
    assert seen == [{"train": False, "test": False}]
    assert len(held.rows) == 3 and all("train_loss_steps" in r for r in held.rows[1:])
    assert_same_run(held, streamed)


def _recording(read, seen):
    def wrapped(self, shapes, dev):
        seen.append(dict(self.in_memory))
        return read(self, shapes, dev)
    return wrapped


def test_a_streamed_lockstep_group_equals_a_held_one(tiny, tmp_path, monkeypatch, float64):  # noqa: F811
    c = [cfg(arch="vgg", seed=s, eval_images=5, eval_batch=3) for s in (0, 1)]
    ls.train_group([(tiny, c[i], tmp_path / "held" / str(i)) for i in range(2)])
    force_streaming(monkeypatch)
    res = ls.train_group([(tiny, c[i], tmp_path / "streamed" / str(i)) for i in range(2)])
    for i, r in enumerate(res):
        assert not isinstance(r, BaseException), r
        held = read_metrics(tmp_path / "held" / str(i))
        assert [row["step"] for row in held] == [0, 3, 6]
        assert strip(held) == strip(read_metrics(r.out))


# ------------------------------------------------------------------ the choice
def test_auto_holds_what_fits_the_budget_and_streams_the_rest(tiny, monkeypatch):
    train_bytes, test_bytes = 40 * 16 * 16 * 3, 14 * 16 * 16 * 3
    for budget, want in ((10**9, (True, True)),
                         (train_bytes + test_bytes, (True, True)),
                         (train_bytes + test_bytes - 1, (True, False)),
                         (train_bytes - 1, (False, True)),       # the test split still fits
                         (test_bytes - 1, (False, False))):
        monkeypatch.setattr(batches, "data_budget", lambda device, b=budget: (b, "test"))
        data = Data(tiny, device="cpu")
        assert (data.in_memory["train"], data.in_memory["test"]) == want, budget
        assert data.budget == (budget, "test")
        assert isinstance(data.train_x, torch.Tensor) == want[0]
        assert isinstance(data.test_x, torch.Tensor) == want[1]
    assert Data(tiny, device="cpu", in_memory=True).budget is None


def test_the_budget_is_a_share_of_theavailable_ram(monkeypatch):
    monkeypatch.setattr(memory, "available_ram", lambda: 8 * 2**30)
    assert memory.data_budget("cpu") == (2 * 2**30, "25% of the RAM available now (8.0 GiB)")
    monkeypatch.setattr(memory, "DATA_SHARE", 0.5)
    assert memory.data_budget("cpu")[0] == 4 * 2**30
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")     # torchrun: 4 processes, 4 copies
    assert memory.data_budget("cpu") == (2**30, "50% of the RAM available now / 4 processes "
                                                 "(2.0 GiB)")


# ------------------------------------------------------------------ one normalisation
def test_one_normalisation_bit_for_bit(tiny):
    """Data.to_input, BatchLoader's float output and Normalize are one computation, with
    the numbers of the expression each of them had before."""
    from porder.data import BatchLoader

    images = torch.from_numpy(read_split(tiny, "train")["images"])        # (40, 16, 16, 3)
    mean, std = channel_stats(tiny)
    for dtype in (torch.float32, torch.float64):
        m = torch.tensor(mean, dtype=dtype).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=dtype).view(1, 3, 1, 1)
        old = ((images.permute(0, 3, 1, 2).to(dtype) - m) / s).contiguous()
        new = Normalize(mean, std, dtype=dtype).batch(images)
        assert new.dtype == dtype and new.is_contiguous() and torch.equal(new, old)
    data = Data(tiny, device="cpu")
    assert torch.equal(data.to_input(images), Normalize(mean, std).batch(images))
    x, _ = next(iter(BatchLoader(tiny, batch_size=40)))
    assert torch.equal(x, Normalize(mean, std).apply(images.permute(0, 3, 1, 2)))
    with pytest.raises(ValueError, match="needs a floating dtype"):
        Normalize(mean, std, dtype=torch.int32)
    assert "dtype=torch.float64" in repr(Normalize(mean, std, dtype=torch.float64))
    import pickle

    back = pickle.loads(pickle.dumps(Normalize(mean, std, dtype=torch.float64)))
    assert back.dtype == torch.float64 and back.mean == tuple(mean)


def test_channel_stats_are_exact_whatever_the_chunks(tmp_path, monkeypatch):
    """The statistics a streamed run reads from the file in chunks of at most STATS_BYTES
    are those of the images held in memory, and of summing every pixel in float64."""
    import porder.data as data

    path = write_file(tmp_path / "s.h5", n_train=37, n_test=2, size=32)
    images = read_split(path, "train")["images"]                          # (37, 32, 32, 3)
    px = images.reshape(-1, 3).astype(np.float64)
    mean = px.sum(0) / len(px)                                            # float64, as before
    std = np.sqrt(np.maximum((px * px).sum(0) / len(px) - mean ** 2, data.VAR_FLOOR))
    monkeypatch.setattr(data, "STATS_BYTES", 5 * 32 * 32 * 3)            # 5 images a read
    for got in (data.channel_stats(path), data.channel_stats_of(images),
                data.channel_stats_of(images[i:i + 3] for i in range(0, 37, 3))):
        assert got[0].tobytes() == mean.tobytes() and got[1].tobytes() == std.tobytes()


def test_batches_prepared_in_the_background_only_beside_a_free_core(monkeypatch):
    """Prefetch: the same batches either way; a background thread only when torch's threads
    leave a core free (or on CUDA), since beside threads on every core it slows each step."""
    import threading

    from porder.train import batches

    def fetch(step):
        return step * 10, threading.current_thread().name

    for background in (True, False):
        with batches.Prefetch(fetch, 2, 5, background=background) as p:
            got = [p.get(s)[0] for s in (2, 3, 4)]
        assert [g[0] for g in got] == [20, 30, 40]
        assert all(g[1].startswith("porder-batch") == background for g in got)
    monkeypatch.setattr(batches, "cores", lambda: 2)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert not batches.background_batches("cpu") and batches.background_batches("cuda")
        torch.set_num_threads(1)
        assert batches.background_batches("cpu")
    finally:
        torch.set_num_threads(old)

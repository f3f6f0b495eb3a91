"""PyTorch integration: porder.data, porder.load, and torch tensors through porder.reorder."""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import porder
from porder.data import (
    BatchLoader,
    PorderDataset,
    channel_stats,
    channel_stats_of,
    epoch_order,
    resolve_torch_device,
)
from porder.patches import from_torch, permute_images
from porder.store import StoreError, read_split
from porder.train import batch_indices
from porder.train.loop import Data

from .test_export import CLASSES, make_cache

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """(path, originals): 40 train and 12 test 16x16 images, entropy-ordered, patch 4."""
    return make_cache(tmp_path_factory.mktemp("data") / "c.h5")


def chw(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, S, S, 3) -> (N, 3, S, S) tensor."""
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def row_key(image) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


# ------------------------------------------------------------------ Dataset
def test_dataset_items_are_the_stored_images(cache):
    path, _ = cache
    want = read_split(path, "train")
    ds = PorderDataset(path)
    assert len(ds) == 40 and ds.classes == CLASSES and ds.class_to_idx["dog"] == 1
    assert ds.options["measure"] == "entropy" and ds.patch == 4 and ds.mean is None
    for i in (0, 17, 39, -1):
        x, y = ds[i]
        assert x.dtype == torch.uint8 and x.shape == (3, 16, 16) and isinstance(y, int)
        assert torch.equal(x, chw(want["images"])[i]) and y == want["labels"][i]
    with pytest.raises(IndexError, match="index 40 is out of range"):
        ds[40]
    with pytest.raises(IndexError):
        ds[-41]
    assert [y for _, y in ds] == want["labels"].tolist()   # the iteration protocol stops


def test_float_output_is_normalised_exactly_like_train(cache):
    path, _ = cache
    data = Data(path, device="cpu")        # porder train's own data and normalisation
    train = PorderDataset(path, output="float")
    test = PorderDataset(path, "test", output="float")
    assert torch.equal(torch.tensor(train.mean, dtype=torch.float32), data.mean.view(3))
    assert torch.equal(torch.tensor(train.std, dtype=torch.float32), data.std.view(3))
    for i in (0, 5, 39):
        x, y = train[i]
        assert x.dtype == torch.float32
        assert torch.equal(x, data.to_input(data.train_x[i:i + 1])[0])
    for i in (0, 11):    # the test split uses the training statistics too
        assert torch.equal(test[i][0], data.to_input(data.test_x[i:i + 1])[0])


def test_channel_stats_against_numpy(cache):
    path, _ = cache
    px = read_split(path, "train")["images"].reshape(-1, 3).astype(np.float64)
    mean, std = channel_stats(path)
    np.testing.assert_allclose(mean, px.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, px.std(0), rtol=1e-9)


def test_train_and_the_loaders_share_one_statistics_and_one_epoch_order(cache):
    path, _ = cache
    images = read_split(path, "train")["images"]
    mean, std = channel_stats_of(images)                       # an array, cut into chunks
    chunked = channel_stats_of(images[lo:lo + 16] for lo in range(0, len(images), 16))
    from_file = channel_stats(path)
    assert mean.tobytes() == from_file[0].tobytes() and std.tobytes() == from_file[1].tobytes()
    np.testing.assert_allclose(chunked, (mean, std), rtol=1e-12)
    with pytest.raises(ValueError, match="'x.h5' has no training images"):
        channel_stats_of(images[:0], source="'x.h5'")
    assert torch.equal(batch_indices(0, 40, 40, 3), epoch_order(40, 3, 0))
    assert torch.equal(batch_indices(1, 40, 40, 3), epoch_order(40, 3, 1))


def test_device_names_have_one_resolver(monkeypatch):
    from porder.backend import resolve_device as array_device
    from porder.train import resolve_device as train_device

    for resolve in (array_device, resolve_torch_device, train_device):
        assert resolve("cpu") == "cpu"
        with pytest.raises(ValueError, match="device='tpu' is not one of cpu, cuda, auto"):
            resolve("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_torch_device("auto") == train_device("auto") == "cpu"
    with pytest.raises(ValueError, match=r"device 'cuda' asked for, but this torch .* sees no "
                                         r"CUDA GPU; use device='cpu'$"):
        resolve_torch_device("cuda")
    with pytest.raises(ValueError, match=r"sees no CUDA GPU; use --device cpu$"):
        train_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train_device("auto") == "cuda"                     # torch's view of the GPU, not CuPy's


def test_given_mean_and_std(cache):
    path, _ = cache
    ds = PorderDataset(path, output="float", mean=(100, 110, 120), std=[50, 60, 70])
    x, _ = ds[3]
    raw = chw(read_split(path, "train")["images"])[3].float()
    want = (raw - torch.tensor([100., 110, 120]).view(3, 1, 1)) / torch.tensor([50., 60, 70]).view(3, 1, 1)
    assert torch.equal(x, want)
    with pytest.raises(ValueError, match="pass both mean= and std="):
        PorderDataset(path, output="float", mean=(1, 2, 3))
    with pytest.raises(ValueError, match="3 values each"):
        PorderDataset(path, output="float", mean=(1, 2), std=(1, 1))


def test_restore_gives_the_originals(cache):
    path, originals = cache
    ds = PorderDataset(path, "test", restore=True)
    got = torch.stack([ds[i][0] for i in range(len(ds))])
    assert torch.equal(got, chw(originals["test"]))
    assert not torch.equal(got, chw(read_split(path, "test")["images"]))


def test_transform_is_applied_last(cache):
    path, _ = cache
    ds = PorderDataset(path, output="float", transform=lambda x: x.flip(-1) * 2)
    plain = PorderDataset(path, output="float")
    assert torch.equal(ds[7][0], plain[7][0].flip(-1) * 2)


def test_bad_arguments(cache, tmp_path):
    path, _ = cache
    with pytest.raises(ValueError, match="split='val' is not one of train, test"):
        PorderDataset(path, "val")
    with pytest.raises(ValueError, match="output='int' is not one of uint8, float"):
        PorderDataset(path, output="int")
    with pytest.raises(StoreError, match="does not exist"):
        PorderDataset(tmp_path / "nope.h5")
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        BatchLoader(path, batch_size=0)
    with pytest.raises(ValueError, match="buffer must be at least 1"):
        BatchLoader(path, buffer=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            BatchLoader(path, device="cuda")


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_with_worker_processes(cache, context):
    path, originals = cache
    ds = PorderDataset(path, output="float", restore=True)
    ds[0]                        # the parent holds an open handle before the workers start
    loader = DataLoader(ds, batch_size=6, num_workers=2, multiprocessing_context=context)
    xs, ys = zip(*loader)
    x, y = torch.cat(xs), torch.cat(ys)
    want = (chw(originals["train"]).float() - torch.tensor(ds.mean, dtype=torch.float32)
            .view(1, 3, 1, 1)) / torch.tensor(ds.std, dtype=torch.float32).view(1, 3, 1, 1)
    assert torch.equal(x, want) and y.tolist() == ds.labels.tolist()
    assert ds[1][1] == ds.labels[1]                 # the parent's handle still works


def _with_handle_pid(x):
    """A transform: the image and whether the worker's dataset opened the file itself."""
    from torch.utils.data import get_worker_info

    ds = get_worker_info().dataset
    return x, torch.tensor([ds._pid == os.getpid(), ds._pid != PARENT_PID])


PARENT_PID = os.getpid()


def test_each_forked_worker_opens_its_own_handle(cache):
    path, _ = cache
    ds = PorderDataset(path, transform=_with_handle_pid)
    ds._open()                  # opened in the parent, then inherited by the forked workers
    assert ds._pid == PARENT_PID
    loader = DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context="fork")
    flags = torch.cat([xf[1] for xf, _ in loader])
    assert flags.shape == (40, 2) and bool(flags.all())


def test_pickling_drops_the_handle(cache):
    path, _ = cache
    ds = PorderDataset(path)
    a = ds[5]
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._h5 is None and torch.equal(copy[5][0], a[0])
    ds.close()
    assert torch.equal(ds[5][0], a[0])       # reopened on demand


# ------------------------------------------------------------------ BatchLoader
def dataset_tensors(path, split="train", **kw):
    ds = PorderDataset(path, split, **kw)
    return torch.stack([ds[i][0] for i in range(len(ds))]), torch.from_numpy(ds.labels)


@pytest.mark.parametrize("buffer", [None, 12, 1000])
def test_loader_in_order_matches_the_dataset(cache, buffer):
    path, _ = cache
    x, y = dataset_tensors(path, output="float")
    loader = BatchLoader(path, batch_size=16, buffer=buffer)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert [len(b[1]) for b in batches] == [16, 16, 8]
    assert torch.equal(torch.cat([b[0] for b in batches]), x)
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    assert batches[0][0].dtype == torch.float32 and batches[0][1].dtype == torch.int64
    dropped = BatchLoader(path, batch_size=16, buffer=buffer, drop_last=True)
    assert len(dropped) == 2 and [len(b[1]) for b in dropped] == [16, 16]


def test_loader_shuffle_is_train_s_epoch_order(cache):
    path, _ = cache
    x, y = dataset_tensors(path, output="uint8")
    loader = BatchLoader(path, batch_size=8, shuffle=True, seed=3, output="uint8")
    step = 0
    for _epoch in range(2):                      # 40 / 8: epoch e is train's steps 5e..5e+4
        for xb, yb in loader:
            idx = batch_indices(step, 40, 8, 3)
            assert torch.equal(xb, x[idx]) and torch.equal(yb, y[idx])
            step += 1
    loader.set_epoch(1)
    again = next(iter(loader))
    assert torch.equal(again[0], x[batch_indices(5, 40, 8, 3)])


def test_streamed_shuffle_visits_every_image_once(cache):
    path, _ = cache
    x, y = dataset_tensors(path, output="uint8")
    by_key = {row_key(x[i].numpy()): i for i in range(len(y))}
    assert len(by_key) == 40
    loader = BatchLoader(path, batch_size=6, shuffle=True, seed=1, buffer=10, output="uint8")
    epochs = []
    for _ in range(2):
        batches = list(loader)
        assert [len(b[1]) for b in batches] == [6] * 6 + [4]
        rows = [by_key[row_key(img.numpy())] for xb, _ in batches for img in xb]
        labels = torch.cat([b[1] for b in batches])
        assert sorted(rows) == list(range(40))
        assert torch.equal(labels, y[rows])          # labels travel with their images
        epochs.append(rows)
    assert epochs[0] != epochs[1] and epochs[0] != list(range(40))
    loader.set_epoch(0)
    assert [by_key[row_key(img.numpy())] for xb, _ in loader for img in xb] == epochs[0]


def test_loader_restore_and_uint8(cache):
    path, originals = cache
    for buffer in (None, 8):
        batches = list(BatchLoader(path, "test", batch_size=5, output="uint8", restore=True,
                                   buffer=buffer))
        got = torch.cat([b[0] for b in batches])
        assert got.dtype == torch.uint8 and torch.equal(got, chw(originals["test"]))


# ------------------------------------------------------------------ porder.load
def test_load(cache):
    path, originals = cache
    d = porder.load(path, "test")
    want = read_split(path, "test")
    assert np.array_equal(d.images, want["images"]) and np.array_equal(d.labels, want["labels"])
    assert np.array_equal(d.perm, want["perm"]) and d.perm.dtype == np.int64
    assert d.names.tolist() == want["names"] and isinstance(d.names, np.ndarray)
    assert d.classes == CLASSES and len(d) == 12 and d.split == "test"
    assert d.options["measure"] == "entropy" and d.options["patch"] == 4
    assert d.options["image_size"] == 16 and d.options["bins"] == 256
    assert np.array_equal(d.originals(), originals["test"])
    assert d["labels"] is d.labels
    with pytest.raises(StoreError, match="split='val'"):
        porder.load(path, "val")


def test_import_porder_is_light_and_exposes_the_readme_api(cache):
    path, _ = cache
    code = (
        "import sys, porder\n"
        "assert 'torch' not in sys.modules and 'h5py' not in sys.modules\n"
        f"d = porder.store.read_split({str(path)!r}, 'train')\n"
        f"s = porder.load({str(path)!r})\n"
        "assert 'torch' not in sys.modules\n"
        "print(len(d['labels']), len(s), porder.data.PorderDataset.__name__)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": ""}, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["40", "40", "PorderDataset"]


# ------------------------------------------------------------------ torch through reorder
def photo_like(n=6, size=32, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, size // 8, size // 8, 3)).astype(np.uint8)
    noise = rng.integers(0, 40, (n, size, size, 3))
    return np.clip(base.repeat(8, 1).repeat(8, 2) + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("measure", ["mi", "entropy", "random"])
def test_reorder_takes_and_returns_cpu_tensors(measure):
    imgs = photo_like()
    want, want_perm = porder.reorder(imgs, measure, 8, seed=2)
    out, perm = porder.reorder(torch.from_numpy(imgs), measure, 8, seed=2)
    assert isinstance(out, torch.Tensor) and isinstance(perm, torch.Tensor)
    assert out.dtype == torch.uint8 and perm.dtype == torch.int64
    assert np.array_equal(out.numpy(), want) and np.array_equal(perm.numpy(), want_perm)
    back = porder.restore_images(out, perm, 8)
    assert isinstance(back, torch.Tensor) and np.array_equal(back.numpy(), imgs)


def test_cpu_tensors_are_read_without_a_copy():
    t = torch.from_numpy(photo_like(2))
    arr, back = from_torch(t)
    assert isinstance(arr, np.ndarray) and arr.ctypes.data == t.data_ptr()
    strided = t[:, ::2, ::2]          # a non-contiguous view: still no copy
    arr2, _ = from_torch(strided)
    assert arr2.ctypes.data == strided.data_ptr() and np.array_equal(arr2, strided.numpy())
    assert from_torch(arr)[0] is arr      # anything else passes through
    out, _ = porder.reorder(strided, "l1", 4)
    assert np.array_equal(out.numpy(), porder.reorder(strided.numpy(), "l1", 4)[0])


def test_reorder_rejects_lists_and_non_arrays():
    imgs = list(photo_like(3))
    with pytest.raises(ValueError, match=r"list of 3 images; stack them into one uint8 array "
                                         r"of shape \(N, S, S, C\)"):
        porder.reorder(imgs, "mi", 8)
    with pytest.raises(ValueError, match="tuple of 3"):
        porder.reorder(tuple(imgs), "mi", 8)
    with pytest.raises(ValueError, match="must be a uint8 array.*got str"):
        porder.reorder("images.png", "mi", 8)
    with pytest.raises(ValueError, match="must be uint8, got dtype float32"):
        porder.reorder(torch.zeros(1, 32, 32, 3), "mi", 8)


def test_restore_with_the_wrong_patch_size_is_an_error():
    imgs = photo_like(2)
    out, perm = porder.reorder(imgs, "entropy", 8)          # K = 16
    with pytest.raises(ValueError, match=r"perm has 16 patches per image, but patch=4 cuts "
                                         r"32x32 images into 64; .*it fits patch=8"):
        porder.restore_images(out, perm, 4)
    with pytest.raises(ValueError, match="perm has 16 patches per image, but patch=16"):
        permute_images(out, perm, 16)
    with pytest.raises(ValueError, match=r"perm must have shape \(N, K\) = \(2, 16\)"):
        porder.restore_images(out, perm[:1], 8)
    assert np.array_equal(porder.restore_images(out, perm, 8), imgs)


@pytest.mark.gpu
def test_reorder_cuda_tensors_stay_on_the_gpu():
    from porder.backend import cuda_available

    if not (torch.cuda.is_available() and cuda_available()):
        pytest.skip("needs torch with CUDA and CuPy with a CUDA GPU")
    imgs = photo_like(8)
    t = torch.from_numpy(imgs).cuda()
    arr, _ = from_torch(t)
    assert arr.data.ptr == t.data_ptr()                       # CuPy view, no copy
    for measure in ("mi", "ssim", "entropy"):
        out, perm = porder.reorder(t, measure, 8)
        want, want_perm = porder.reorder(imgs, measure, 8)
        assert out.device == t.device and perm.device == t.device
        assert np.array_equal(out.cpu().numpy(), want)
        assert np.array_equal(perm.cpu().numpy(), want_perm)
        back = porder.restore_images(out, perm, 8)
        assert back.device == t.device and torch.equal(back, t)


@pytest.mark.gpu
def test_loader_on_cuda(cache):
    if not torch.cuda.is_available():
        pytest.skip("needs torch with CUDA")
    path, originals = cache
    x, y = dataset_tensors(path, output="float")
    for buffer in (None, 12):
        batches = list(BatchLoader(path, batch_size=16, device="cuda", buffer=buffer))
        assert all(b[0].is_cuda and b[1].is_cuda for b in batches)
        torch.testing.assert_close(torch.cat([b[0] for b in batches]).cpu(), x,
                                   rtol=1e-6, atol=1e-6)
        assert torch.equal(torch.cat([b[1] for b in batches]).cpu(), y)
    shuffled = list(BatchLoader(path, batch_size=8, device="cuda", shuffle=True, seed=3,
                                output="uint8", restore=True))
    idx = batch_indices(0, 40, 8, 3)
    assert torch.equal(shuffled[0][0].cpu(), chw(originals["train"])[idx])


# ------------------------------------------------------------------ torchvision conventions
def test_targets_classes_and_target_transform(cache):
    path, _ = cache
    want = read_split(path, "train")["labels"].tolist()
    ds = PorderDataset(path, target_transform=_one_hot_of_4)
    assert ds.targets == want and all(type(t) is int for t in ds.targets)
    assert ds.classes == CLASSES and ds.class_to_idx == {c: i for i, c in enumerate(CLASSES)}
    x, y = ds[3]
    assert torch.equal(y, _one_hot_of_4(want[3])) and x.dtype == torch.uint8
    # a plain int without target_transform, as before
    assert PorderDataset(path)[3][1] == want[3]
    pickle.loads(pickle.dumps(ds))                 # a module-level target_transform travels


def _one_hot_of_4(label: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(label), 4)


def _record_dtype(x):
    """A transform that says what it was given (a photometric step would see this)."""
    assert x.dtype == torch.uint8 and x.shape == (3, 16, 16), (x.dtype, x.shape)
    return 255 - x                                 # a photometric transform: invert


class _Compose:
    """torchvision.transforms.Compose, without torchvision."""

    def __init__(self, steps):
        self.steps = steps

    def __call__(self, x):
        for step in self.steps:
            x = step(x)
        return x


def test_photometric_transforms_see_uint8_and_normalize_comes_after(cache):
    from porder.data import Normalize
    from porder.transforms import Normalize as FromTransforms

    path, _ = cache
    assert FromTransforms is Normalize
    plain = PorderDataset(path, output="float")
    norm = Normalize.from_file(path)
    assert norm.mean == tuple(plain.mean) and norm.std == tuple(plain.std)
    assert repr(norm).startswith("Normalize(mean=(")
    # identity + Normalize is output='float', bit for bit
    same = PorderDataset(path, transform=_Compose([norm]))
    for i in (0, 7, 39):
        assert torch.equal(same[i][0], plain[i][0])
    # a photometric step on the uint8 image, then the file's normalisation
    ds = PorderDataset(path, transform=_Compose([_record_dtype, norm]))
    raw = chw(read_split(path, "train")["images"])[7]
    assert torch.equal(ds[7][0], norm(255 - raw))
    assert torch.equal(norm(torch.stack([raw, raw])), torch.stack([norm(raw)] * 2))  # batches
    copy = pickle.loads(pickle.dumps(norm))
    assert torch.equal(copy(raw), norm(raw)) and repr(copy) == repr(norm)
    with pytest.raises(ValueError, match=r"Normalize takes a tensor \(3, H, W\)"):
        norm(raw.numpy())
    with pytest.raises(ValueError, match="3 values each"):
        Normalize((1, 2), (1, 1))


# ------------------------------------------------------------------ DDP shares
@pytest.mark.parametrize("buffer", [None, 12])
@pytest.mark.parametrize("world_size,batch_size,drop_last",
                         [(2, 8, False), (3, 7, False), (4, 16, True), (3, 6, False)])
def test_ranks_share_every_batch_exactly_once(cache, buffer, world_size, batch_size, drop_last):
    path, _ = cache
    kw = dict(batch_size=batch_size, shuffle=True, seed=5, output="uint8", buffer=buffer,
              drop_last=drop_last)
    single = BatchLoader(path, **kw)
    ranks = [BatchLoader(path, rank=r, world_size=world_size, **kw) for r in range(world_size)]
    x, _ = dataset_tensors(path, output="uint8")
    by_key = {row_key(x[i].numpy()): i for i in range(len(x))}
    for _epoch in range(2):                       # same epoch order for every rank, each epoch
        whole_batches = list(single)
        shares = [list(loader) for loader in ranks]
        seen = sorted(by_key[row_key(img.numpy())] for s in shares for xb, _ in s for img in xb)
        covered = len(single) * batch_size if drop_last else 40
        assert len(seen) == covered and len(set(seen)) == covered     # each image at most once
        assert all(len(s) == len(whole_batches) == len(single) for s in shares)
        for j, (xb, yb) in enumerate(whole_batches):
            parts = [s[j] for s in shares]
            sizes = [len(p[1]) for p in parts]
            assert max(sizes) - min(sizes) <= 1    # shard_range: as even as can be
            assert torch.equal(torch.cat([p[0] for p in parts]), xb)   # disjoint, complete
            assert torch.equal(torch.cat([p[1] for p in parts]), yb)


def test_ranks_get_porder_train_s_shares(cache):
    path, _ = cache
    x, y = dataset_tensors(path, output="uint8")
    for rank in range(4):
        loader = BatchLoader(path, batch_size=8, shuffle=True, seed=3, output="uint8",
                             rank=rank, world_size=4)
        assert "rank=%d of 4" % rank in repr(loader)
        for step, (xb, yb) in enumerate(loader):
            idx = batch_indices(step, 40, 8, 3, rank=rank, world_size=4)
            assert torch.equal(xb, x[idx]) and torch.equal(yb, y[idx])


def test_ranks_default_from_torch_distributed(cache, monkeypatch):
    path, _ = cache
    loader = BatchLoader(path, batch_size=8)
    assert (loader.rank, loader.world_size) == (0, 1)
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 2)
    monkeypatch.setattr(dist, "get_world_size", lambda: 3)
    loader = BatchLoader(path, batch_size=9, output="uint8")
    assert (loader.rank, loader.world_size) == (2, 3)
    assert [len(b[1]) for b in loader] == [3] * 4 + [2]        # 40 = 4 * 9 + 4: shares 1,1,2
    assert BatchLoader(path, batch_size=9, rank=0, world_size=1).world_size == 1


def test_bad_rank_arguments(cache):
    path, _ = cache
    with pytest.raises(ValueError, match="pass both rank= and world_size=, or neither"):
        BatchLoader(path, rank=1)
    with pytest.raises(ValueError, match="rank=2 must be below world_size=2"):
        BatchLoader(path, rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size must be at least 1, got 0"):
        BatchLoader(path, rank=0, world_size=0)
    with pytest.raises(ValueError, match="rank must be an integer, got 0.5"):
        BatchLoader(path, rank=0.5, world_size=2)


# ------------------------------------------------------------------ numbers that are not integers
@pytest.mark.parametrize("kw,message", [
    (dict(batch_size=1.5), "batch_size must be an integer, got 1.5"),
    (dict(batch_size=True), "batch_size must be an integer, got True"),
    (dict(batch_size="8"), "batch_size must be an integer, got '8'"),
    (dict(buffer=2.5), "buffer must be an integer, got 2.5"),
    (dict(buffer=False), "buffer must be an integer, got False"),
    (dict(seed=1.5), "seed must be an integer, got 1.5"),
    (dict(seed=-1), "seed must be at least 0, got -1"),
    (dict(rank=np.float32(1), world_size=2), "rank must be an integer"),
])
def test_loader_refuses_numbers_that_are_not_integers(cache, kw, message):
    path, _ = cache
    with pytest.raises(ValueError, match=f"^{re.escape(message)}") as e:
        BatchLoader(path, **kw)
    assert "\n" not in str(e.value)


def test_integer_arguments_of_the_readers(cache):
    from porder.store import iter_split

    path, _ = cache
    loader = BatchLoader(path, batch_size=np.int64(16), buffer=np.int32(8), seed=np.uint8(2))
    assert (loader.batch_size, loader.buffer, loader.seed) == (16, 8, 2)
    assert type(loader.batch_size) is int
    with pytest.raises(ValueError, match="^epoch must be an integer, got 1.5$"):
        loader.set_epoch(1.5)
    with pytest.raises(ValueError, match="^epoch must be at least 0, got -1$"):
        loader.set_epoch(-1)
    with pytest.raises(ValueError, match="^rows must be an integer, got 2.5$"):
        next(iter_split(path, rows=2.5))
    with pytest.raises(ValueError, match="^start must be an integer, got 1.5$"):
        next(iter_split(path, start=1.5))
    with pytest.raises(ValueError, match="^stop must be an integer, got 4.0$"):
        read_split(path, stop=4.0)
    assert len(read_split(path, start=np.int64(38))["labels"]) == 2


# ------------------------------------------------------------------ a row read is a row checked
def _damaged(cache, tmp_path, name, edit):
    """A copy of the cache with ``edit(h5py.File)`` applied."""
    import h5py

    path, _ = cache
    out = tmp_path / name
    shutil.copy(path, out)
    with h5py.File(out, "r+") as f:
        edit(f)
    return out


def _perm_duplicate(split, row):
    def edit(f):
        v = f[f"{split}/perm"][row]
        v[1] = v[0]                                     # patch v[0] twice, v[1] never
        f[f"{split}/perm"][row] = v
    return edit


def _perm_out_of_range(split, row, value):
    def edit(f):
        v = f[f"{split}/perm"][row]
        v[5] = value
        f[f"{split}/perm"][row] = v
    return edit


@pytest.mark.parametrize("value", [-1, 3, 99])
def test_dataset_refuses_a_label_outside_the_classes(cache, tmp_path, value):
    import h5py

    path = _damaged(cache, tmp_path, "labels.h5", lambda f: None)
    with h5py.File(path, "r+") as f:            # a signed dtype, so that -1 is stored as -1
        labels = f["train/labels"][()].astype(np.int64)
        del f["train/labels"]
        labels[13] = value
        f.create_dataset("train/labels", data=labels)
    message = (rf"^'{path}': label {value} of /train row 13 is outside 0\.\.2 "
               rf"\(the file has 3 classes\)$")
    for make in (lambda: PorderDataset(path), lambda: PorderDataset(path, restore=True),
                 lambda: PorderDataset(path, output="float")):
        with pytest.raises(StoreError, match=message):
            make()
    for buffer in (None, 8, 100):                 # every way the BatchLoader reads
        with pytest.raises(StoreError, match=message):
            list(BatchLoader(path, batch_size=4, buffer=buffer, output="uint8"))
    assert PorderDataset(path, "test").targets    # the other split is sound


@pytest.mark.parametrize("damage", ["duplicate", "out-of-range", "max"])
def test_restore_refuses_a_perm_row_that_is_not_a_permutation(cache, tmp_path, damage):
    path, originals = cache
    edit = {"duplicate": _perm_duplicate("test", 7),
            "out-of-range": _perm_out_of_range("test", 7, 16),
            "max": _perm_out_of_range("test", 7, 255)}[damage]
    bad = _damaged(cache, tmp_path, f"{damage}.h5", edit)
    message = rf"^'{bad}': /test/perm row 7 is not a permutation of 0\.\.15 \(the file is damaged\)$"
    ds = PorderDataset(bad, "test", restore=True)          # made: rows are checked when read
    for i in (0, 6, 8, 11):                                # the sound rows read as before
        assert torch.equal(ds[i][0], chw(originals["test"])[i])
    with pytest.raises(StoreError, match=message):
        ds[7]
    with pytest.raises(StoreError, match=message):
        ds[-5]
    assert torch.equal(PorderDataset(bad, "test")[7][0],   # without restore perm is not read
                       chw(read_split(path, "test")["images"])[7])
    for buffer in (None, 4, 100):
        with pytest.raises(StoreError, match=message):
            list(BatchLoader(bad, "test", batch_size=4, buffer=buffer, restore=True))
    loader = DataLoader(ds, batch_size=4, num_workers=0)
    with pytest.raises(StoreError, match=message):
        list(loader)


def test_an_unreadable_image_is_one_store_error(cache, tmp_path):
    path, _ = cache
    ds = PorderDataset(path)
    ds[0]

    class Broken:
        def __getitem__(self, i):
            raise OSError("Can't read data (inflate() failed)\nmore HDF5 detail")

    ds._images = Broken()
    with pytest.raises(StoreError, match=rf"^cannot read '{path}': Can't read data \(inflate\(\) "
                                         rf"failed\) \(the file is damaged or not a porder file\)$"):
        ds[1]


def test_streamed_blocks_join_small_chunks(tmp_path):
    """A streamed block is whole chunks: one chunk of 1 MiB or more (32x32 files, as before),
    several when chunks are small (files above 32x32 keep chunks within 1 MiB)."""
    import h5py

    from porder.data import STREAM_BLOCK_BYTES, _block_rows

    with h5py.File(tmp_path / "c.h5", "w") as f:
        big = f.create_dataset("a", (4096, 32, 32, 3), np.uint8, chunks=(512, 32, 32, 3))
        small = f.create_dataset("b", (600, 224, 224, 3), np.uint8, chunks=(6, 224, 224, 3))
        assert _block_rows(big) == 512
        rows = _block_rows(small)
        assert rows % 6 == 0 and rows > 6
        assert rows * 224 * 224 * 3 <= STREAM_BLOCK_BYTES

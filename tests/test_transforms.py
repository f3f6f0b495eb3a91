"""porder.transforms.PatchOrder: POR on the fly, exactly the cache's images.

The reference is a cache built by ``build_cache`` (what ``porder reorder`` runs):
the transform applied to a cached image's original (recovered through ``perm``)
must give the stored image, pixel for pixel, whatever the input's kind.
"""
from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import porder
from porder.data import PorderDataset
from porder.patches import permute_images
from porder.pipeline import CacheSpec, build_cache
from porder.transforms import PatchOrder

from .test_data import REPO

# (measure, options of the build): a standalone measure, pairwise ones with every option
# the transform takes, and the random control (its per-image key).
BUILDS = {
    "entropy": dict(measure="entropy"),
    "mi": dict(measure="mi", bins=16, reference=5, descending=False),
    "l1": dict(measure="l1", reference=15),
    "random": dict(measure="random", seed=7),
}


def build(name: str, folder):
    """(path, originals (N, 16, 16, 3), stored (N, 16, 16, 3), options) of one cache."""
    opts = BUILDS[name]
    out = folder / f"{name}.h5"
    build_cache(CacheSpec("synthetic:20", out, size=16, patch=4, workers=1, **opts))
    split = porder.load(out, "train")
    return out, split.originals(), split.images, opts


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """caches(name): :func:`build`, once per name."""
    folder, made = tmp_path_factory.mktemp("po"), {}

    def get(name):
        if name not in made:
            made[name] = build(name, folder)
        return made[name]
    return get


@pytest.fixture(scope="module", params=sorted(BUILDS))
def built(request, caches):
    return caches(request.param)


class Compose:
    """torchvision.transforms.Compose without torchvision: a chain of callables."""

    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


def pil_to_tensor(img) -> torch.Tensor:
    """torchvision's PILToTensor: (3, H, W) uint8."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


def explicit(opts, **kw) -> PatchOrder:
    return PatchOrder(opts["measure"], 4, bins=opts.get("bins", 256),
                      reference=opts.get("reference", 0), descending=opts.get("descending"),
                      seed=opts.get("seed", 0), **kw)


def test_patch_order_gives_the_cache_s_images(built):
    path, originals, stored, opts = built
    n = len(stored)
    for t in (PatchOrder.from_file(path), explicit(opts), explicit(opts, backend="generic")):
        for i in range(n):
            x = torch.from_numpy(originals[i]).permute(2, 0, 1)          # (3, S, S) CHW
            got = t(x, index=i)
            assert got.dtype == torch.uint8 and got.shape == (3, 16, 16)
            assert torch.equal(got.permute(1, 2, 0), torch.from_numpy(stored[i])), i
            assert np.array_equal(t(originals[i], index=i), stored[i])   # (S, S, 3) HWC
            pil = t(Image.fromarray(originals[i]), index=i)
            assert isinstance(pil, Image.Image) and pil.mode == "RGB"
            assert np.array_equal(np.asarray(pil), stored[i])
        # batches: image j of a batch is dataset image index + j
        assert np.array_equal(t(originals), stored)                       # (N, S, S, 3)
        nchw = torch.from_numpy(originals).permute(0, 3, 1, 2)
        assert torch.equal(t(nchw[5:], index=5), torch.from_numpy(stored[5:]).permute(0, 3, 1, 2))


def test_patch_order_in_a_compose_of_pil_images(built):
    path, originals, stored, opts = built
    if opts["measure"] == "random":
        pytest.skip("a Compose passes no index: 'random' gives index 0's order to every image")
    pipeline = Compose([lambda im: im.convert("RGB"), pil_to_tensor, PatchOrder.from_file(path)])
    for i in (0, 9, len(stored) - 1):
        assert torch.equal(pipeline(Image.fromarray(originals[i])),
                           torch.from_numpy(stored[i]).permute(2, 0, 1))


def test_random_keys_each_image_by_seed_and_index(caches):
    path, originals, stored, _ = caches("random")
    t = PatchOrder.from_file(path)
    assert t.seed == 7
    assert not np.array_equal(t(originals[3]), stored[3])        # index 0's order, not 3's
    assert np.array_equal(t(originals[3], index=3), stored[3])
    other = PatchOrder("random", 4, seed=8)
    assert not np.array_equal(other(originals[3], index=3), stored[3])
    # without an index every image gets the same permutation
    _, perm0 = porder.reorder(originals[:1], "random", 4, seed=7)
    for i in (1, 2):
        assert np.array_equal(t(originals[i]), permute_images(originals[i:i + 1], perm0, 4)[0])


def test_patch_order_in_spawned_dataloader_workers(caches):
    path, _, stored, _ = caches("mi")
    ds = PorderDataset(path, restore=True, transform=PatchOrder.from_file(path))
    copy = pickle.loads(pickle.dumps(ds.transform))
    assert repr(copy) == repr(ds.transform)
    loader = DataLoader(ds, batch_size=8, num_workers=1, multiprocessing_context="spawn")
    got = torch.cat([x for x, _ in loader])
    assert torch.equal(got, torch.from_numpy(stored).permute(0, 3, 1, 2))


def test_repr_like_torchvision():
    t = PatchOrder("mi", 8, bins=64, reference=3, descending=True, seed=2, backend="generic")
    assert repr(t) == ("PatchOrder(measure='mi', patch=8, bins=64, reference=3, descending=True,"
                       " seed=2, backend='generic')")
    assert repr(PatchOrder(porder.get_measure("ssim"), 4)).startswith(
        "PatchOrder(measure='ssim', patch=4, bins=256, reference=0, descending=None, seed=0")
    assert repr(pickle.loads(pickle.dumps(t))) == repr(t)


def test_no_torch_or_torchvision_is_imported():
    code = ("import sys, numpy as np\n"
            "from porder.transforms import PatchOrder\n"
            "out = PatchOrder('entropy', 4)(np.zeros((8, 8, 3), np.uint8))\n"
            "assert out.shape == (8, 8, 3)\n"
            "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": ""}, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["[]"]


def test_pil_modes_follow_porder_s_conversion_rule():
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    im = Image.fromarray(rgba, "RGBA")
    t = PatchOrder("entropy", 4)
    # composited on black, as porder reorder converts files: channels * alpha / 255
    from porder.sources.pillow import to_rgb

    want = np.asarray(to_rgb(im))
    assert np.array_equal(np.asarray(t(im)), porder.reorder(want[None], "entropy", 4)[0][0])
    grey = Image.fromarray(rgba[..., 0], "L")
    assert np.asarray(t(grey)).shape == (16, 16, 3)


@pytest.mark.parametrize("make,message", [
    (lambda: PatchOrder("nope", 4), "unknown measure 'nope'"),
    (lambda: PatchOrder("mi", 1.5), "patch must be an integer, got 1.5"),
    (lambda: PatchOrder("mi", 0), "patch must be at least 1, got 0"),
    (lambda: PatchOrder("mi", 4, bins=True), "bins must be an integer from 1 to 256, got True"),
    (lambda: PatchOrder("mi", 4, bins=300), "bins must be an integer from 1 to 256, got 300"),
    (lambda: PatchOrder("mi", 4, reference=-1), "reference must be at least 0, got -1"),
    (lambda: PatchOrder("mi", 4, seed=0.5), "seed must be an integer, got 0.5"),
    (lambda: PatchOrder("mi", 4, descending="yes"), "descending must be True, False or None"),
    (lambda: PatchOrder("mi", 4, backend="fast"), "backend='fast' is not one of"),
])
def test_bad_options(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("image,message", [
    (torch.zeros(3, 16, 16), r"orders uint8 images .* got dtype torch.float32"),
    (np.zeros((16, 16, 3), np.float64), "got dtype float64"),
    (torch.zeros(3, 16, 12, dtype=torch.uint8), r"square images; got \(C, H, W\) \(3, 16, 12\)"),
    (np.zeros((16, 12, 3), np.uint8), r"square images; got \(H, W, C\) \(16, 12, 3\)"),
    (torch.zeros(16, 16, dtype=torch.uint8), r"a tensor \(C, S, S\) or \(N, C, S, S\)"),
    (torch.zeros(3, 18, 18, dtype=torch.uint8), "patch size 4 does not divide"),
    ([np.zeros((16, 16, 3), np.uint8)], "got a list; stack the images first"),
    ("img.png", "got str"),
    (Image.new("RGB", (16, 12)), "a PIL image of 16x12"),
])
def test_bad_images(image, message):
    with pytest.raises(ValueError, match=message) as e:
        PatchOrder("entropy", 4)(image)
    assert "\n" not in str(e.value)


def test_bad_index():
    t = PatchOrder("random", 4)
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="index must be at least 0, got -1"):
        t(img, index=-1)
    with pytest.raises(ValueError, match="index must be an integer, got 1.5"):
        t(img, index=1.5)


@pytest.mark.gpu
def test_patch_order_on_cuda_tensors():
    if not torch.cuda.is_available():
        pytest.skip("needs torch with CUDA")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    for measure in ("mi", "entropy"):
        t = PatchOrder(measure, 8)
        want = torch.from_numpy(t(x)).permute(0, 3, 1, 2)
        got = t(torch.from_numpy(x).permute(0, 3, 1, 2).cuda())
        assert got.is_cuda and torch.equal(got.cpu(), want)

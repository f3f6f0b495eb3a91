"""porder.nn.PatchReorder: POR of feature maps inside a network.

References: :func:`porder.reorder` on the equivalent uint8 images (the layer
must order exactly as porder orders images), plain NumPy index arithmetic for
the patch gather and the quantisation formula, and autograd's gradcheck.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import porder
from porder.backend import cuda_available
from porder.nn import PatchReorder, channel_indices, histogram_input, insert_after, permute_patches, quantise

PAIRWISE = [m for m, e in porder.MEASURES.items() if e.kind == "pairwise"]
STANDALONE = [m for m, e in porder.MEASURES.items() if e.kind == "standalone"]


def full_range_images(n, s, c, seed=0):
    """uint8 images (N, S, S, C) whose every channel has min 0 and max 255 (twice each)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:s, 0:s] / s
    img = (rng.uniform(0, 255, (n, 1, 1, c)) + rng.uniform(-90, 90, (n, 1, 1, c)) * x[None, ..., None]
           + rng.uniform(-90, 90, (n, 1, 1, c)) * y[None, ..., None] + rng.normal(0, 25, (n, s, s, c)))
    img = np.clip(img, 0, 255).astype(np.uint8)
    flat = img.reshape(n, s * s, c)
    for i in range(n):
        for ch in range(c):
            pos = rng.choice(s * s, 4, replace=False)
            flat[i, pos[:2], ch] = 0
            flat[i, pos[2:], ch] = 255
    return flat.reshape(n, s, s, c)


def as_map(images, dtype=torch.float32):
    """uint8 (N, S, S, C) NumPy -> real tensor (N, C, S, S)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).to(dtype).contiguous()


def numpy_permute_patches(x, perm, p):
    """Reference gather written with explicit loops over patches: (N, C, S, S) NumPy."""
    n, c, s, _ = x.shape
    g = s // p
    out = np.empty_like(x)
    for i in range(n):
        for j in range(g * g):
            src = int(perm[i, j])
            r, q = divmod(j, g)
            sr, sq = divmod(src, g)
            out[i, :, r * p:(r + 1) * p, q * p:(q + 1) * p] = x[i, :, sr * p:(sr + 1) * p,
                                                                 sq * p:(sq + 1) * p]
    return out


# ------------------------------------------------------------------ quantise


def test_quantise_matches_formula():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 3, (3, 4, 6, 6))
    x[1, 2] = 7.5  # a constant channel
    q = quantise(torch.from_numpy(x)).numpy()
    lo = x.min(axis=(2, 3), keepdims=True)
    hi = x.max(axis=(2, 3), keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ref = np.minimum(np.floor((x - lo) * 256 / (hi - lo)), 255)
    ref = np.where(hi > lo, ref, 0).astype(np.uint8)
    assert q.dtype == np.uint8
    np.testing.assert_array_equal(q, ref)
    assert (q[1, 2] == 0).all()
    assert q[0, 0].min() == 0 and q[0, 0].max() == 255


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int32])
def test_quantise_is_identity_on_full_range_uint8(dtype):
    images = full_range_images(4, 8, 3)
    q = quantise(as_map(images, dtype)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(q, images)


def test_quantise_is_affine_invariant():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    np.testing.assert_array_equal(quantise(x).numpy(), quantise(x * 4 + 10).numpy())


def test_quantise_rejects_non_finite():
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantise(x)


# ------------------------------------------------------------------ channels


def test_channel_indices():
    assert channel_indices("all", 5) == [0, 1, 2, 3, 4]
    assert channel_indices("mean", 5) is None
    assert channel_indices(4, 8) == [0, 2, 4, 6]
    assert channel_indices(3, 64) == [0, 21, 42]
    assert channel_indices(1, 7) == [0]
    assert channel_indices((5, 1), 8) == [5, 1]
    with pytest.raises(ValueError, match="more channels than the map has"):
        channel_indices(9, 8)
    with pytest.raises(ValueError, match="out of range"):
        channel_indices([0, 8], 8)
    for bad in ("max", 0, -1, [], [1, 1], [0.5], True):
        with pytest.raises(ValueError, match="channel"):
            channel_indices(bad, 8)


def test_histogram_input_layouts():
    images = full_range_images(2, 8, 4)
    x = as_map(images)
    np.testing.assert_array_equal(histogram_input(x, "all").numpy(), images)
    np.testing.assert_array_equal(histogram_input(x, 2).numpy(), images[..., ::2])
    np.testing.assert_array_equal(histogram_input(x, [3]).numpy(), images[..., 3:])
    mean = histogram_input(x, "mean")
    assert mean.shape == (2, 8, 8, 1) and mean.dtype == torch.uint8
    np.testing.assert_array_equal(mean[..., 0].numpy(), quantise(x.mean(1, keepdim=True))[:, 0].numpy())


# ------------------------------------------------------------------ the gather


@pytest.mark.parametrize("s,p", [(8, 2), (8, 4), (12, 3), (4, 4)])
def test_permute_patches_matches_loops(s, p):
    rng = np.random.default_rng(s * p)
    x = rng.normal(size=(3, 2, s, s))
    k = (s // p) ** 2
    perm = np.stack([rng.permutation(k) for _ in range(3)])
    out = permute_patches(torch.from_numpy(x), torch.from_numpy(perm), p).numpy()
    np.testing.assert_array_equal(out, numpy_permute_patches(x, perm, p))


def test_permute_patches_matches_porder_on_images():
    images = full_range_images(3, 16, 3)
    perm = np.stack([np.random.default_rng(i).permutation(16) for i in range(3)])
    ref = porder.merge(porder.apply_perm(porder.split(images, 4), perm))  # (N, S, S, C)
    out = permute_patches(as_map(images), torch.from_numpy(perm), 4)
    np.testing.assert_array_equal(out.permute(0, 2, 3, 1).to(torch.uint8).numpy(), ref)


def test_permute_patches_gradcheck_fixed_perm():
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    perm = torch.tensor([[3, 0, 2, 1], [1, 2, 3, 0]])
    assert torch.autograd.gradcheck(lambda t: permute_patches(t, perm, 4), (x,))
    assert torch.autograd.gradgradcheck(lambda t: permute_patches(t, perm, 4), (x,))


def test_permute_patches_bad_perm_shape():
    with pytest.raises(ValueError, match="perm must have shape"):
        permute_patches(torch.zeros(2, 1, 8, 8), torch.zeros(2, 3, dtype=torch.int64), 4)


# ------------------------------------------------------------------ the layer vs porder.reorder


@pytest.mark.parametrize("measure", PAIRWISE + STANDALONE)
def test_permutation_equals_porder_reorder(measure):
    images = full_range_images(5, 16, 3, seed=2)
    layer = PatchReorder(measure, 4, channels="all")
    y = layer(as_map(images))
    ref_images, ref_perm = porder.reorder(images, measure, 4)
    np.testing.assert_array_equal(layer.last_perm.numpy(), ref_perm)
    np.testing.assert_array_equal(y.permute(0, 2, 3, 1).to(torch.uint8).numpy(), ref_images)


@pytest.mark.parametrize("channels", ["mean", 1, 2, (2, 0)])
def test_channel_options_equal_porder_reorder(channels):
    images = full_range_images(4, 16, 4, seed=3)
    x = as_map(images)
    perm = PatchReorder("mi", 4, channels=channels).permutation(x)
    if channels == "mean":
        # the reference: porder's own quantiser path on the mean map, written from the formula
        m = images.astype(np.float64).mean(axis=3)
        lo, hi = m.min(axis=(1, 2), keepdims=True), m.max(axis=(1, 2), keepdims=True)
        sub = np.minimum(np.floor((m - lo) * 256 / (hi - lo)), 255).astype(np.uint8)[..., None]
    elif channels == 1:
        sub = images[..., :1]
    elif channels == 2:
        sub = images[..., ::2]
    else:
        sub = images[..., [2, 0]]
    np.testing.assert_array_equal(perm.numpy(), porder.reorder(sub, "mi", 4)[1])


def test_options_reach_porder_reorder():
    images = full_range_images(3, 16, 3, seed=4)
    x = as_map(images)
    for kw in ({"reference": 5}, {"descending": False}, {"bins": 16}):
        perm = PatchReorder("mi", 4, channels="all", **kw).permutation(x)
        np.testing.assert_array_equal(perm.numpy(), porder.reorder(images, "mi", 4, **kw)[1])
    perm = PatchReorder("mi", 8, channels="all").permutation(x)
    np.testing.assert_array_equal(perm.numpy(), porder.reorder(images, "mi", 8)[1])


def test_real_photographs_equal_porder_reorder(real_images):
    images = real_images.copy()  # (12, 32, 32, 3)
    flat = images.reshape(12, -1, 3)
    flat[:, :2] = 0  # stretch every channel to the full range so quantisation is the identity
    flat[:, 2:4] = 255
    x = as_map(images, torch.float64) / 255.0 * 3.0 - 1.0  # any affine map of the image
    layer = PatchReorder("mi", 8, channels="all")
    np.testing.assert_array_equal(layer.permutation(x).numpy(), porder.reorder(images, "mi", 8)[1])


# ------------------------------------------------------------------ controls and determinism


def test_none_is_identity():
    x = torch.randn(3, 5, 8, 8, requires_grad=True)
    layer = PatchReorder("none", 4)
    assert layer(x) is x
    np.testing.assert_array_equal(layer.permutation(x).numpy(), np.tile(np.arange(4), (3, 1)))


def test_random_is_seeded_and_deterministic():
    x = torch.randn(6, 2, 16, 16)
    a = PatchReorder("random", 4, seed=3).permutation(x)
    b = PatchReorder("random", 4, seed=3).permutation(torch.randn(6, 2, 16, 16))
    c = PatchReorder("random", 4, seed=4).permutation(x)
    np.testing.assert_array_equal(a.numpy(), b.numpy())  # independent of the values
    assert not torch.equal(a, c)
    np.testing.assert_array_equal(a.numpy(), porder.reorder(np.zeros((6, 16, 16, 1), np.uint8),
                                                            "random", 4, seed=3)[1])
    assert all(sorted(r) == list(range(16)) for r in a.tolist())


def test_deterministic_across_calls_and_batching():
    x = torch.randn(8, 6, 16, 16)
    layer = PatchReorder("mi", 4, channels=3)
    y1, y2 = layer(x), layer(x)
    assert torch.equal(y1, y2)
    halves = torch.cat([layer(x[:3]), layer(x[3:])])
    assert torch.equal(y1, halves)


@pytest.mark.parametrize("shape,patch", [((2, 3, 8, 8), 4), ((1, 1, 16, 16), 8), ((4, 7, 12, 12), 3),
                                         ((0, 3, 8, 8), 4)])
def test_shapes_and_dtype_preserved(shape, patch):
    x = torch.randn(shape, dtype=torch.float64)
    y = PatchReorder("l1", patch, channels="all")(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    # a permutation of patches keeps the multiset of values of each sample
    for a, b in zip(x, y):
        assert torch.equal(a.flatten().sort().values, b.flatten().sort().values)


def test_eval_switch():
    x = torch.randn(2, 3, 8, 8)
    layer = PatchReorder("random", 4, seed=1)
    y_train = layer.train()(x)
    assert torch.equal(layer.eval()(x), y_train)  # default: the same operation in eval
    off = PatchReorder("random", 4, seed=1, enabled_in_eval=False)
    assert off.eval()(x) is x
    assert torch.equal(off.train()(x), y_train)


# ------------------------------------------------------------------ gradients


def test_gradients_are_the_inverse_permutation():
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    layer = PatchReorder("mi", 4, channels="all")
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    inv = torch.argsort(layer.last_perm, dim=1)
    assert torch.equal(x.grad, permute_patches(g, inv, 4))
    np.testing.assert_array_equal(
        x.grad.numpy(), numpy_permute_patches(g.numpy(), inv.numpy(), 4))


@pytest.mark.parametrize("measure", ["mi", "random", "entropy"])
def test_gradcheck_layer(measure):
    # Integer-valued channels that hold 0 and 255 twice each: a +-1e-6 perturbation
    # of any value never changes its quantised level, so the permutation stays
    # fixed and the layer is linear around x.
    images = full_range_images(2, 8, 2, seed=5)
    x = as_map(images, torch.float64).requires_grad_()
    layer = PatchReorder(measure, 4, channels="all")
    perm = layer.permutation(x)
    assert not torch.equal(perm, torch.arange(4).expand(2, 4)) or measure == "entropy"
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-5)
    assert torch.equal(layer.last_perm, perm)


def test_trains_inside_sequential():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), PatchReorder("mi", 4, channels="mean"),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 4))
    x, t = torch.randn(16, 3, 16, 16), torch.randint(0, 4, (16,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), t)
        loss.backward()
        assert model[0].weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_permutation_is_not_differentiated():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    perm = PatchReorder("mi", 4).permutation(x)
    assert not perm.requires_grad and perm.dtype == torch.int64


# ------------------------------------------------------------------ insert_after


def test_insert_after_in_porder_resnet():
    import torch.nn.functional as F

    from porder.train.models import build_model

    torch.manual_seed(0)
    plain = build_model("resnet", num_classes=4, in_size=16, width=0.125).eval()
    model = build_model("resnet", num_classes=4, in_size=16, width=0.125)
    model.load_state_dict(plain.state_dict())
    insert_after(model, "stem", PatchReorder("mi", 4, channels="all"))
    insert_after(model, "layers.3", PatchReorder("entropy", 4))
    model.eval()
    assert not model.stem[1].training and isinstance(model.layers[3][1], PatchReorder)
    x = torch.randn(3, 3, 16, 16)
    h = PatchReorder("mi", 4, channels="all")(plain.stem(x))
    h = PatchReorder("entropy", 4)(plain.layers[:4](h))
    ref = plain.fc(torch.flatten(F.adaptive_avg_pool2d(plain.layers[4:](h), 1), 1))
    assert torch.allclose(model(x), ref, atol=1e-6)
    assert not torch.equal(model(x), plain(x))
    model.train()
    assert model.stem[1].training
    with pytest.raises(ValueError, match="no submodule 'stage9'.*stem"):
        insert_after(model, "stage9", PatchReorder())


# ------------------------------------------------------------------ bad inputs


def test_bad_inputs():
    layer = PatchReorder("mi", 4)
    with pytest.raises(ValueError, match="3-D tensor"):
        layer(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="does not divide"):
        layer(torch.zeros(1, 3, 10, 10))
    with pytest.raises(ValueError, match="square"):
        layer(torch.zeros(1, 3, 8, 16))
    with pytest.raises(ValueError, match="real-valued"):
        layer(torch.zeros(1, 3, 8, 8, dtype=torch.complex64))
    with pytest.raises(ValueError, match="torch.Tensor"):
        layer(np.zeros((1, 3, 8, 8)))
    with pytest.raises(ValueError, match="NaN"):
        layer(torch.full((1, 3, 8, 8), float("inf")))
    with pytest.raises(ValueError, match="more channels"):
        PatchReorder("mi", 4, channels=4)(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="reference patch 4 is out of range"):
        PatchReorder("mi", 4, reference=4)(torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize("kw,match", [
    ({"measure": "mutual"}, "unknown measure 'mutual'"),
    ({"patch": 0}, "patch size"),
    ({"patch": 2.0}, "patch size"),
    ({"bins": 0}, "bins"),
    ({"channels": "max"}, "channels"),
    ({"quantise": "zscore"}, "quantise"),
    ({"backend": "cuda"}, "backend"),
    ({"seed": -1}, "seed"),
    ({"reference": -1}, "reference"),
])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        PatchReorder(**kw)


def test_repr_names_the_options():
    assert "measure='kl', patch=8, channels=4" in repr(PatchReorder("kl", 8, channels=4))


# ------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device for torch")
@pytest.mark.parametrize("measure", ["mi", "entropy", "l1", "random"])
@pytest.mark.parametrize("channels", ["all", "mean", 2])
def test_cuda_matches_cpu(measure, channels):
    images = full_range_images(6, 16, 3, seed=6)
    layer = PatchReorder(measure, 4, channels=channels)
    xc = as_map(images).cuda().requires_grad_()
    y = layer(xc)
    perm = layer.last_perm
    assert y.device == xc.device and perm.device == xc.device and perm.dtype == torch.int64
    # ordered exactly as porder orders the layer's own uint8 image on the CPU
    hist = histogram_input(xc.detach(), channels)
    assert hist.device == xc.device
    ref = porder.reorder(hist.cpu().numpy(), measure, 4)[1]
    np.testing.assert_array_equal(perm.cpu().numpy(), ref)
    if channels != "mean":  # min/max quantisation is exact on both devices
        np.testing.assert_array_equal(hist.cpu().numpy(), histogram_input(as_map(images), channels))
        y_cpu = PatchReorder(measure, 4, channels=channels)(as_map(images))
        assert torch.equal(y.detach().cpu(), y_cpu)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(xc.grad, permute_patches(g, torch.argsort(perm, dim=1), 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device for torch")
@pytest.mark.parametrize("cupy", [True, False], ids=["cupy", "cpu-fallback"])
def test_cuda_float_maps_train(cupy, monkeypatch):
    if cupy and not cuda_available():
        pytest.skip("CuPy with a CUDA GPU is not available")
    if not cupy:
        monkeypatch.setattr("porder.nn.cuda_available", lambda: False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), PatchReorder("mi", 4, channels=4),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16 * 16, 4)).cuda()
    seen = []
    model[1].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    x, t = torch.randn(32, 3, 16, 16, device="cuda"), torch.randint(0, 4, (32,), device="cuda")
    loss = nn.functional.cross_entropy(model(x), t)
    loss.backward()
    assert model[0].weight.grad.abs().sum() > 0
    perm = model[1].last_perm
    assert perm.device == x.device
    hist = histogram_input(seen[0], 4).cpu().numpy()
    np.testing.assert_array_equal(perm.cpu().numpy(), porder.reorder(hist, "mi", 4)[1])

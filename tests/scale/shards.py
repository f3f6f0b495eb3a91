"""What the scale tests share: the source and options of every run, and the file comparison."""
from __future__ import annotations

import h5py
import numpy as np

from porder.pipeline import CacheSpec, build_cache
from porder.store import SPLITS, read_meta, read_split

SOURCE = "synthetic:103"
N = 4
OPTS = dict(measure="mi", patch=8, seed=3, workers=1)
RUN_KEYS = {"created"}  # root attributes that may differ between equal runs


def build(out, *, shard=None, batch_size=7, **kw):
    return build_cache(CacheSpec(SOURCE, out, shard=shard, batch_size=batch_size,
                                 **{**OPTS, **kw})).path


def _attrs(obj) -> dict:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in obj.attrs.items()}


def assert_same_file(expected, actual):
    """Same root and split attributes (but run times), classes and every dataset."""
    with h5py.File(expected, "r") as a, h5py.File(actual, "r") as b:
        ra, rb = _attrs(a), _attrs(b)
        for k in RUN_KEYS:
            ra.pop(k), rb.pop(k)
        assert ra == rb
        assert rb["shard_index"] == 0 and rb["shard_count"] == 1 and rb["complete"]
        assert list(a["classes"][()]) == list(b["classes"][()])
        assert set(a) == set(b)
        for split in SPLITS:
            assert _attrs(a[split]) == _attrs(b[split])
            assert set(a[split]) == set(b[split])
            for name in a[split]:
                da, db = a[split][name], b[split][name]
                assert (da.shape, da.dtype) == (db.shape, db.dtype), f"{split}/{name}"
                va, vb = da[()], db[()]
                assert np.array_equal(va, vb), f"{split}/{name} differs"
    # and through the public readers, sample by sample
    ma, mb = read_meta(expected), read_meta(actual)
    assert ma["splits"] == mb["splits"] and ma["classes"] == mb["classes"]
    for split in SPLITS:
        sa, sb = read_split(expected, split), read_split(actual, split)
        assert sa["names"] == sb["names"]
        for i in range(len(sa["names"])):
            for key in ("images", "labels", "perm"):
                assert np.array_equal(sa[key][i], sb[key][i]), f"{split} sample {i} {key}"

"""Fixtures of the scale tests: the unsharded reference run and its four shards."""
from __future__ import annotations

import pytest

from .shards import N, build


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The unsharded reference run."""
    return build(tmp_path_factory.mktemp("full") / "full.h5", batch_size=8)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Slices 0..3 of 4, in a folder of their own."""
    d = tmp_path_factory.mktemp("shards")
    return [build(d / f"part-{i}.h5", shard=(i, N)) for i in range(N)]

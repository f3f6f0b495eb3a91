"""The ``digits`` source reads the digits shipped in the package, equal to scikit-learn's.

``porder/sources/data/digits.npz`` was built by ``tools/make_digits_data.py`` from
``sklearn.datasets.load_digits()``; scikit-learn is a test dependency only.
"""
from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from porder.sources import open_source
from porder.sources.synthetic import DIGITS_DATA, load_digits_data


def test_shipped_digits_equal_scikit_learns():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    reference = sklearn_datasets.load_digits()
    images, target = load_digits_data()
    assert images.dtype == np.uint8 and images.shape == (1797, 8, 8)
    assert target.dtype == np.uint8 and target.shape == (1797,)
    np.testing.assert_array_equal(images.astype(np.float64), reference.images)
    np.testing.assert_array_equal(target.astype(np.int64), reference.target)


def test_shipped_file_is_what_the_tool_writes(tmp_path):
    pytest.importorskip("sklearn.datasets")
    tool = Path(__file__).resolve().parents[2] / "tools" / "make_digits_data.py"
    if not tool.is_file():
        pytest.skip("tools/ is not part of this copy of porder")
    spec = importlib.util.spec_from_file_location("make_digits_data", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "digits.npz"
    module.write_npz(out, module.arrays())
    shipped = resources.files("porder.sources").joinpath(DIGITS_DATA).read_bytes()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(shipped).hexdigest()


def test_digits_source_needs_no_scikit_learn():
    # scikit-learn, scipy and joblib hidden: the digits source still opens and reads.
    code = """
import sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('sklearn', 'scipy', 'joblib'):
            raise ImportError('hidden: ' + name)
sys.meta_path.insert(0, Hide())
from porder.sources import open_source
src = open_source('digits', size=8, test_fraction=0)
batch = next(src.iter_batches('train', 2000))
print(batch.images.shape, int(batch.images.sum()), batch.labels[:10].tolist())
assert not any(m.split('.')[0] in ('sklearn', 'scipy', 'joblib') for m in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    images, target = load_digits_data()
    expected = np.rint(images.astype(np.float64) * 255 / 16).astype(np.int64).sum() * 3
    assert out.stdout.split()[:3] == ["(1797,", "8,", "8,"]
    assert f" {expected} " in out.stdout
    assert out.stdout.strip().endswith(str(target[:10].tolist()))


def test_digits_source_pixels():
    images, target = load_digits_data()
    src = open_source("digits", size=8, test_fraction=0)
    batch = next(src.iter_batches("train", 2000))
    np.testing.assert_array_equal(batch.images[..., 0],
                                  np.rint(images.astype(np.float64) * 255 / 16))
    np.testing.assert_array_equal(batch.labels, target)

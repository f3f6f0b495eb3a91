"""synthetic:N:C past what can be drawn: one line that states the bound and why, before
anything is allocated (issue 20, class 5: numpy's _ArrayMemoryError with a traceback)."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from porder.cli import main
from porder.sources import SourceError, open_source
from porder.sources import synthetic as syn


@pytest.mark.parametrize("spec, match", [
    ("synthetic:1000000000000", "N is at most 100,000,000 images, as the train/test split"),
    ("synthetic:100000001", "1.7 GB at the limit"),
    ("synthetic:10:10000000000", "C is at most 1,000,000 classes"),
])
def test_too_many_synthetic_images_or_classes(spec, match):
    with pytest.raises(SourceError, match=match):
        open_source(spec)


def test_the_bounds_themselves_are_accepted():
    n, c = syn.MAX_SYNTHETIC_IMAGES, syn.MAX_SYNTHETIC_CLASSES
    assert (n, c) == (100_000_000, 1_000_000)
    assert syn.parse_synthetic(f"synthetic:{n}:{c}") == (n, c)


def test_the_issue_case_through_the_cli(tmp_path):
    res = CliRunner().invoke(main, ["reorder", "--no-progress", "synthetic:1000000000000",
                                    str(tmp_path / "o.h5")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.splitlines() == [
        "Error: bad synthetic source 'synthetic:1000000000000': N is at most 100,000,000 "
        "images, as the train/test split of all N is drawn in memory at the start (17 bytes "
        "an image, 1.7 GB at the limit)"]
    assert list(tmp_path.iterdir()) == []

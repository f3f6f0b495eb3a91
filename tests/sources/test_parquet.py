"""Hugging Face parquet files and save_to_disk folders (porder.sources.parquet).

Every dataset is generated here (tests/sources/dataset_files.py), from the same samples as a
class folder: the cache made from it must equal the folder's (pixels, labels, class names,
orders), only the sample names and the source's record differ. Bad inputs give one-line
errors, or skips under on_error='skip' as for image files.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("pyarrow")

from click.testing import CliRunner  # noqa: E402

import porder.output  # noqa: E402
from porder.cli import main  # noqa: E402
from porder.output import DiskFull  # noqa: E402
from porder.pipeline import CacheSpec, build_cache  # noqa: E402
from porder.sources import SourceError, open_source  # noqa: E402
from porder.sources import parquet as parquet_module  # noqa: E402
from porder.sources.identity import source_identity  # noqa: E402
from tests.test_resume import cut_after_one_batch, refused, same_rows  # noqa: E402

from .dataset_files import (  # noqa: E402
    assert_same_cache,
    cache,
    hf_table,
    make_samples,
    save_to_disk,
    write_arrow,
    write_class_folder,
    write_parquet,
)
from .test_sources import read_all  # noqa: E402

COUNTS = {"cat": 5, "dog": 6, "emu": 3}
CLASSES = sorted(COUNTS)


@pytest.fixture
def samples():
    return make_samples(COUNTS)


# --------------------------------------------------------------------------
# Same cache as the class folder


def test_parquet_file_gives_the_folders_cache(tmp_path, samples):
    folder = cache(tmp_path, write_class_folder(tmp_path / "folder", samples), "folder")
    pq_file = write_parquet(tmp_path / "ds.parquet", samples)
    out = cache(tmp_path, pq_file, "parquet")
    assert_same_cache(folder, out)
    src = open_source(str(pq_file), size=16, test_fraction=0.25)
    assert src.kind == "parquet" and src.classes == ["cat", "dog", "emu"]
    assert src.held_out == 0.25 and src.count("train") + src.count("test") == 14
    _, _, names, _ = read_all(src, "train")
    rows = [int(n.removeprefix("ds.parquet#")) for n in names]  # the file's row numbers
    assert rows == sorted(rows) and len(rows) == src.count("train")


@pytest.mark.parametrize("layout", ["top", "data", "split-folders"])
def test_parquet_folder_with_its_own_splits(tmp_path, samples, layout):
    train = [s for i, s in enumerate(samples) if i % 4]
    test = [s for i, s in enumerate(samples) if not i % 4]
    folder = tmp_path / "folder"
    write_class_folder(folder / "train", train)
    write_class_folder(folder / "test", test)
    expected = cache(tmp_path, folder, "folder")
    ds = tmp_path / "ds"
    if layout == "split-folders":  # the Hub's parquet conversion: train/0000.parquet
        write_parquet(ds / "train" / "0000.parquet", train[:5], classes=CLASSES)
        write_parquet(ds / "train" / "0001.parquet", train[5:], classes=CLASSES)
        write_parquet(ds / "test" / "0000.parquet", test, classes=CLASSES)
    else:
        where = ds if layout == "top" else ds / "data"
        write_parquet(where / "train-00000-of-00002.parquet", train[:5], classes=CLASSES)
        write_parquet(where / "train-00001-of-00002.parquet", train[5:], classes=CLASSES)
        write_parquet(where / "test-00000-of-00001.parquet", test, classes=CLASSES)
        write_parquet(where / "validation-00000-of-00001.parquet", samples[:2])  # left out
    assert_same_cache(expected, cache(tmp_path, ds, f"parquet-{layout}"))
    src = open_source(str(ds))
    assert src.held_out is None and (src.count("train"), src.count("test")) == (10, 4)


def test_save_to_disk_dataset_and_dataset_dict(tmp_path, samples):
    one = save_to_disk(tmp_path / "one", samples, files=2)
    folder = cache(tmp_path, write_class_folder(tmp_path / "folder", samples), "folder")
    assert_same_cache(folder, cache(tmp_path, one, "one"))
    assert open_source(str(one)).kind == "arrow"

    train = [s for i, s in enumerate(samples) if i % 3]
    test = [s for i, s in enumerate(samples) if not i % 3]
    split_folder = tmp_path / "split"
    write_class_folder(split_folder / "train", train)
    write_class_folder(split_folder / "test", test)
    dd = tmp_path / "dd"
    save_to_disk(dd / "train", train, classes=CLASSES)
    save_to_disk(dd / "test", test, classes=CLASSES)
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert_same_cache(cache(tmp_path, split_folder, "split"), cache(tmp_path, dd, "dd"))
    src = open_source(str(dd))
    _, _, names, _ = read_all(src, "test")
    assert names[0] == "test/data-00000-of-00001.arrow#0"


def test_decoding_processes_and_one_thread_give_the_same_batches(tmp_path, samples):
    pq_file = write_parquet(tmp_path / "ds.parquet", samples, row_group_size=3)
    results = []
    for kw in (dict(workers=1), dict(workers=2, decoder="threads"),
               dict(workers=2, decoder="processes")):
        with open_source(str(pq_file), size=16, test_fraction=0.25, **kw) as src:
            results.append([read_all(src, split, batch_size=5) for split in ("train", "test")])
    for other in results[1:]:
        for (a, la, na, _), (b, lb, nb, _) in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(la, lb)
            assert na == nb


def test_a_glob_of_parquet_files(tmp_path, samples):
    write_parquet(tmp_path / "d" / "train-0.parquet", samples[:7], classes=CLASSES)
    write_parquet(tmp_path / "d" / "train-1.parquet", samples[7:], classes=CLASSES)
    src = open_source(str(tmp_path / "d" / "train-*.parquet"), test_fraction=0)
    images, labels, names, _ = read_all(src, "train")
    assert len(images) == 14 and names[7] == "train-1.parquet#0"


# --------------------------------------------------------------------------
# Class names and labels


def test_class_names_from_the_metadata_dataset_info_or_the_values(tmp_path, samples):
    pa = pytest.importorskip("pyarrow")
    write_parquet(tmp_path / "a.parquet", samples, classes=["cat", "dog", "emu", "fox"])
    assert open_source(str(tmp_path / "a.parquet")).classes == ["cat", "dog", "emu", "fox"]
    # no ClassLabel names in the schema: dataset_info.json beside the files
    ds = tmp_path / "ds"
    write_parquet(ds / "train-0.parquet", samples, names=False)
    (ds / "dataset_info.json").write_text(json.dumps(
        {"features": {"label": {"names": ["c", "d", "e"], "_type": "ClassLabel"}}}))
    assert open_source(str(ds)).classes == ["c", "d", "e"]
    # neither: the distinct values, sorted as numbers
    write_parquet(tmp_path / "b.parquet", samples, names=False)
    src = open_source(str(tmp_path / "b.parquet"), test_fraction=0)
    assert src.classes == ["0", "1", "2"]
    # string labels
    import pyarrow.parquet as pq

    table = hf_table(samples).drop_columns(["label"]).append_column(
        "label", pa.array([c for c, _, _ in samples])).replace_schema_metadata(None)
    pq.write_table(table, tmp_path / "s.parquet")
    src = open_source(str(tmp_path / "s.parquet"), test_fraction=0)
    assert src.classes == ["cat", "dog", "emu"]
    _, labels, _, _ = read_all(src, "train")
    assert labels.tolist() == [0] * 5 + [1] * 6 + [2] * 3


def test_img_column_and_coarse_labels(tmp_path, samples):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = hf_table(samples, image="img", label="fine_label")
    table = table.append_column("coarse_label", pa.array([0] * 7 + [1] * 7))
    pq.write_table(table, tmp_path / "c100.parquet")
    fine = open_source(str(tmp_path / "c100.parquet"), test_fraction=0)
    coarse = open_source(str(tmp_path / "c100.parquet"), test_fraction=0, label="coarse")
    assert fine.classes == ["cat", "dog", "emu"] and coarse.classes == ["0", "1"]
    assert read_all(coarse, "train")[1].tolist() == [0] * 7 + [1] * 7
    np.testing.assert_array_equal(read_all(fine, "train")[0], read_all(coarse, "train")[0])


# --------------------------------------------------------------------------
# Bad inputs


def test_a_corrupt_image_fails_or_is_skipped(tmp_path, samples):
    bad = list(samples)
    bad[3] = (bad[3][0], bad[3][1], bad[3][2][:40])  # a cut PNG
    pq_file = write_parquet(tmp_path / "ds.parquet", bad)
    with pytest.raises(SourceError) as info:
        read_all(open_source(str(pq_file), test_fraction=0), "train")
    message = str(info.value)
    assert "\n" not in message and "ds.parquet#3" in message and "--on-error skip" in message
    src = open_source(str(pq_file), test_fraction=0, on_error="skip")
    images, labels, names, skipped = read_all(src, "train")
    assert len(images) == 13 and "ds.parquet#3" not in names
    assert [n for n, _ in skipped] == ["ds.parquet#3"]
    # the CLI: exit 1, one line
    res = CliRunner().invoke(main, ["reorder", "-b", "4", "--no-progress", "--test-fraction",
                                    "0", str(pq_file), str(tmp_path / "o.h5")])
    assert res.exit_code == 1
    assert res.output.splitlines()[-1] == (
        f"Error: cannot decode image '{pq_file}#3': cannot identify image file (to leave bad "
        f"images out: --on-error skip, or on_error='skip' in Python)")


def test_rows_without_image_bytes_are_bad_samples(tmp_path, samples):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = hf_table(samples)
    cells = table.column("image").to_pylist()
    cells[1] = {"bytes": None, "path": "/elsewhere/x.png"}
    cells[2] = None
    table = table.set_column(0, "image", pa.array(cells, type=table.schema.field("image").type))
    pq.write_table(table, tmp_path / "ds.parquet")
    src = open_source(str(tmp_path / "ds.parquet"), test_fraction=0, on_error="skip")
    _, _, _, skipped = read_all(src, "train")
    assert skipped == [
        ("ds.parquet#1", "the row holds no image bytes, only the path '/elsewhere/x.png', "
                         "which porder does not open"),
        ("ds.parquet#2", "the row's image is empty (null)")]


def one_line_error(spec, match, **kw):
    with pytest.raises(SourceError, match=match) as info:
        src = open_source(str(spec), **kw)
        read_all(src, "train")
    assert "\n" not in str(info.value)


def test_bad_tables_are_one_line_errors(tmp_path, samples):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = hf_table(samples)
    pq.write_table(table.drop_columns(["label"]), tmp_path / "nolabel.parquet")
    one_line_error(tmp_path / "nolabel.parquet",
                   r"nolabel.parquet' has no label column 'label' or 'labels' or 'fine_label' "
                   r"\(columns: image\)")
    pq.write_table(pa.table({"image": pa.array(range(14)), "label": table.column("label")}),
                   tmp_path / "intimage.parquet")
    one_line_error(tmp_path / "intimage.parquet",
                   r"column 'image' of '.*intimage.parquet' is int64, not images")
    pq.write_table(pa.table({"pixels": pa.array(range(14)), "label": table.column("label")}),
                   tmp_path / "noimage.parquet")
    one_line_error(tmp_path / "noimage.parquet", r"has no image column \(columns: pixels, "
                                                 r"label\)")
    labels = table.column("label").to_pylist()
    labels[5] = None
    pq.write_table(table.set_column(1, "label", pa.array(labels, pa.int64())),
                   tmp_path / "nulllabel.parquet")
    one_line_error(tmp_path / "nulllabel.parquet", r"has 1 empty labels \(the first at row 5\)")
    labels[5] = -1
    pq.write_table(table.set_column(1, "label", pa.array(labels, pa.int64())),
                   tmp_path / "unlabelled.parquet")
    one_line_error(tmp_path / "unlabelled.parquet",
                   r"sample 'unlabelled.parquet#5' has label -1, outside 0..2")
    pq.write_table(table.set_column(1, "label", pa.array([0.5] * 14)),
                   tmp_path / "float.parquet")
    one_line_error(tmp_path / "float.parquet", r"holds double values; class labels are")
    (tmp_path / "garbage.parquet").write_bytes(b"not parquet at all" * 10)
    one_line_error(tmp_path / "garbage.parquet", r"cannot read parquet file '.*garbage.parquet'")
    ds = tmp_path / "ds"
    write_parquet(ds / "test-0.parquet", samples)
    assert open_source(str(ds)).held_out == 0.1  # one file alone: held out, whatever its name
    write_parquet(ds / "test-1.parquet", samples)
    one_line_error(ds, r"has test files but no train files")
    other = tmp_path / "other"
    write_parquet(other / "train-0.parquet", samples)
    pq.write_table(table.drop_columns(["label"]), other / "train-1.parquet")
    one_line_error(other, r"train-1.parquet' has no column 'label', which the other files have")
    mixed = tmp_path / "mixed"
    write_parquet(mixed / "train-0.parquet", samples[:7])  # names: cat, dog
    write_parquet(mixed / "train-1.parquet", samples[7:])  # names: dog, emu
    one_line_error(mixed, r"the class names of '.*train-1.parquet' differ from those of "
                          r"'.*train-0.parquet' \(ClassLabel of 'label'\)")


def test_a_row_group_over_the_limit_is_refused(tmp_path, samples, monkeypatch):
    pq_file = write_parquet(tmp_path / "ds.parquet", samples, row_group_size=14)
    monkeypatch.setattr(parquet_module, "MAX_ROW_GROUP_BYTES", 1000)
    one_line_error(pq_file, r"row group 0 of '.*ds.parquet' holds [\d,]+ bytes of images; "
                            r"porder reads at most 0 MiB at once", test_fraction=0)


def test_a_compressed_arrow_file_is_bounded(tmp_path, samples, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    folder = save_to_disk(tmp_path / "one", samples)
    table = hf_table(samples)
    path = folder / "data-00000-of-00001.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(
            sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_table(table)
    assert open_source(str(folder)).count("train") > 0  # small: read
    monkeypatch.setattr(parquet_module, "MAX_ARROW_HELD", 100)
    one_line_error(folder, r"is compressed and takes over 0 MiB once read")

    # Other Arrow memory freed while the file is read does not hide what the read holds
    # (the bound once compared the process-wide total before and after: flaky in CI).
    other = [pa.array(range(200_000))]
    real = pa.ipc.open_stream

    class FreeingReader:
        def __init__(self, reader):
            self.reader = reader

        def read_all(self):
            other.clear()                                  # 1.6 MB of Arrow buffers freed
            return self.reader.read_all()

    monkeypatch.setattr(pa.ipc, "open_stream", lambda *a, **kw: FreeingReader(real(*a, **kw)))
    one_line_error(folder, r"is compressed and takes over 0 MiB once read")


def test_without_pyarrow_the_error_names_the_extra(tmp_path, samples):
    pq_file = write_parquet(tmp_path / "ds.parquet", samples)
    code = f"""
import sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'pyarrow':
            raise ImportError('hidden: ' + name)
sys.meta_path.insert(0, Hide())
sys.argv = ['porder', 'reorder', {str(pq_file)!r}, {str(tmp_path / 'o.h5')!r}]
from porder.cli import main
main()
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        'Error: reading Hugging Face parquet/arrow datasets needs pyarrow, porder\'s optional '
        'extra [parquet]: pip install "patch-order[parquet]"']


# --------------------------------------------------------------------------
# Resume, identity, free space, shards of the work


def test_resume_and_identity_of_a_parquet_file(tmp_path, samples, monkeypatch):
    pq_file = write_parquet(tmp_path / "ds.parquet", samples)
    opts = dict(measure="entropy", batch_size=4, workers=1)
    whole = build_cache(CacheSpec(str(pq_file), tmp_path / "whole.h5", **opts)).path
    out = tmp_path / "o.h5"
    cut_after_one_batch(pq_file, out, monkeypatch)
    identity = source_identity(str(pq_file))
    assert identity["source_files"] == 1 and identity["source_bytes"] == pq_file.stat().st_size
    data, st = pq_file.read_bytes(), pq_file.stat()
    write_parquet(pq_file, make_samples(COUNTS, seed=1))  # other images, same name
    refused(pq_file, out, r"the source changed")
    pq_file.write_bytes(data)
    import os

    os.utime(pq_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert build_cache(CacheSpec(str(pq_file), out, resume=True, **opts)).resumed
    same_rows(whole, out)


def test_a_parquet_folder_is_identified_by_its_listing(tmp_path, samples):
    ds = tmp_path / "ds"
    write_parquet(ds / "data" / "train-0.parquet", samples)
    before = source_identity(str(ds))
    assert before["source_files"] == 1
    write_parquet(ds / "data" / "train-1.parquet", samples[:3], classes=CLASSES)
    assert source_identity(str(ds))["source_digest"] != before["source_digest"]


def test_shards_of_the_work_and_free_space(tmp_path, samples, monkeypatch):
    from porder.scale import merge
    from tests.scale.shards import assert_same_file

    pq_file = write_parquet(tmp_path / "ds.parquet", samples)
    whole = cache(tmp_path, pq_file, "whole")
    parts = [cache(tmp_path, pq_file, f"s{i}", shard=(i, 3)) for i in range(3)]
    assert_same_file(whole, merge(parts, tmp_path / "m.h5", copy=True))
    monkeypatch.setattr(porder.output, "free_bytes", lambda folder: 10_000)
    with pytest.raises(DiskFull, match=r"needs about"):
        cache(tmp_path, pq_file, "full", size=64)


def test_arrow_file_format_is_read_too(tmp_path, samples):
    pa = pytest.importorskip("pyarrow")
    folder = save_to_disk(tmp_path / "one", samples)
    table = hf_table(samples)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, \
            pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    src = open_source(str(folder), test_fraction=0)
    images, labels, _, _ = read_all(src, "train")
    assert len(images) == 14 and labels.tolist() == [0] * 5 + [1] * 6 + [2] * 3
    write_arrow(folder / "data-00000-of-00001.arrow", table)  # a stream again
    np.testing.assert_array_equal(read_all(open_source(str(folder), test_fraction=0),
                                           "train")[0], images)

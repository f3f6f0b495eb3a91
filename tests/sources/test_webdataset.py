"""WebDataset .tar shards (porder.sources.webdataset), read with the standard tarfile module.

Shards are generated here (tests/sources/dataset_files.py) from the same samples as a class
folder: the cache made from them must equal the folder's. Bad shards (cut short, corrupt,
compressed) and bad samples give one-line errors, or skips under on_error='skip'.
"""
from __future__ import annotations

import gzip
import json
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner

from porder.cli import main
from porder.pipeline import CacheSpec, build_cache
from porder.sources import SOURCE_HELP, SourceError, open_source
from porder.sources import webdataset as wds_module
from porder.sources.identity import source_identity
from porder.sources.webdataset import expand_braces, expand_pattern, pattern_root
from tests.test_resume import cut_after_one_batch, refused, same_rows

from .dataset_files import (
    assert_same_cache,
    cache,
    encoded,
    make_samples,
    tar_of,
    write_class_folder,
    write_shard,
)
from .test_sources import read_all

COUNTS = {"ant": 4, "bee": 7, "cow": 3}
CLASSES = sorted(COUNTS)


@pytest.fixture
def samples():
    return make_samples(COUNTS, seed=3)


def split(samples):
    return ([s for i, s in enumerate(samples) if i % 4],
            [s for i, s in enumerate(samples) if not i % 4])


# --------------------------------------------------------------------------
# Same cache as the class folder


def test_a_folder_of_train_and_test_shards_gives_the_folders_cache(tmp_path, samples):
    train, test = split(samples)
    folder = tmp_path / "folder"
    write_class_folder(folder / "train", train)
    write_class_folder(folder / "test", test)
    shards = tmp_path / "shards"
    write_shard(shards / "data-train-000000.tar", train[:6], CLASSES)
    write_shard(shards / "data-train-000001.tar", train[6:], CLASSES)
    write_shard(shards / "data-test-000000.tar", test, CLASSES)
    (shards / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    assert_same_cache(cache(tmp_path, folder, "folder"), cache(tmp_path, shards, "shards"))
    src = open_source(str(shards))
    assert src.kind == "webdataset" and src.classes == CLASSES and src.held_out is None
    _, _, names, _ = read_all(src, "train")
    assert names[0] == "data-train-000000.tar/000000_img1.png"


def test_one_shard_holds_out_a_test_split_like_a_folder(tmp_path, samples):
    folder = cache(tmp_path, write_class_folder(tmp_path / "folder", samples), "folder")
    shard = write_shard(tmp_path / "s" / "all-000.tar", samples, CLASSES)
    (tmp_path / "s" / "classes.txt").write_text("\n".join(CLASSES))
    assert_same_cache(folder, cache(tmp_path, shard, "shard"))
    assert open_source(str(shard), test_fraction=0.25).held_out == 0.25
    alone = write_shard(tmp_path / "t" / "cifar-test-000.tar", samples, CLASSES)
    src = open_source(str(alone), test_fraction=0.25)  # a test shard alone: held out too
    assert src.held_out == 0.25 and src.count("train") + src.count("test") == 14


def test_patterns_name_the_same_shards(tmp_path, samples):
    d = tmp_path / "d"
    for i in range(3):
        write_shard(d / f"part-{i:03d}.tar", samples[i * 5:(i + 1) * 5], CLASSES)
    reads = []
    for spec in [d, d / "part-*.tar", d / "part-{000..002}.tar", d / "part-{000,001,002}.tar"]:
        with open_source(str(spec), test_fraction=0) as src:
            reads.append(read_all(src, "train"))
    for images, labels, names, _ in reads[1:]:
        np.testing.assert_array_equal(images, reads[0][0])
        np.testing.assert_array_equal(labels, reads[0][1])
        assert names == reads[0][2]
    assert len(reads[0][0]) == 14 and reads[0][2][5] == "part-001.tar/000000_img1.png"
    with pytest.raises(SourceError, match=r"'.*part-003.tar' does not exist"):
        open_source(str(d / "part-{000..003}.tar"))
    with pytest.raises(SourceError, match=r"matches no file"):
        open_source(str(d / "nothing-*.tar"))
    (d / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match=r"notes.txt' is not a .tar shard"):
        open_source(str(d / "*"))


def test_brace_expansion_and_pattern_roots():
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("a-{8..10}.tar") == ["a-8.tar", "a-9.tar", "a-10.tar"]
    assert expand_braces("{x,y}-{0..1}") == ["x-0", "x-1", "y-0", "y-1"]
    assert expand_braces("{literal}.tar") == ["{literal}.tar"]
    assert pattern_root("/data/shards/train-*.tar") == "/data/shards"
    assert pattern_root("shards/{a,b}/x.tar") == "shards"
    assert pattern_root("x-*.tar") == "."
    with pytest.raises(SourceError, match="names more than"):
        expand_braces("{0..9999999}")


def test_class_names_from_classes_json_or_the_labels(tmp_path, samples):
    d = tmp_path / "d"
    write_shard(d / "s-0.tar", samples, CLASSES)
    assert open_source(str(d)).classes == ["0", "1", "2"]  # no names: the labels
    for content in (["a", "b", "c", "d"], {"a": 0, "b": 1, "c": 2, "d": 3},
                    {"0": "a", "1": "b", "2": "c", "3": "d"}):
        (d / "classes.json").write_text(json.dumps(content))
        assert open_source(str(d)).classes == ["a", "b", "c", "d"]
    (d / "classes.json").write_text(json.dumps({"a": 0, "b": 5}))
    with pytest.raises(SourceError, match=r"classes.json' must be a list of class names"):
        open_source(str(d))
    (d / "classes.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(SourceError, match=r"has label 2, outside 0..1 of its 2 class names"):
        open_source(str(d))
    (d / "classes.txt").write_text("a\nb\nc\n")
    with pytest.raises(SourceError, match="holds both classes.txt and classes.json"):
        open_source(str(d))


def test_decoding_processes_and_threads_give_the_same_batches(tmp_path, samples):
    shard = write_shard(tmp_path / "s" / "x.tar", samples, CLASSES)
    results = []
    for kw in (dict(workers=1), dict(workers=2, decoder="threads"),
               dict(workers=2, decoder="processes")):
        with open_source(str(shard), size=16, test_fraction=0.25, **kw) as src:
            results.append([read_all(src, s, batch_size=5) for s in ("train", "test")])
    for other in results[1:]:
        for (a, la, na, _), (b, lb, nb, _) in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(la, lb)
            assert na == nb


def test_shards_written_by_webdataset_itself(tmp_path, samples):
    wds = pytest.importorskip("webdataset")
    d = tmp_path / "d"
    d.mkdir()
    with wds.TarWriter(str(d / "train-000.tar")) as writer:
        for k, (cls, name, data) in enumerate(samples):
            ext = name.rsplit(".", 1)[1]
            writer.write({"__key__": f"s{k:04d}", ext: data, "cls": CLASSES.index(cls),
                          "json": {"class": cls}})
    folder = cache(tmp_path, write_class_folder(tmp_path / "folder", samples), "folder")
    (d / "classes.txt").write_text("\n".join(CLASSES))
    assert_same_cache(folder, cache(tmp_path, d, "wds"))


# --------------------------------------------------------------------------
# Bad shards and samples


def test_a_corrupt_image_fails_or_is_skipped(tmp_path, samples):
    bad = list(samples)
    bad[2] = (bad[2][0], bad[2][1], bad[2][2][:50])  # a cut JPEG
    shard = write_shard(tmp_path / "s" / "x.tar", bad, CLASSES)
    with pytest.raises(SourceError) as info:
        read_all(open_source(str(shard), test_fraction=0), "train")
    assert str(info.value).startswith(f"cannot decode image '{shard}/000002_img2.jpg': ")
    assert "\n" not in str(info.value)
    src = open_source(str(shard), test_fraction=0, on_error="skip", workers=2,
                      decoder="processes")
    images, _, names, skipped = read_all(src, "train")
    assert len(images) == 13 and [n for n, _ in skipped] == ["x.tar/000002_img2.jpg"]


def test_bad_samples_are_skipped_with_their_reason(tmp_path, samples):
    png = samples[0][2]
    shard = tar_of(tmp_path / "s" / "x.tar", [
        ("a.png", png), ("a.cls", b"1"),
        ("b.png", png),                                   # no label
        ("c.cls", b"0"),                                  # no image
        ("d.png", png), ("d.jpg", png), ("d.cls", b"0"),  # two images
        ("e.png", png), ("e.cls", b"cat"),                # not a number
        ("f.webp", encoded(np.zeros((4, 4, 3), np.uint8), "WEBP", lossless=True)),
        ("f.cls", b" 0\n"),
        ("g.txt", b"ignored"), ("dir/h.PNG", png), ("dir/h.cls", b"1"),
    ])
    src = open_source(str(shard), test_fraction=0, on_error="skip")
    _, labels, names, skipped = read_all(src, "train")
    assert names == ["x.tar/a.png", "x.tar/f.webp", "x.tar/dir/h.PNG"]
    assert labels.tolist() == [1, 0, 1] and src.classes == ["0", "1"]
    assert skipped == [("x.tar/b.png", "sample 'b' has no .cls label"),
                       ("x.tar/c", "sample 'c' has no image (.jpg .jpeg .png .webp)"),
                       ("x.tar/d", "sample 'd' has 2 images (png jpg); porder reads one"),
                       ("x.tar/e.png", "its label e.cls holds 'cat', not a class number")]
    with pytest.raises(SourceError, match=r"cannot decode image '.*x.tar/b.png': sample 'b' "
                                          r"has no .cls label \(to leave bad images out"):
        read_all(open_source(str(shard), test_fraction=0), "train")


def test_broken_shards_are_one_line_errors(tmp_path, samples):
    shard = write_shard(tmp_path / "good" / "x.tar", samples, CLASSES)
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        second = tar.getmembers()[1].offset  # the second entry's header
    cases = {
        "cut-in-data.tar": data[:second - 100],
        "cut-at-header.tar": data[:second],   # one whole entry, nothing after
        "corrupt-header.tar": data[:second] + b"\x01" * 512 + data[second + 512:],
        "empty.tar": b"",
        "notatar.tar": b"hello" * 200,
    }
    messages = {
        "cut-in-data.tar": r"shard '.*cut-in-data.tar' is cut short",
        "cut-at-header.tar": r"shard '.*cut-at-header.tar' is cut short: it ends without "
                             r"tar's end-of-archive block",
        "corrupt-header.tar": rf"shard '.*corrupt-header.tar' has a corrupt entry header at "
                              rf"byte {second:,}",
        "empty.tar": r"'.*empty.tar' is not a tar file",
        "notatar.tar": r"'.*notatar.tar' is not a tar file",
    }
    for name, content in cases.items():
        folder = tmp_path / name.removesuffix(".tar")
        folder.mkdir()
        (folder / name).write_bytes(content)
        with pytest.raises(SourceError, match=messages[name]) as info:
            open_source(str(folder))
        assert "\n" not in str(info.value)
    gz = tmp_path / "gz"
    gz.mkdir()
    (gz / "x.tar").write_bytes(gzip.compress(data))
    with pytest.raises(SourceError, match=r"is compressed; porder reads plain .tar shards "
                                          r"\(decompress it first: gzip -d FILE\)"):
        open_source(str(gz))
    nolabels = tar_of(tmp_path / "nl" / "x.tar", [("a.png", samples[0][2])])
    with pytest.raises(SourceError, match="no sample of .* has a .cls label"):
        open_source(str(nolabels.parent))
    res = CliRunner().invoke(main, ["reorder", "--no-progress", str(tmp_path / "cut-in-data"),
                                    str(tmp_path / "o.h5")])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1
    assert res.output.startswith("Error: shard '")


def test_bounds(tmp_path, samples, monkeypatch):
    shard = write_shard(tmp_path / "s" / "x.tar", samples, CLASSES)
    monkeypatch.setattr(wds_module, "MAX_IMAGE_BYTES", 200)
    src = open_source(str(shard), test_fraction=0, on_error="skip")
    _, _, names, skipped = read_all(src, "train")
    assert skipped and all("over porder's limit of 0 MiB for one image" in r
                           for _, r in skipped)
    assert len(names) + len(skipped) == 14
    monkeypatch.setattr(wds_module, "MAX_SHARD_MEMBERS", 10)
    with pytest.raises(SourceError, match=r"holds more than 10 entries; split it"):
        open_source(str(shard))


def test_a_shard_cut_after_it_was_listed(tmp_path, samples):
    shard = write_shard(tmp_path / "s" / "x.tar", samples, CLASSES)
    src = open_source(str(shard), test_fraction=0, on_error="skip")
    shard.write_bytes(shard.read_bytes()[:4096])
    _, _, names, skipped = read_all(src, "train")
    assert skipped and "cut or changed since it was listed" in skipped[-1][1]


def test_a_folder_of_images_with_a_tar_stays_an_image_folder(tmp_path, samples):
    write_class_folder(tmp_path / "d", samples)
    write_shard(tmp_path / "d" / "x.tar", samples, CLASSES)
    assert open_source(str(tmp_path / "d")).kind == "folder"


# --------------------------------------------------------------------------
# Resume and identity


def test_resume_and_identity_of_shards(tmp_path, samples, monkeypatch):
    d = tmp_path / "d"
    for i in range(2):
        write_shard(d / f"train-{i}.tar", samples[i * 7:(i + 1) * 7], CLASSES)
    opts = dict(measure="entropy", batch_size=4, workers=1)
    for spec in (str(d), str(d / "train-*.tar")):
        out = tmp_path / "o.h5"
        whole = build_cache(CacheSpec(spec, tmp_path / "whole.h5", overwrite=True,
                                      **opts)).path
        cut_after_one_batch(spec, out, monkeypatch)
        identity = source_identity(spec)
        assert identity["source_files"] == 2 and identity["source_digest"]
        extra = d / "train-2.tar"
        write_shard(extra, samples[:2], CLASSES)                    # a shard added
        refused(spec, out, r"the source changed")
        extra.unlink()
        assert build_cache(CacheSpec(spec, out, resume=True, **opts)).resumed
        same_rows(whole, out)
        out.unlink()
    pattern = source_identity(str(d / "train-*.tar"))
    assert pattern["source_bytes"] == sum(p.stat().st_size for p in d.glob("*.tar"))
    assert expand_pattern(str(d / "train-*.tar"))[1] == [str(d / "train-0.tar"),
                                                         str(d / "train-1.tar")]


def test_source_help_and_options(tmp_path, samples):
    for word in ["parquet", "save_to_disk", "KEY.cls", "classes.txt", "patch-order[parquet]",
                 "{000..009}"]:
        assert word in SOURCE_HELP
    shard = write_shard(tmp_path / "s" / "x.tar", samples, CLASSES)
    with pytest.raises(SourceError, match="label='coarse' needs CIFAR-100"):
        open_source(str(shard), label="coarse")


def test_nvjpeg_host_side_reads_members_and_bytes(tmp_path, samples):
    # decoder='nvjpeg' reads each item's bytes on host threads (no GPU needed for this part):
    # a JPEG member goes to nvJPEG, a PNG member to Pillow, exactly as files do.
    from porder.sources import gpu_decode
    from porder.sources.pillow import Member, Missing, decode_file

    shard = write_shard(tmp_path / "s" / "x.tar", samples, CLASSES)
    members = open_source(str(shard), test_fraction=0)._files["train"][0]
    jpeg, png = members[2], members[0]
    assert isinstance(jpeg, Member) and isinstance(png, Member)
    out = gpu_decode.read_chunk([jpeg, png, samples[2][2], Missing("no image")], 16)
    assert isinstance(out[0], gpu_decode._Jpeg) and isinstance(out[2], gpu_decode._Jpeg)
    assert bytes(out[0].data) == samples[2][2]
    np.testing.assert_array_equal(out[1][0], decode_file(png, 16))
    assert out[3] == (None, "no image")

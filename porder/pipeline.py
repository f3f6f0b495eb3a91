"""Source to reordered HDF5 cache: the job behind ``porder reorder``.

Batches are decoded on a background thread (the source itself decodes with all
cores) while the previous batch is scored and written, so decode, measure and
write overlap. Memory is bounded by a few batches whatever the dataset size.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .backend import resolve_device
from .measures import _check_bins, get_measure
from .patches import check_patch_size
from .reorder import reorder
from .sources import open_source
from .sources.base import stored_name
from .store import SPLITS, StoreError, Writer, partial_path

# progress(split, samples_done, samples_total) after each batch
Progress = Callable[[str, int, int], None]


@dataclass
class BuildResult:
    path: Path
    rows: dict = field(default_factory=dict)        # split -> rows written
    skipped: dict = field(default_factory=dict)     # split -> samples skipped
    seconds: dict = field(default_factory=dict)     # decode / measure / write / total
    resumed: bool = False


def shard_range(count: int, shard: Optional[tuple[int, int]]) -> tuple[int, int]:
    """Sample range [lo, hi) of shard (i, n) of a split of ``count`` samples."""
    if shard is None:
        return 0, count
    i, n = shard
    return i * count // n, (i + 1) * count // n


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N; ValueError otherwise."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except (ValueError, AttributeError):
        raise ValueError(f"shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {text!r} needs 0 <= I < N")
    return i, n


def _prefetch(iterator, depth: int = 2):
    """Run ``iterator`` on a background thread, yielding (item, seconds waited).

    The thread is a daemon that stops at its next item once the consumer is
    gone; leaving (Ctrl-C included) never waits for it, so a slow or stuck
    decode cannot hold up an interrupt.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            for item in iterator:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # re-raised in the consumer
            put(e)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while True:
            t0 = time.perf_counter()
            item = q.get()
            waited = time.perf_counter() - t0
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item, waited
    finally:
        stop.set()  # the producer sees it within 0.1 s of its next item


def build_cache(source: str, out, *, measure: str = "mi", patch: int = 8, bins: int = 256,
                size: int = 32, label: str = "fine", test_fraction: float = 0.1, seed: int = 0,
                reference: int = 0, descending: Optional[bool] = None, batch_size: int = 256,
                device: str = "cpu", workers: Optional[int] = None, on_error: str = "fail",
                overwrite: bool = False, resume: bool = False,
                shard: Optional[tuple[int, int]] = None,
                progress: Optional[Progress] = None) -> BuildResult:
    """Read ``source``, reorder every image, and write the porder HDF5 file ``out``.

    Parameters mirror ``porder reorder``. ``resume`` continues ``<out>.part``
    when it exists (and starts afresh otherwise). ``shard=(i, n)`` processes
    the i-th of n equal, contiguous slices of every split.

    Returns
    -------
    BuildResult with the final path, rows and skips per split and the seconds
    spent waiting for decoding, scoring and writing.

    Raises
    ------
    ValueError (SourceError, StoreError) for bad options, input or output.
    """
    m = get_measure(measure)
    bins = _check_bins(bins)
    device = resolve_device(device)
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    g = check_patch_size(size, patch)
    if not 0 <= reference < g * g:
        raise ValueError(f"reference patch {reference} is out of range 0..{g * g - 1} "
                         f"for patch {patch} on {size}x{size} images")
    desc = m.descending if descending is None else bool(descending)
    out = Path(out)
    resumed = bool(resume and partial_path(out).exists())
    src = open_source(source, size=size, label=label, test_fraction=test_fraction, seed=seed,
                      on_error=on_error, workers=workers)
    meta = {
        "measure": m.name, "patch": patch, "bins": bins, "reference": reference,
        "direction": "descending" if desc else "ascending", "image_size": size,
        "source": stored_name(source), "source_kind": src.kind, "seed": seed, "label": label,
        "test_fraction": test_fraction, "on_error": on_error,
        "shard_index": shard[0] if shard else 0, "shard_count": shard[1] if shard else 1,
    }
    try:
        writer = Writer(out, meta=meta, classes=src.classes, overwrite=overwrite,
                        resume=resumed, chunk=batch_size)
    except BaseException:
        src.close()
        raise
    result = BuildResult(path=out, resumed=resumed)
    secs = dict(decode=0.0, measure=0.0, write=0.0)
    t_start = time.perf_counter()
    try:
        for split in SPLITS:
            lo, hi = shard_range(src.count(split), shard)
            writer.f[split].attrs["first_sample"] = lo
            writer.f[split].attrs["last_sample"] = hi
            pos = max(lo, writer.consumed(split)) if resumed else lo
            if progress:
                progress(split, pos - lo, hi - lo)
            batches = src.iter_batches(split, batch_size, start=pos, stop=hi)
            for batch, waited in _prefetch(batches):
                secs["decode"] += waited
                take = min(batch_size, hi - pos)  # samples this batch covers
                t0 = time.perf_counter()
                imgs, perm = reorder(batch.images, m, patch, bins=bins, device=device,
                                     reference=reference, descending=descending, seed=seed,
                                     start=pos, workers=workers)
                t1 = time.perf_counter()
                pos += take
                writer.append(split, imgs, batch.labels, perm.astype(np.uint16), batch.names,
                              consumed=pos, skipped=batch.skipped)
                secs["measure"] += t1 - t0
                secs["write"] += time.perf_counter() - t1
                if progress:
                    progress(split, pos - lo, hi - lo)
            result.rows[split] = writer.rows(split)
            result.skipped[split] = int(writer.f[split]["skipped"].shape[0])
        if sum(result.rows.values()) == 0:
            raise StoreError(f"source '{source}' gave no images to write")
        secs["total"] = time.perf_counter() - t_start
        result.seconds = secs
        writer.finish()
    except KeyboardInterrupt:
        writer.close()  # keep the .part file: it can be resumed
        raise
    except BaseException:
        writer.discard()
        raise
    finally:
        src.close()
    return result

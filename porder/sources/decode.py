"""The source of image files decoded per batch, on threads or worker processes.

How one file becomes an RGB array (modes, EXIF, draft, resizing, bad files, files
that are not regular files) is stated once, in :mod:`porder.sources.pillow`,
whose :func:`~porder.sources.pillow.decode_chunk` every decoder below runs.

Decoding files runs on ``workers`` threads or worker processes (default: the
CPUs this process may use), chosen by ``decoder``:

* ``"threads"``: start at once. Pillow releases the GIL while it decodes and
  resizes, so threads scale on photos (on the 1000 JPEGs of Dogs vs. Cats, 2
  cores, as fast as processes); on tiny files (CIFAR's 32x32 JPEGs) most of
  the time is Pillow's Python code under the GIL, and threads run at about
  one core.
* ``"processes"``: :class:`~porder.sources.procs.DecodeProcesses`, the same
  decoding function in worker processes, so identical pixels on every core; a
  worker costs about 0.3 s to start, and a decoder crash costs one file, not
  the run.
* ``"auto"`` (the default): processes when at least :data:`AUTO_PROCESSES_MIN`
  files are to be read and ``workers`` > 1, else threads.
* ``"nvjpeg"``: threads read the files' bytes, and JPEGs are decoded and
  resized on a CUDA GPU with torchvision's nvJPEG decoder; the batches are CuPy
  arrays on the GPU. Other files, and JPEGs nvJPEG is not trusted with, are
  decoded by Pillow as above. The pixels differ slightly from Pillow's; see
  :mod:`porder.sources.gpu_decode`.

With ``workers=1`` files are decoded in the caller's thread. The next batch is
decoded while the caller works on the current one.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import Future

import numpy as np

from .base import Batch, Source, SourceError, printable
from .pillow import decode_chunk
from .procs import DecodeProcesses

DECODER_CHOICES = ("auto", "threads", "processes", "nvjpeg")
#: ``decoder="auto"`` reads this many files or more with worker processes.
AUTO_PROCESSES_MIN = 4096


class FileSource(Source):
    """Image files (class folders or Kaggle layout), decoded per batch by worker
    threads or processes (``decoder``, see the module docstring).

    ``files`` maps a split to (items, labels (N,) int64, names): the items are
    the files' paths here; the sources of containers (:mod:`.parquet`,
    :mod:`.webdataset`) put members of files or row numbers there and override
    :meth:`_items` and :meth:`_shown`.
    """

    def __init__(self, kind, description, classes, size, held_out, files, on_error,
                 workers, unlisted=None, decoder="auto"):
        super().__init__(kind, description, classes, size, held_out, workers)
        # split -> (paths, labels (N,) int64, names)
        self._files = files
        self._on_error = on_error
        self._decoder = decoder
        self._procs: DecodeProcesses | None = None
        self._gpu = None  # gpu_decode.NvjpegDecoder with decoder="nvjpeg"
        if decoder == "nvjpeg":
            from .gpu_decode import NvjpegDecoder

            self._gpu = NvjpegDecoder()
        # split -> [(folder name, reason)]: folders that could not be listed (on_error="skip"),
        # reported with the batch that covers sample 0 of the split
        self._unlisted = {split: list((unlisted or {}).get(split, ())) for split in files}

    def _count(self, split):
        return len(self._files[split][0])

    def close(self) -> None:
        super().close()
        if self._procs is not None:
            self._procs.shutdown()
            self._procs = None

    def _use_processes(self, files: int) -> bool:
        """Whether reading ``files`` files goes to worker processes (see ``decoder``)."""
        if self._workers == 1 or self._decoder in ("threads", "nvjpeg"):
            return False
        return self._decoder == "processes" or files >= AUTO_PROCESSES_MIN

    def _items(self, split, lo, hi) -> list:
        """What is decoded for samples [lo, hi): file paths here. A source of
        containers overrides it (members of a file, or the bytes themselves; see
        :func:`~porder.sources.pillow.decode_file`)."""
        return self._files[split][0][lo:hi]

    def _shown(self, split, i) -> str:
        """Sample ``i`` of ``split`` as an error message names it: its path."""
        return printable(self._files[split][0][i])

    def _submit(self, split, lo, hi, processes=False) -> tuple[list, list[Future] | None]:
        """Start decoding samples [lo, hi): (their items, the futures, or None to decode
        them in :meth:`_collect`, with ``workers=1``)."""
        items = self._items(split, lo, hi)
        if self._workers == 1:
            return items, None
        # A few chunks per worker: low overhead, and the workers stay balanced.
        step = max(1, math.ceil(len(items) / (4 * self._workers)))
        chunks = [items[i:i + step] for i in range(0, len(items), step)]
        if processes:
            if self._closed:
                raise SourceError(f"source {self.description!r} is closed")
            if self._procs is None:
                self._procs = DecodeProcesses(self._workers)
            return items, [self._procs.submit(chunk, self.image_size) for chunk in chunks]
        pool = self._executor()
        return items, [pool.submit(self._read_chunk, chunk, self.image_size) for chunk in chunks]

    @property
    def _read_chunk(self):
        """What the threads run on a chunk of items: Pillow's decode, or nvjpeg's file reads."""
        return decode_chunk if self._gpu is None else self._gpu.read_chunk

    def _collect(self, split, lo, hi, work) -> Batch:
        _, labels, names = self._files[split]
        items, futures = work
        if futures is None:
            results = self._read_chunk(items, self.image_size)
        else:
            results = [r for future in futures for r in future.result()]
        if self._gpu is not None:  # the JPEGs read, decoded on the GPU now
            results = self._gpu.finish(results, items, self.image_size)
        keep, skipped = [], []
        for j, (image, reason) in enumerate(results):
            if image is not None:
                keep.append(j)
            elif self._on_error == "skip":
                skipped.append((names[lo + j], reason))
            else:
                raise SourceError(f"cannot decode image '{self._shown(split, lo + j)}': "
                                  f"{printable(reason)} (to leave bad images out: --on-error "
                                  f"skip, or on_error='skip' in Python)")
        if lo == 0:
            skipped = self._unlisted[split] + skipped
        s = self.image_size
        if self._gpu is not None:  # a CuPy array on the GPU
            images = self._gpu.stack([results[j][0] for j in keep], s)
        else:
            images = (np.stack([results[j][0] for j in keep]) if keep
                      else np.empty((0, s, s, 3), dtype=np.uint8))  # (B, S, S, 3)
        return Batch(images, labels[lo:hi][keep], [names[lo + j] for j in keep], skipped)

    def _read(self, split, lo, hi):
        return self._collect(split, lo, hi,
                             self._submit(split, lo, hi, self._use_processes(hi - lo)))

    def _batches(self, split, batch_size, start, n):
        # Decode batch k + 1 while the caller works on batch k.
        bounds = [(lo, min(lo + batch_size, n)) for lo in range(start, n, batch_size)]
        if start == n == 0 and self._unlisted[split]:  # nothing to read: report them alone
            bounds = [(0, 0)]
        processes = self._use_processes(n - start)
        pending = []  # (lo, hi, work) submitted, not yet collected; at most 2
        try:
            for k, (lo, hi) in enumerate(bounds):
                if not pending:
                    pending.append((lo, hi, self._submit(split, lo, hi, processes)))
                if k + 1 < len(bounds):
                    pending.append((*bounds[k + 1],
                                    self._submit(split, *bounds[k + 1], processes)))
                batch = self._collect(split, *pending.pop(0))
                yield batch
        finally:  # abandoned early or failed: drop what was prefetched
            for _, _, (_, futures) in pending:
                for future in futures or ():
                    future.cancel()


class ContainerSource(FileSource):
    """Samples stored inside larger files (parquet rows, WebDataset shard members),
    decoded like image files; a message names a sample ``root/name``
    (``/data/shards/train-000.tar/000017.jpg``)."""

    def __init__(self, kind, description, classes, size, held_out, files, on_error,
                 workers, decoder, root):
        super().__init__(kind, description, classes, size, held_out, files, on_error,
                         workers, decoder=decoder)
        self._root = str(root)

    def _shown(self, split, i):
        return printable(os.path.join(self._root, self._files[split][2][i]))

"""Launch geometry of the fused CUDA kernel: pure Python, tested without a GPU.

What the Python side of the CUDA backend (:mod:`porder.kernels.cuda`) must
agree on with the C++ layout of ``cuda/porder_core.cuh``: the measure ids
(``MEASURE_IDS``, the measures the CUDA backend implements) and params
indices, the threads per block, the memory regions of one image, the grid and
the images per launch, and the float64 table of constants and logs the kernel
reads. Which regions a measure needs follows its registry entry (``binned``:
equality masks, counts or value tables) and the kernel's own per-measure
layout. The same per-image code runs on the CPU through
``cuda/host_harness.cu`` in the tests.

Two modes, chosen per case by :func:`launch_geometry` (no size is refused):

* **shared**: one image's whole working set in shared memory (the histogram
  measures with per-pixel equality masks, up to 256 pixels per patch), when it
  fits one block: every 32x32 case, for example.
* **stream**: anything else (128 p16, 224 p16/p32, 256 p8, ...). The kernel
  reads the image from global memory; the quantised units, per-unit
  statistics, chain state, log table, reference classes and per-thread value
  tables go to shared memory while they fit a budget that keeps every thread
  slot of a multiprocessor (``STREAM_SMEM_ORDER``), the rest to the block's
  slice of a global scratch the host allocates (``Geometry.gmem_bytes`` per
  block; the grid is cut so that one launch's scratch stays within
  ``SCRATCH_BYTES``). The histogram measures run in *table mode* there (no
  masks: O(n + bins) per candidate and channel, whatever the patch size).
  Memory per image in flight: C*K*n bytes of units (a copy of the image),
  16 (24 for ssim) bytes per unit, 5 bytes per patch, 8*(3n + 11) bytes of
  log table (shared copy or the kernel's argument), and for the histogram measures
  4*bins bytes per thread (at most 256 KiB) and 4*C*(bins + 1 + n) bytes of
  reference classes (kl: 4*C*(bins + 1)); for entropy and psnr, 12 bytes per
  entry of a bitonic sort of 2^ceil(log2 K) entries (shared mode ranks in
  O(K^2), stream mode sorts in O(K log^2 K)). All told at most about 25 bytes per
  pixel and channel plus 256 KiB plus the table: linear in the image, whatever K is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..measures import (
    DATA_RANGE,
    PSNR_NOISE_FLOOR,
    SSIM_C1,
    SSIM_C2,
    as_builtin,
    check_bins,
    get_measure,
)

KERNEL_DIR = Path(__file__).resolve().with_name("cuda")
HEADER = "porder_core.cuh"
KERNEL_SOURCE = "reorder.cu"

# The measures the CUDA kernels implement, with their ids: mirrors of the enum in
# cuda/porder_core.cuh (a test checks them).
MEASURE_IDS = {"entropy": 0, "psnr": 1, "mi": 2, "je": 3, "kl": 4, "l1": 5, "l2": 6, "ssim": 7}
PAIRWISE = tuple(m for m in MEASURE_IDS if get_measure(m).kind == "pairwise")
PARAM_NAMES = (
    "S", "C", "P", "G", "K", "N", "BINS", "MID", "DESC", "REF", "QS", "NT", "WB", "NW", "NTAB",
    "OFF_TAB", "OFF_RAW", "OFF_Q", "OFF_MASK", "OFF_AUX", "OFF_AUX2", "OFF_PART", "OFF_HIST",
    "OFF_CNT", "OFF_PERM", "OFF_USED", "SMEM", "OFF_TBL", "OFF_CLS", "SPACE", "GMEM",
    "OFF_SORT", "SORTN",
)
# The per-image regions, in the order of enum Region (bit r of params SPACE puts
# region r in global memory; a test checks the mirror).
REGIONS = ("tab", "raw", "q", "mask", "aux", "aux2", "part", "hist", "cnt", "perm", "used",
           "tbl", "cls", "sort")
TAB_HEADER = 8  # doubles before the log tables (T_HDR)

MAX_HIST_PIXELS = 256  # 4 words of 64 bits per mask (shared mode)
MAX_PATCHES = 65535  # kl stamps the chain step in 16 bits (shared mode)
MAX_INDEX = 2**31 - 1  # the kernel indexes an image's bytes and its scratch with int32
# Global scratch of one launch in stream mode (one slice per resident block):
# the grid is cut so that all slices together stay within it (at least one block).
SCRATCH_BYTES = 256 * 2**20
# Stream mode puts these regions in shared memory first, while they fit a budget
# that keeps the threads' occupancy (see _stream_layout); the rest go to global.
STREAM_SMEM_ORDER = ("perm", "used", "tab", "part", "aux", "aux2", "cls", "tbl", "sort", "q")
MAX_THREADS = 256  # __launch_bounds__ of the kernel
# Images per launch are bounded so that a non-contiguous input is copied to a
# contiguous one at most this many bytes at a time.
CHUNK_BYTES = 256 * 2**20
_ALIGN = 16


@dataclass(frozen=True)
class DeviceLimits:
    """What the launch geometry needs to know about a GPU (defaults: an H100 SXM)."""

    sm_count: int = 132
    max_smem_block: int = 232448  # opt-in dynamic shared memory per block (bytes)
    smem_per_sm: int = 233472  # shared memory per multiprocessor (bytes)
    max_threads_sm: int = 2048
    max_blocks_sm: int = 32
    regs_per_sm: int = 65536
    reserved_smem_block: int = 1024  # the runtime reserves this per block (sm_80+)


@dataclass(frozen=True)
class Geometry:
    """Launch geometry of the fused kernel for one (measure, shape, options).

    ``supported`` is False, with the ``reason``, when the fused kernel cannot
    take this case; then :func:`porder.reorder` runs the generic CuPy path.
    """

    measure: str
    image_size: int
    channels: int
    patch: int
    bins: int
    reference: int
    descending: bool
    grid_side: int  # G: patches per side
    patches: int  # K = G * G
    pixels: int  # n = patch * patch
    mask_bits: int  # WB: bits per mask word
    mask_words: int  # NW: words per mask
    threads: int  # per block (one block per image)
    smem_bytes: int  # dynamic shared memory per block
    offsets: dict = field(compare=False)  # region name -> (offset, bytes)
    blocks_per_sm: int  # resident blocks per multiprocessor (by threads and shared memory)
    max_grid: int  # blocks of a full launch (a grid-stride loop covers the rest)
    regs_per_sm: int
    images_per_launch: int
    supported: bool
    reason: str
    # "shared": everything in shared memory (masks for the histogram measures);
    # "stream": the regions that do not fit in the block's slice of a global
    # scratch (table mode for the histogram measures: mask_bits = mask_words = 0).
    mode: str = "shared"
    gmem_bytes: int = 0  # global scratch per block (per image in flight)
    global_regions: frozenset = frozenset()  # regions in global memory
    q_stride: int = 0  # bytes between two units' pixels
    scratch_grid: int = 2**31 - 1  # most blocks whose slices fit SCRATCH_BYTES
    sort_n: int = 0  # stream mode, standalone measures: sorted entries (power of 2 >= K)

    @property
    def kernel(self) -> str:
        """The NVRTC name expression of the template instantiation."""
        return kernel_name(self.measure, self.mask_bits, self.mask_words)

    def grid(self, n_images: int, registers: int | None = None) -> int:
        """Blocks for a launch over ``n_images`` images (at least 1).

        One wave of resident blocks, each looping over images; ``registers``
        (per thread, known once the kernel is compiled) can lower residency.
        """
        grid = self.max_grid
        if registers:
            per_block = _round_up(registers, 8) * self.threads
            by_regs = max(1, self.regs_per_sm // per_block)
            grid = min(grid, by_regs * (self.max_grid // self.blocks_per_sm))
        return max(1, min(n_images, grid, self.scratch_grid))

    def scratch_bytes(self, grid: int) -> int:
        """Bytes of global scratch a launch of ``grid`` blocks needs (0 in shared mode)."""
        return grid * self.gmem_bytes

    def chunks(self, n_images: int) -> list[tuple[int, int]]:
        """Image ranges ``[lo, hi)`` of the launches for a batch of ``n_images``."""
        step = self.images_per_launch
        return [(lo, min(lo + step, n_images)) for lo in range(0, n_images, step)]

    def params(self) -> np.ndarray:
        """The int32 params array the kernel and the host harness read."""
        off = {name: o for name, (o, _) in self.offsets.items()}
        values = {
            "S": self.image_size, "C": self.channels, "P": self.patch, "G": self.grid_side,
            "K": self.patches, "N": self.pixels, "BINS": self.bins,
            "MID": MEASURE_IDS[self.measure], "DESC": int(self.descending),
            "REF": self.reference, "QS": self.unit_stride, "NT": self.threads,
            "WB": self.mask_bits, "NW": self.mask_words, "NTAB": table_size(self.pixels),
            "OFF_TAB": off["tab"], "OFF_RAW": off["raw"], "OFF_Q": off["q"],
            "OFF_MASK": off["mask"], "OFF_AUX": off["aux"], "OFF_AUX2": off["aux2"],
            "OFF_PART": off["part"], "OFF_HIST": off["hist"], "OFF_CNT": off["cnt"],
            "OFF_PERM": off["perm"], "OFF_USED": off["used"], "SMEM": self.smem_bytes,
            "OFF_TBL": off["tbl"], "OFF_CLS": off["cls"], "OFF_SORT": off["sort"],
            "SORTN": self.sort_n,
            "SPACE": sum(1 << i for i, r in enumerate(REGIONS) if r in self.global_regions),
            "GMEM": self.gmem_bytes,
        }
        return np.array([values[name] for name in PARAM_NAMES], dtype=np.int32)

    @property
    def unit_stride(self) -> int:
        return self.q_stride or unit_stride(self.pixels)

    def table(self) -> np.ndarray:
        """The float64 table of constants and logs the kernel reads."""
        return kernel_table(self.pixels, self.bins)


def kernel_name(measure: str, mask_bits: int, mask_words: int) -> str:
    """Name expression of the kernel instantiation, e.g. ``porder_reorder<2, 64, 1>``."""
    return f"porder_reorder<{MEASURE_IDS[measure]}, {mask_bits}, {mask_words}>"


def mask_shape(measure: str, pixels: int) -> tuple[int, int]:
    """(bits per word, words) of the equality masks for ``pixels`` per patch.

    16-bit words up to 16 pixels (patch 4), 32-bit up to 32, then 1 to 4 words
    of 64 bits (patch 8: one, patch 16: four). Measures that do not bin (no
    masks) use the one instantiation (64, 1).
    """
    if not get_measure(measure).binned:
        return 64, 1
    if pixels <= 16:
        return 16, 1
    if pixels <= 32:
        return 32, 1
    return 64, min(4, -(-pixels // 64))


def unit_stride(pixels: int) -> int:
    """Bytes between two units' pixels in shared memory: 16 times an odd number.

    Neighbouring lanes read neighbouring units; an odd number of 16-byte steps
    spreads them over the shared-memory banks.
    """
    return 16 * (-(-pixels // 16) | 1)


def table_size(pixels: int) -> int:
    """Doubles in the kernel table: the header and three tables of n+1 entries."""
    return TAB_HEADER + 3 * (pixels + 1)


def kernel_table(pixels: int, bins: int) -> np.ndarray:
    """Constants and log tables, computed with NumPy as porder.measures does.

    Layout (cuda/porder_core.cuh, enum Tab): log2(n), SSIM C1 and C2, PSNR peak
    255**2 and noise floor, then log2(c), log2(c + 1/bins) and
    (c + 1/bins) / (n + 1) for c = 0..n (log2(0) is stored as 0, never read).
    """
    n = pixels
    t = np.zeros(table_size(n), dtype=np.float64)
    t[0] = math.log2(n)
    t[1], t[2] = SSIM_C1, SSIM_C2
    t[3], t[4] = DATA_RANGE**2, PSNR_NOISE_FLOOR
    c = np.arange(n + 1, dtype=np.float64)
    lg = np.zeros(n + 1)
    lg[1:] = np.log2(c[1:])
    s = 1.0 / bins
    t[TAB_HEADER : TAB_HEADER + n + 1] = lg
    t[TAB_HEADER + n + 1 : TAB_HEADER + 2 * (n + 1)] = np.log2(c + s)
    t[TAB_HEADER + 2 * (n + 1) :] = (c + s) / (n + 1.0)
    return t


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def launch_geometry(measure: str, image_size: int, channels: int, patch: int, *,
                    bins: int = 256, reference: int = 0, descending: bool | None = None,
                    limits: DeviceLimits | None = None,
                    chunk_bytes: int = CHUNK_BYTES, mode: str | None = None) -> Geometry:
    """Threads, shared-memory layout and grid of the fused kernel; no GPU needed.

    Parameters
    ----------
    measure : str or Measure
        A measure the CUDA kernels implement (``MEASURE_IDS``), or a copy of
        one under another name (:func:`porder.measures.as_builtin`).
    image_size, channels : int
        Images are (N, image_size, image_size, channels) uint8.
    patch : int
        Patch side; must divide ``image_size``.
    bins, reference, descending
        As for :func:`porder.reorder` (``descending=None``: the measure's default).
    limits : DeviceLimits, optional
        The GPU's limits (default: an H100).
    chunk_bytes : int
        Bound on the input bytes of one launch.
    mode : {None, "shared", "stream"}
        None: shared mode when one image fits the shared memory (and, for the
        histogram measures, has at most MAX_HIST_PIXELS pixels per patch),
        else stream mode. "stream" forces stream mode (tests and benchmarks
        compare the two); "shared" forces shared mode, unsupported with the
        reason when the image does not fit.

    Returns
    -------
    Geometry
        With ``supported=False`` and a ``reason`` when the fused kernel cannot
        run this case (then :func:`porder.reorder` runs the generic CuPy path).

    Raises
    ------
    ValueError
        A measure without a CUDA kernel (controls, plugins), a patch that does
        not divide the image, bad bins, reference or channels.
    """
    limits = limits or DeviceLimits()
    entry = get_measure(measure)
    m = as_builtin(entry)
    if m is None or m.name not in MEASURE_IDS:
        raise ValueError(f"measure {entry.name!r} has no CUDA kernel (kind {entry.kind!r}); "
                         f"the CUDA kernels implement {', '.join(MEASURE_IDS)}")
    check_bins(bins)
    if channels < 1 or image_size < 1:
        raise ValueError(f"images must be (N, S, S, C) with S, C >= 1, got S={image_size}, "
                         f"C={channels}")
    if patch < 1 or image_size % patch:
        raise ValueError(f"patch size {patch} does not divide the image size {image_size}")
    g = image_size // patch
    k, n = g * g, patch * patch
    if not 0 <= reference < k:
        raise ValueError(f"reference patch {reference} is out of range 0..{k - 1}")
    desc = entry.descending if descending is None else bool(descending)
    common = dict(measure=m.name, image_size=image_size, channels=channels, patch=patch,
                  bins=int(bins), reference=reference, descending=desc, grid_side=g, patches=k,
                  pixels=n, regs_per_sm=limits.regs_per_sm,
                  images_per_launch=max(1, chunk_bytes // (image_size * image_size * channels)))
    if mode not in (None, "shared", "stream"):
        raise ValueError(f"mode must be None, 'shared' or 'stream', got {mode!r}")
    shared = _shared_layout(m, g, n, channels, bins, limits)
    why = shared.pop("reason")
    if mode == "shared" or (mode is None and why is None):
        return Geometry(**common, **shared, supported=why is None, reason=why or "")
    stream = _stream_layout(m, image_size, k, n, channels, bins, limits)
    reason = stream.pop("reason")
    return Geometry(**common, **stream, supported=not reason, reason=reason)


def _blocks_per_sm(threads: int, smem: int, limits: DeviceLimits) -> int:
    per_block = smem + limits.reserved_smem_block
    return min(limits.max_blocks_sm, limits.max_threads_sm // threads,
               limits.smem_per_sm // per_block if per_block else limits.max_blocks_sm)


def _place(sizes: dict) -> tuple[dict, int]:
    """Offsets (16-byte aligned, in the order of ``sizes``) and the bytes in all."""
    offsets, at = {}, 0
    for name, size in sizes.items():
        offsets[name] = (at, size)
        at = _round_up(at + size, _ALIGN)
    return offsets, at


def _shared_layout(m, g: int, n: int, channels: int, bins: int, limits: DeviceLimits) -> dict:
    """Shared mode: the whole image in shared memory (reason None when it fits)."""
    k = g * g
    units = channels * k
    wb, nw = mask_shape(m.name, n)
    threads = min(MAX_THREADS, max(64, _round_up(units, 32)))
    if m.binned and n >= 128:
        threads = max(threads, 128)  # the mask build is the heavy phase there
    sizes = {
        "tab": 8 * table_size(n),
        "raw": g * g * n * channels,
        "q": units * unit_stride(n),
        "mask": channels * n * k * (wb // 8) * nw if m.name in ("mi", "je", "kl") else 0,
        "aux": 8 * units,
        "aux2": 8 * units if m.name == "ssim" else 0,
        "part": 8 * units,
        "hist": 4 * channels * bins if m.name == "kl" else 0,
        "cnt": 2 * units * n if m.name == "entropy" else 0,
        "perm": 4 * k,
        "used": k,
        "tbl": 0,
        "cls": 0,
        "sort": 0,
    }
    offsets, smem = _place(sizes)
    blocks = _blocks_per_sm(threads, smem, limits)
    reason = None
    patch = math.isqrt(n)
    if m.binned and n > MAX_HIST_PIXELS:
        reason = (f"{m.name} at patch {patch} has {n} pixels per patch; the masks of shared "
                  f"mode take histogram measures up to {MAX_HIST_PIXELS} (patch 16)")
    elif k > MAX_PATCHES:
        reason = f"{k} patches per image; shared mode takes up to {MAX_PATCHES}"
    elif smem > limits.max_smem_block:
        reason = (f"one image needs {smem} bytes of shared memory for {m.name} at patch "
                  f"{patch}; this GPU allows {limits.max_smem_block} per block")
    elif blocks < 1:
        reason = f"one image's {smem} bytes of shared memory do not fit a multiprocessor"
    return dict(mask_bits=wb, mask_words=nw, threads=threads, smem_bytes=smem, offsets=offsets,
                blocks_per_sm=max(blocks, 1), max_grid=max(blocks, 1) * limits.sm_count,
                reason=reason)


def _stream_layout(m, image_size: int, k: int, n: int, channels: int, bins: int,
                   limits: DeviceLimits) -> dict:
    """Stream mode: any size. The image is read from global memory (raw is the
    input, the table is the kernel's argument); the quantised units, per-unit
    statistics, chain state, per-thread value tables (histogram measures: table
    mode, no masks) and reference classes go to shared memory in the order
    STREAM_SMEM_ORDER while they fit a budget that keeps every thread slot of a
    multiprocessor usable, and to the block's slice of the global scratch
    otherwise."""
    units = channels * k
    binned = m.binned
    wb, nw = 0, 0  # the stream-mode instantiation (table mode for the histogram measures)
    threads = min(MAX_THREADS, max(64, _round_up(units, 32)))
    qs = n  # table mode and the moment measures read bytes: no padding
    sort_n = 1 << (k - 1).bit_length() if m.kind == "standalone" else 0
    sizes = {
        "tab": 8 * table_size(n),  # in shared memory a copy, else the kernel's argument
        "raw": 0,  # the input image itself
        "q": units * qs,
        "mask": 0,
        "aux": 8 * units,
        "aux2": 8 * units if m.name == "ssim" else 0,
        "part": 8 * units,
        "hist": 0, "cnt": 0,
        "perm": 4 * k,
        "used": k,
        "tbl": 4 * bins * threads if binned else 0,
        "cls": (4 * channels * (bins + 1 + (0 if m.name == "kl" else n))
                if m.name in ("mi", "je", "kl") else 0),
        "sort": 12 * sort_n,  # standalone: (key, index) pairs of the bitonic sort
    }
    resident = max(1, min(limits.max_blocks_sm, limits.max_threads_sm // threads))
    budget = min(limits.max_smem_block,
                 limits.smem_per_sm // resident - limits.reserved_smem_block)
    in_smem, used = set(), 0
    for name in STREAM_SMEM_ORDER:
        size = _round_up(sizes[name], _ALIGN)
        if 0 < size and used + size <= budget:
            in_smem.add(name)
            used += size
    smem_sizes = {r: (sizes[r] if r in in_smem else 0) for r in REGIONS}
    gmem_sizes = {r: (0 if r in in_smem or r == "tab" else sizes[r]) for r in REGIONS}
    s_off, smem = _place(smem_sizes)
    g_off, gmem = _place(gmem_sizes)
    gmem = _round_up(gmem, 256)
    global_regions = frozenset({"raw"} | ({"tab"} - in_smem)
                               | {r for r in REGIONS if gmem_sizes[r]})
    offsets = {r: (g_off[r] if r in global_regions else s_off[r]) for r in REGIONS}
    blocks = max(1, _blocks_per_sm(threads, smem, limits))
    reason = ""
    if image_size * image_size * channels > MAX_INDEX or units * qs > MAX_INDEX \
            or gmem > MAX_INDEX or 12 * sort_n > MAX_INDEX:
        reason = (f"one {image_size}x{image_size}x{channels} image is beyond the kernel's "
                  f"32-bit indices")
    return dict(mask_bits=wb, mask_words=nw, threads=threads, smem_bytes=smem, offsets=offsets,
                blocks_per_sm=blocks, max_grid=blocks * limits.sm_count, reason=reason,
                mode="stream", gmem_bytes=gmem, global_regions=global_regions, q_stride=qs,
                scratch_grid=max(1, SCRATCH_BYTES // gmem) if gmem else 2**31 - 1,
                sort_n=sort_n)


def vec_flags(in_ptr: int, out_ptr: int, geometry: Geometry) -> int:
    """Kernel ``vec`` argument: bit 0 for 4-byte loads, bit 1 for 4-byte stores."""
    img = geometry.image_size**2 * geometry.channels
    load = in_ptr % 4 == 0 and img % 4 == 0
    store = out_ptr % 4 == 0 and (geometry.patch * geometry.channels) % 4 == 0
    return int(load) | (int(store) << 1)


def error_message(code: int) -> str:
    """Explain the kernel's error flag."""
    parts = []
    if code & 1:
        parts.append("dynamic shared memory smaller than the layout")
    if code & 2:
        parts.append("kernel template arguments do not match the params")
    if code & 4:
        parts.append("block size does not match the params")
    if code & 8:
        parts.append("no global scratch although the params ask for it")
    return "; ".join(parts) or f"unknown error code {code}"

"""numba kernels of the compiled CPU backend (private; see :mod:`porder.kernels.cpu`).

Everything numba compiles lives in this one file on purpose: numba's on-disk
cache (``cache=True``) is invalidated when the file that defines a function
changes, not when a callee in another file does, so keeping callers and callees
together means a stale cache can never outlive an edit. For the same reason
the measures' constants (SSIM's C1 and C2, PSNR's peak and noise floor, the
rounding of scores) are not read from porder.measures or porder.ordering here
but passed in at run time as a :data:`Constants` tuple.

The driver at the bottom, ``reorder_range`` (a range of images, GIL released;
:mod:`porder.kernels.cpu` runs it on a pool of threads), calls :func:`_one`
per image; everything else is plain ``@njit`` code on one image. Shapes use
N images, S image side, C channels, p patch side, G = S // p, K = G * G
patches, n = p * p pixels per patch and channel.

Scores become ordering keys exactly as ``porder.ordering`` compares them:
rounded to ``DECIMALS`` decimals the way ``np.round`` rounds (x * 10^DECIMALS,
round half to even), negated for ascending measures, NaN ranking last, ties to
the lowest patch index.

Every pairwise measure runs the same greedy chain, :func:`_chain_of`, with its
scoring passed in as njit functions (one chain compiled per measure family).
The chain scores all remaining candidates of a step at once, in vector lanes
(candidate-last copies of the patch data, compacted as candidates are used).
For mi, je and kl the lanes compute a product of counts that orders the
candidates like their scores (no logarithm per candidate), and only the
candidates near the best one are scored exactly:
:func:`_count_product_band`. Above 64 pixels a patch, mi and je count by
the value classes of the reference (issue 21): in a class, a pixel's joint
count with candidate j is the number of the class's pixels where j has the
value j has there, so byte compares count 32 candidates at once (class
size^2 per 32; a pixel alone in its class counts 1), in LLVM-IR loops
(:func:`_channel_product`: numba leaves constant-width lane loops that store
scalar); classes over ``CLASS_COMPARE_MAX`` pixels take counters per lane.
At 224x224 p16 photos that is 12x the dense joint table it replaced (1
thread: 22 -> 260 img/s), 128 p16 5x, 224 p32 and 256 p32 5-6x.

The one chain replaced four hand-written loops (issue 18) on these figures,
old and new in one process, 32x32x3 photo-like images, every pairwise
measure at patches 4, 8, 16: instructions per image (callgrind, haswell code,
200 images) new/old 0.983-1.022 (mi/je p16 +2.2%, kl p4 +1.7%, l1/l2/ssim
-0.3 to -1.7%); one thread, best of 30: 0.98-1.12 (machine noise about 3%).
That needs the chain and its scoring inlined (numba IR, ``inline="always"``):
called as functions, l1/l2/ssim ran up to 11% more instructions.
"""
from __future__ import annotations

import math
from collections import namedtuple

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# Measure codes shared with cpu.py.
MI, JE, KL, L1, L2, SSIM = 0, 1, 2, 3, 4, 5
ENTROPY, PSNR = 6, 7

# The measures' constants, built by the caller from porder.measures and
# porder.ordering (module notes): round_scale is 10 ** DECIMALS.
Constants = namedtuple("Constants", ["ssim_c1", "ssim_c2", "psnr_peak2", "psnr_floor",
                                     "round_scale"])
NEG_INF = -np.inf
# Every kernel: cached on disk; float division by zero gives inf/nan instead of
# raising (no per-division checks, so loops with divisions vectorise).
_JIT = {"cache": True, "error_model": "numpy"}
# Candidates whose score may be within this many rounding steps (1 / round_scale)
# of the best are scored exactly: one for a tie after rounding, the rest room
# for the rounding of products and scores.
BAND_STEPS = 4.0
# Candidate lanes are padded to a multiple of this (whole vectors, no tails).
LANES = 16
# Candidates compared at once in the value-class chain of mi/je (byte lanes: one
# 32-byte vector).
CL = 32
# Pixels per exact int32 block of pixel sums: SUM_BLOCK * 255**2 < 2**31.
SUM_BLOCK = 32768
_U1 = np.uint64(1)
_U0 = np.uint64(0)
# float64 bits: the 52 mantissa bits
_MANTISSA = np.int64(0x000FFFFFFFFFFFFF)


# --------------------------------------------------------------------------
# Bit intrinsics (LLVM ctpop / cttz: one instruction each on x86-64)
#
# Style note for everything below: hot loops index arrays directly
# (a[k, c, t]) instead of taking views (a[k, c]) inside loops, because each
# view costs a reference-count increment and decrement (two calls) in numba.


@intrinsic
def popcount(typingctx, x):
    """Number of set bits of an unsigned integer (same type out)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return x(x), codegen


@intrinsic
def trailing_zeros(typingctx, x):
    """Index of the lowest set bit of a non-zero unsigned integer."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return x(x), codegen


def _ir_class_counts(builder, qb, rdata, g, acc, o, sz, eq, times):
    """IR of :func:`_channel_product` for one class of sz > 3 pixels at rows[o:o + sz]:
    its rows copied to g, then four pixels' counts per pass over them (acc: four
    <CL x i8> slots), their product in 32 bits handed to times (<CL x double>)."""
    i64 = ir.IntType(64)
    v8, v16, v32 = (ir.VectorType(ir.IntType(b), CL) for b in (8, 16, 32))
    with cgutils.for_range(builder, sz) as lp:  # the class's rows to G
        r = builder.load(builder.gep(rdata, [builder.add(o, lp.index)]))
        builder.store(builder.load(builder.gep(qb, [r]), align=1),
                      builder.gep(g, [lp.index]), align=1)
    groups = builder.ashr(builder.add(sz, ir.Constant(i64, 3)), ir.Constant(i64, 2))
    with cgutils.for_range(builder, groups) as lg:
        a0 = builder.shl(lg.index, ir.Constant(i64, 2))
        x = [builder.load(builder.gep(g, [builder.add(a0, ir.Constant(i64, j))]), align=1)
             for j in range(4)]
        for j in range(4):
            builder.store(ir.Constant(v8, None), acc[j])
        with cgutils.for_range(builder, sz) as lb:
            v = builder.load(builder.gep(g, [lb.index]), align=1)
            for j in range(4):
                builder.store(builder.add(builder.load(acc[j]), eq(x[j], v)), acc[j])
        c = [builder.zext(builder.select(
            builder.icmp_signed("<", builder.add(a0, ir.Constant(i64, j)), sz),
            builder.load(acc[j]), ir.Constant(v8, [1] * CL)), v16) for j in range(4)]
        times(builder.uitofp(builder.mul(builder.zext(builder.mul(c[0], c[1]), v32),
                                         builder.zext(builder.mul(c[2], c[3]), v32)),
                             ir.VectorType(ir.DoubleType(), CL)))


@intrinsic
def _channel_product(typingctx, Qb, rows, starts, ncls, G, pv, ev):
    """pv[:CL] *= the joint counts of one channel's value classes, lane by lane.

    Class i is the rows rows[starts[i]:starts[i + 1]] of the lane block Qb (R, CL)
    uint8 (C-contiguous); a class of more than ``CLASS_COMPARE_MAX`` pixels is
    left to :func:`_table_class`. A pixel's count in lane s is the number of its
    class's rows r with Qb[r, s] equal to its own (itself included: a byte).
    Per class, its rows are copied to G (>= CLASS_COMPARE_MAX + 3, CL) uint8
    scratch, then four pixels' counts at a time take one pass over the class's
    rows (one CL-byte load, four compares and four adds per row), are multiplied
    in 32 bits (rows past the class count 1) and into the products, kept in
    registers; exponents go to ev (CL,) int64 exactly (:func:`_renorm`) every
    16 passes (2^512 at most) and at the end; pv (CL,) float64 in [1, 2) in and out.
    """
    sig = types.void(Qb, rows, starts, ncls, G, pv, ev)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        v8, v16, v32, v64 = (ir.VectorType(ir.IntType(b), CL) for b in (8, 16, 32, 64))
        vd = ir.VectorType(ir.DoubleType(), CL)

        def data(k, ty):
            a = context.make_array(signature.args[k])(context, builder, value=args[k])
            return builder.bitcast(a.data, ty.as_pointer())

        def const(v, ty=i64):
            return ir.Constant(ty, v)

        qb, rdata, sdata, g = data(0, v8), data(1, i64), data(2, i64), data(4, v8)
        pptr, eptr = data(5, vd), data(6, v64)
        prod = cgutils.alloca_once(builder, vd)
        expo = cgutils.alloca_once(builder, v64)
        since = cgutils.alloca_once(builder, i64)
        acc = [cgutils.alloca_once(builder, v8) for _ in range(4)]
        small = cgutils.alloca_once_value(builder, const([1] * CL, v32))
        sbits = cgutils.alloca_once_value(builder, const(0))
        builder.store(builder.load(pptr, align=8), prod)
        builder.store(builder.load(eptr, align=8), expo)
        builder.store(const(0), since)

        def renorm():
            bits = builder.bitcast(builder.load(prod), v64)
            e = builder.sub(builder.lshr(bits, const([52] * CL, v64)), const([1023] * CL, v64))
            builder.store(builder.add(builder.load(expo), e), expo)
            m = builder.and_(bits, const([int(_MANTISSA)] * CL, v64))
            builder.store(builder.bitcast(builder.or_(m, const([1023 << 52] * CL, v64)), vd),
                          prod)

        def times(f):  # prod *= f (<CL x double>), exponents out every 16 times
            builder.store(builder.fmul(builder.load(prod), f), prod)
            n16 = builder.add(builder.load(since), const(1))
            builder.store(n16, since)
            with cgutils.if_unlikely(builder, builder.icmp_signed("==", n16, const(16))):
                renorm()
                builder.store(const(0), since)

        def fold():
            times(builder.uitofp(builder.load(small), vd))
            builder.store(const([1] * CL, v32), small)
            builder.store(const(0), sbits)

        def take_small(f, bits):  # small *= f (f < 2^bits); folded before 2^32
            builder.store(builder.mul(builder.load(small), f), small)
            nb = builder.add(builder.load(sbits), const(bits))
            builder.store(nb, sbits)
            with builder.if_then(builder.icmp_signed(">", nb, const(27))):
                fold()

        def row(o, i):
            r = builder.load(builder.gep(rdata, [builder.add(o, const(i))]))
            return builder.load(builder.gep(qb, [r]), align=1)

        def eq(x, y):  # 1 where equal, lane by lane
            return builder.zext(builder.icmp_unsigned("==", x, y), v8)

        with cgutils.for_range(builder, args[3]) as lc:
            o = builder.load(builder.gep(sdata, [lc.index]))
            sz = builder.sub(builder.load(builder.gep(sdata, [builder.add(lc.index, const(1))])), o)
            is2 = builder.icmp_signed("==", sz, const(2))
            is3 = builder.icmp_signed("==", sz, const(3))
            general = builder.and_(builder.icmp_signed("<=", sz, const(CLASS_COMPARE_MAX)),
                                   builder.not_(builder.or_(is2, is3)))
            with builder.if_then(is2):  # both counts 2 where the two bytes are equal: 4 or 1
                e = builder.icmp_unsigned("==", row(o, 0), row(o, 1))
                take_small(builder.select(e, const([4] * CL, v32), const([1] * CL, v32)), 3)
            with builder.if_then(is3):  # three compares give the three counts (<= 27)
                x0, x1, x2 = row(o, 0), row(o, 1), row(o, 2)
                e01, e02, e12 = eq(x0, x1), eq(x0, x2), eq(x1, x2)
                one = const([1] * CL, v8)
                c0 = builder.zext(builder.add(builder.add(one, e01), e02), v16)
                c1 = builder.zext(builder.add(builder.add(one, e01), e12), v16)
                c2 = builder.zext(builder.add(builder.add(one, e02), e12), v32)
                take_small(builder.mul(builder.zext(builder.mul(c0, c1), v32), c2), 5)
            with builder.if_then(general):
                _ir_class_counts(builder, qb, rdata, g, acc, o, sz, eq, times)
        fold()
        renorm()
        builder.store(builder.load(prod), pptr, align=8)
        builder.store(builder.load(expo), eptr, align=8)
        return context.get_dummy_value()

    return sig, codegen


# --------------------------------------------------------------------------
# Shared pieces: keys, patches in and out, candidate slots


@njit(**_JIT, inline="always")
def _key(s, descending, scale):
    """Ordering key of a score: higher is better, as porder.ordering compares.

    np.round(s, d) is rint(s * scale) / scale (scale = 10^d); that division
    is monotone and one-to-one far above any measure's range, so comparing
    rint(s * scale) orders and ties exactly like the rounded scores. NaN ->
    -inf (last; the generic path maps NaN and -inf both to its lowest value).
    """
    r = np.rint(s * scale)
    if not descending:
        r = -r
    if r != r:
        r = NEG_INF
    return r


@njit(**_JIT, inline="always")
def _better(key, j, bkey, best):
    """Is candidate j with key better than the best so far? (ties: lower index)."""
    return best < 0 or key > bkey or (key == bkey and j < best)


@njit(**_JIT)
def _split(img, p, qtab, q):
    """img (S, S, C) uint8 -> q (K, C, n) uint8 of qtab[value], patches row-major."""
    S, C = img.shape[0], img.shape[2]
    G = S // p
    for gy in range(G):
        for y in range(p):
            for gx in range(G):
                k = gy * G + gx
                for x in range(p):
                    for c in range(C):
                        q[k, c, y * p + x] = qtab[img[gy * p + y, gx * p + x, c]]


@njit(**_JIT)
def _copy_patches(src, dst, perm, G, p, rowlen, w):
    """Flat images src -> dst (S * rowlen words): dst patch j = src patch perm[j].

    A patch row is w words; rowlen = G * w words per image row.
    """
    for j in range(G * G):
        k = perm[j]
        so = (k // G) * p * rowlen + (k % G) * w
        do = (j // G) * p * rowlen + (j % G) * w
        for _y in range(p):
            for x in range(w):
                dst[do + x] = src[so + x]
            so += rowlen
            do += rowlen


@njit(**_JIT)
def _gather(img, perm, p, out):
    """out (S, S, C): output patch j is input patch perm[j] of img (S, S, C).

    Copies whole 8- or 4-byte words when a patch row is a multiple of them.
    """
    S, C = img.shape[0], img.shape[2]
    G = S // p
    a = img.reshape(S * S * C)
    b = out.reshape(S * S * C)
    w = p * C
    if w % 8 == 0:
        _copy_patches(a.view(np.uint64), b.view(np.uint64), perm, G, p, G * w // 8, w // 8)
    elif w % 4 == 0:
        _copy_patches(a.view(np.uint32), b.view(np.uint32), perm, G, p, G * w // 4, w // 4)
    else:
        _copy_patches(a, b, perm, G, p, G * w, w)


@njit(**_JIT, inline="always")
def _move_col(cols, pos, k, m):
    """Move the last live slot's column of cols (R, KP) into patch k's slot."""
    s, last = pos[k], m - 1
    if s != last:
        for r in range(cols.shape[0]):
            cols[r, s] = cols[r, last]


@njit(**_JIT, inline="always")
def _drop(idx, pos, k, m):
    """Remove patch k from the m live candidate slots (after its columns moved).

    idx[slot] -> patch, pos[patch] -> slot; the last live slot takes k's.
    Returns m - 1.
    """
    s, last = pos[k], m - 1
    if s != last:
        idx[s] = idx[last]
        pos[idx[s]] = s
    return last


# --------------------------------------------------------------------------
# The chain: one driver, the scoring of each measure passed in


def _chain_of(fill, take, exact=None, lanes=LANES):
    """The greedy chain of one measure family, its scoring given as njit functions:

    * ``fill(ls, xs, cur, idx, m, descending, scale, val, vbits, ex)``: the
      value of every candidate slot in val (lanes padded to LANES may be
      written too): its rounded key, or, for a family with ``exact``, its
      product of counts, exponent apart in ex when ``rescale``
      (:func:`_count_product_band`; vbits is val's int64 bit view);
    * ``take(ls, idx, pos, k, m)``: patch k leaves its slot: the lane data of
      the last live slot moves into it;
    * ``exact(xs, cur, j)``: the exact score of candidate j near the best, when
      fill gives products of counts.

    ls holds the family's lane data, xs its per-patch data. Returns the njit
    function ``chain(ls, xs, flip, band, rescale, K, reference, descending,
    scale, perm, abort)`` (flip, band, rescale: see :func:`_count_product_band`),
    which writes the chain from patch ``reference`` into perm (K,): each step
    appends the best remaining candidate against the patch appended last
    (cur). The remaining candidates sit in slots 0..m-1 (idx[slot] -> patch,
    pos[patch] -> slot; the last live slot takes a used one's place), so that
    lane data kept candidate-last stays dense.

    The functions are bound here, not passed to one jitted driver as
    arguments: numba lowers a function passed as a value to its address in
    this process (a "dynamic global"), and then refuses to cache every caller
    up to ``reorder_range`` on disk. Each chain is inlined into its caller
    (numba IR), which is cached.
    """
    proxy = exact is not None
    if not proxy:
        exact = _no_exact

    @njit(error_model="numpy", inline="always")
    def chain(ls, xs, flip, band, rescale, K, reference, descending, scale, perm, abort):
        KP = (K + lanes - 1) // lanes * lanes
        idx = np.arange(K)
        pos = np.arange(K)
        val = np.empty(KP, np.float64)
        vbits = val.view(np.int64)
        ex = np.zeros(KP, np.int64)
        take(ls, idx, pos, reference, K)
        m = _drop(idx, pos, reference, K)
        perm[0] = cur = reference
        for step in range(1, K):
            if abort[0] != 0:  # the caller was interrupted: perm is left unfinished
                return
            if m == 1:  # one candidate left: nothing to compare
                perm[step] = idx[0]
                break
            fill(ls, xs, cur, idx, m, descending, scale, val, vbits, ex)
            if proxy:
                best, thr, inband = _count_product_band(val, vbits, ex, idx, m, flip, band,
                                                        rescale)
                if inband > 1:  # near-ties: exact scores and rounded keys decide
                    best, bkey = -1, NEG_INF
                    for s in range(m):
                        if val[s] >= thr:
                            j = idx[s]
                            key = _key(exact(xs, cur, j), descending, scale)
                            if _better(key, j, bkey, best):
                                best, bkey = j, key
            else:
                best, bkey = -1, NEG_INF
                for s in range(m):
                    j = idx[s]
                    if _better(val[s], j, bkey, best):
                        best, bkey = j, val[s]
            perm[step] = cur = best
            take(ls, idx, pos, best, m)
            m = _drop(idx, pos, best, m)

    return chain


@njit(**_JIT, inline="always")
def _take_cols(ls, idx, pos, k, m):
    """take of :func:`_chain_of` for lanes ls[0] and ls[1] (R, KP): move their columns."""
    _move_col(ls[0], pos, k, m)
    _move_col(ls[1], pos, k, m)


@njit(**_JIT, inline="always")
def _take_none(ls, idx, pos, k, m):
    """take of :func:`_chain_of` for a family without lanes."""


@njit(**_JIT, inline="always")
def _no_exact(xs, cur, j):
    """exact of :func:`_chain_of` for families whose fill gives keys (never called)."""
    return 0.0


# --------------------------------------------------------------------------
# Products of counts: the proxy that orders mi, je and kl candidates


@njit(**_JIT)
def _band_max(prod, m):
    """Largest of prod[:m] (0.0 when empty)."""
    pm = 0.0
    for s in range(m):
        pm = max(pm, prod[s])
    return pm


@njit(**_JIT, inline="always")
def _band_first(prod, idx, m, thr):
    """(patch of the first slot in the band, number of slots in the band).

    A band of one is the winner outright: no other candidate can reach its
    rounded score.
    """
    first, count = -1, 0
    for s in range(m):
        if prod[s] >= thr:
            count += 1
            if first < 0:
                first = idx[s]
    return first, count


@njit(**_JIT)
def _renorm(pbits, ex, mm):
    """Move the binary exponents of the products in lanes into ex, exactly.

    pbits (KP,) int64 is the bit view of the float64 products (all positive
    and normal); each becomes its mantissa in [1, 2) (no rounding: only
    exponent bits change) and ex[s] gains the exponent taken out. Called
    every :func:`_renorm_every` channels, it keeps every product in range
    whatever the others are.
    """
    for s in range(mm):
        b = pbits[s]
        ex[s] += (b >> 52) - 1023
        pbits[s] = (b & _MANTISSA) | (1023 << 52)


@njit(**_JIT, inline="always")
def _renorm_every(C, span):
    """Channels a product of counts may take between two :func:`_renorm` calls, or 0
    when all C channels fit in float64 together; span: log2 of the largest factor
    (or its inverse) one channel can multiply a product by."""
    if C * span <= 900.0:
        return 0
    return max(1, int(900.0 // span))


@njit(**_JIT)
def _unscale(pbits, ex, m, flip):
    """Products back from :func:`_renorm`'s mantissas and exponents, over a common power of 2.

    ex[s] first takes the exponent left in product s, then each product gets
    the exponent ex[s] - e0 (clamped to +-1000), e0 the largest of ex[:m]
    (the smallest when flip, where the smallest product is the best): the
    best products are in [0.5, 2) and their ratios exact; candidates 2^1000
    away stay far outside the band.
    """
    for s in range(m):
        ex[s] += (pbits[s] >> 52) - 1023
    e0 = ex[0]
    for s in range(1, m):
        e0 = min(e0, ex[s]) if flip else max(e0, ex[s])
    for s in range(m):
        d = max(-1000, min(1000, ex[s] - e0))
        pbits[s] = (pbits[s] & _MANTISSA) | ((d + 1023) << 52)


@njit(**_JIT, inline="always")
def _count_product_band(prod, pbits, ex, idx, m, flip, band, rescale):
    """The candidates of a step that products of counts, a proxy of mi, je and kl, leave.

    Each of these scores of candidate j is affine in the log of a product of
    counts taken over the pixels t of cur (all channels), with D the number
    of factors: with P_j the product of the joint counts of (cur_t, j_t) and
    Q_j that of j's own counts of j_t,

    * je_j = log2 n - log2 P_j / D (D = n C), and mi_j = H_cur + log2(P_j /
      Q_j) / D, since H_j = log2 n - log2 Q_j / D;
    * kl_j = const - log2(prod_c T_j,c prod_t (cnt_j(cur_t) + 1/bins)) / D
      (D = (n + 1) C) with cnt_j(v) j's count of bin v and T_j,c =
      2^(sum_b log2 Q_j,b / bins) over j's smoothed histogram Q.

    So the largest product prod[s] (the smallest when flip, the direction
    opposite to the measure's own) is the best candidate, and a score
    difference d is a product ratio 2^(D d): only candidates with a product
    within ``band`` = 2^(-D BAND_STEPS / round_scale) of the best can win or
    tie after rounding. Returns (best, thr, inband): the first of them, the
    threshold (prod[s] >= thr, prod now inverted when flip) and their number;
    a band of one is the winner outright, a larger one is decided by exact
    scores and rounded keys. Pixels of cur whose bin is unique there count 1
    and are left out of P.

    With ``rescale`` the products' exponents are in ex (:func:`_renorm`): one
    image's products can span more than float64's range, and a candidate far
    behind in one channel may win in the others (a plain product underflowed
    to 0: issue 21). prod (KP,) (pbits: its int64 view) and ex are overwritten.
    """
    if rescale:
        _unscale(pbits, ex, m, flip)
    if flip:
        for s in range(m):
            prod[s] = 1.0 / prod[s]
    thr = _band_max(prod, m) * band
    best, inband = _band_first(prod, idx, m, thr)
    return best, thr, inband


# --------------------------------------------------------------------------
# mi / je: per-pixel equality bitmasks, joint counts by popcount


@njit(**_JIT, inline="always")
def _stats(E, k, c, n, nu, nucnt, h, ltab, log2n):
    """Shared-bin pixel list and entropy of patch k, channel c from its masks E (K, C, n)."""
    lsum = 0.0
    m = 0
    for t in range(n):
        cnt = popcount(E[k, c, t])
        lsum += ltab[cnt]
        nu[k, c, m] = t
        m += cnt > 1
    nucnt[k, c] = m
    h[k, c] = log2n - lsum / n


@njit(**_JIT)
def _masks(q, E, nu, nucnt, h, ltab, log2n, tab):
    """Equality masks and marginal entropies of every patch channel (n <= 64).

    q (K, C, n) bins; E (K, C, n) out, uint16 (n <= 16) or uint64: bit u of
    E[k, c, t] set when pixel u has the bin of pixel t; nu (K, C, n) int32
    out: the pixels whose bin is shared with another pixel (all others count
    1 in every joint histogram and are skipped), nucnt (K, C) their number;
    h (K, C) out: entropy in bits; ltab (n + 1,) log2 c; tab (256,) uint64
    scratch, zero in and out.
    """
    K, C, n = E.shape
    for k in range(K):
        for c in range(C):
            if n == 16:  # 4x4 patches: one 16-byte vector compare per pixel
                for t in range(16):
                    v = q[k, c, t]
                    msk = np.uint16(0)
                    for u in range(16):
                        msk |= np.uint16(np.uint16(q[k, c, u] == v) << u)
                    E[k, c, t] = msk
            else:  # a value -> mask table
                for t in range(n):
                    tab[q[k, c, t]] |= _U1 << np.uint64(t)
                for t in range(n):
                    E[k, c, t] = tab[q[k, c, t]]
                for t in range(n):
                    tab[q[k, c, t]] = _U0
            _stats(E, k, c, n, nu, nucnt, h, ltab, log2n)


@njit(**_JIT, inline="always")
def _score_masks(xs, cur, j):
    """exact of :func:`_chain_of`: mi or je of candidate j against cur, from :func:`_masks`.

    xs = (E, nu, nucnt, h, ltab, log2n, is_mi).
    """
    E, nu, nucnt, h, ltab, log2n, is_mi = xs
    C, n = E.shape[1], E.shape[2]
    acc = 0.0
    for c in range(C):
        lsum = 0.0
        for ii in range(nucnt[cur, c]):
            t = nu[cur, c, ii]
            lsum += ltab[popcount(E[cur, c, t] & E[j, c, t])]
        je = log2n - lsum / n
        acc += (h[cur, c] + h[j, c] - je) if is_mi else je
    return acc / C


@njit(**_JIT)
def _mask_lanes(E, is_mi, every):
    """Lane data of mi/je: (E2, rinit, R, every) for :func:`_fill_masks`.

    E2 (R + 1, KP): candidate-last masks, row c * n + t, and row R = C * n a
    dummy row (a factor 1) that pads a pass to four pixels; rinit: each
    candidate's factor 1/Q_j for mi (1 for je), per channel when products
    must be renormalised (every > 0), else of all channels in one.
    """
    rescale = every > 0
    K, C, n = E.shape[0], E.shape[1], E.shape[2]
    KP = (K + LANES - 1) // LANES * LANES
    R = C * n
    E2 = np.empty((R + 1, KP), E.dtype)
    rinit = np.ones((C if rescale else 1, KP), np.float64)
    for k in range(K):
        for c in range(C):
            r = 1.0
            for t in range(n):
                e = E[k, c, t]
                E2[c * n + t, k] = e
                r *= popcount(e)
            if is_mi:
                rinit[c if rescale else 0, k] /= r
    for r in range(R):
        for k in range(K, KP):
            E2[r, k] = E2[r, 0]
    for k in range(KP):
        E2[R, k] = 1
    return E2, rinit, R, every


@njit(**_JIT, inline="always")
def _fill_masks(ls, xs, cur, idx, m, descending, scale, prod, pbits, ex):
    """fill of :func:`_chain_of` for mi/je up to 64 pixels: products of joint counts.

    For every candidate in lanes, rinit times the joint counts (popcount of
    two masks) over cur's shared-bin pixels: P_j for je, P_j / Q_j for mi
    (:func:`_count_product_band`). Four reference pixels per pass over the
    lanes; counts <= 64, so a product of two fits 16 bits, of four 32.
    """
    E2, rinit, R, every = ls
    E, nu, nucnt = xs[0], xs[1], xs[2]
    C, n = E.shape[1], E.shape[2]
    e_one = E2[R, 0]
    mm = (m + LANES - 1) // LANES * LANES
    for s in range(mm):
        prod[s] = rinit[0, s]
    if every:
        for s in range(mm):
            ex[s] = 0
    for c in range(C):
        if every and c > 0:
            for s in range(mm):
                prod[s] *= rinit[c, s]
        nr = nucnt[cur, c]
        for ii in range(0, nr, 4):  # four reference pixels per pass
            t = nu[cur, c, ii]
            r0, e0 = c * n + t, E[cur, c, t]
            r1 = r2 = r3 = R  # the dummy row past the last pixel
            e1 = e2 = e3 = e_one
            if ii + 1 < nr:
                t = nu[cur, c, ii + 1]
                r1, e1 = c * n + t, E[cur, c, t]
            if ii + 2 < nr:
                t = nu[cur, c, ii + 2]
                r2, e2 = c * n + t, E[cur, c, t]
            if ii + 3 < nr:
                t = nu[cur, c, ii + 3]
                r3, e3 = c * n + t, E[cur, c, t]
            for s in range(mm):
                a = np.uint16(popcount(e0 & E2[r0, s]) * popcount(e1 & E2[r1, s]))
                b = np.uint16(popcount(e2 & E2[r2, s]) * popcount(e3 & E2[r3, s]))
                prod[s] *= np.uint32(np.uint32(a) * np.uint32(b))
        if every and (c + 1) % every == 0 and c + 1 < C:
            _renorm(pbits, ex, mm)


_chain_masks = _chain_of(_fill_masks, _take_cols, _score_masks)

# --------------------------------------------------------------------------
# mi / je, patches of more than 64 pixels: value classes of the reference in byte lanes

# Up to this many patches (32x32 p16), mi/je above 64 pixels score every candidate
# exactly instead (the lanes' set-up costs more than a few steps save).
DENSE_MAX_K = 4
# A class of the reference of more pixels than this counts with a table per lane
# (compares grow as its size squared); at most 255 (counts are bytes).
CLASS_COMPARE_MAX = 128



@njit(**_JIT)
def _marginals(q, nu, nucnt, h, ltab, log2n, hist):
    """Entropies h (K, C) and shared-bin pixel lists nu/nucnt (see _masks).

    hist (>= bins,) int32 scratch, zero in and out.
    """
    K, C, n = q.shape
    for k in range(K):
        for c in range(C):
            for t in range(n):
                hist[q[k, c, t]] += 1
            lsum = 0.0
            m = 0
            for t in range(n):
                cnt = hist[q[k, c, t]]
                lsum += ltab[cnt]
                nu[k, c, m] = t
                m += cnt > 1
            nucnt[k, c] = m
            for t in range(n):
                hist[q[k, c, t]] = 0
            h[k, c] = log2n - lsum / n


@njit(**_JIT, inline="always")
def _score_dense(q, bins, nu, nucnt, h, clogc, log2n, is_mi, joint, cur, j):
    """mi or je of candidate j against cur, joint counts in a table.

    The joint histogram of the pair goes to joint (>= bins**2,) int32, zero
    in and out; sum_t log2 count(t) is read back as the sum over cells of
    c log2 c, each cell once (then zeroed, so later pixels of it add 0).
    """
    C, n = q.shape[1], q.shape[2]
    acc = 0.0
    for c in range(C):
        mm = nucnt[cur, c]
        for ii in range(mm):
            t = nu[cur, c, ii]
            joint[np.int64(q[cur, c, t]) * bins + q[j, c, t]] += 1
        lsum = 0.0
        for ii in range(mm):
            t = nu[cur, c, ii]
            ix = np.int64(q[cur, c, t]) * bins + q[j, c, t]
            lsum += clogc[joint[ix]]
            joint[ix] = 0
        je = log2n - lsum / n
        acc += (h[cur, c] + h[j, c] - je) if is_mi else je
    return acc / C


@njit(**_JIT, inline="always")
def _score_classes(xs, cur, j):
    """exact of :func:`_chain_of`: mi or je of candidate j against cur (:func:`_score_dense`).

    xs = (q, bins, nu, nucnt, h, clogc, log2n, is_mi, joint).
    """
    q, bins, nu, nucnt, h, clogc, log2n, is_mi, joint = xs
    return _score_dense(q, bins, nu, nucnt, h, clogc, log2n, is_mi, joint, cur, j)


@njit(**_JIT, inline="always")
def _fill_dense(ls, xs, cur, idx, m, descending, scale, val, vbits, ex):
    """fill of :func:`_chain_of` for mi/je above 64 pixels and few patches: every
    candidate's key (exact scores: :func:`_score_dense`).

    xs = (q, bins, nu, nucnt, h, clogc, log2n, is_mi, joint).
    """
    q, bins, nu, nucnt, h, clogc, log2n, is_mi, joint = xs
    for s in range(m):
        sc = _score_dense(q, bins, nu, nucnt, h, clogc, log2n, is_mi, joint, cur, idx[s])
        val[s] = _key(sc, descending, scale)


_chain_dense = _chain_of(_fill_dense, _take_none)


@njit(**_JIT)
def _dense(q, bins, nu, nucnt, h, clogc, log2n, is_mi, joint, reference, descending, scale,
           perm, abort):
    """The mi/je chain above 64 pixels up to ``DENSE_MAX_K`` patches: exact scores of
    every candidate (fewer instructions than the lanes' set-up when a step has a few)."""
    xs = (q, bins, nu, nucnt, h, clogc, log2n, is_mi, joint)
    _chain_dense(xs, xs, False, 1.0, False, q.shape[0], reference, descending, scale, perm,
                 abort)


@njit(**_JIT)
def _class_lanes(q, is_mi, h, log2n):
    """Lane data of mi/je above 64 pixels: (Q3, rm, re) for :func:`_fill_classes`.

    Q3 (KP / CL, C * n, CL) uint8: bins in blocks of CL candidate lanes, row
    c * n + t (candidate k at Q3[k // CL, :, k % CL]); rm (KP,) float64 and
    re (KP,) int64: each candidate's factor 1/Q_j (mi; 1 for je) as
    rm * 2^re, rm in [1, 2), from its entropies h (K, C): log2 Q_j, the log of
    the product of j's own counts over its pixels, is n (log2 n - H_j,c) summed
    over the channels (good to 1e-12 of a band 1e6 times wider).
    """
    K, C, n = q.shape
    NB = (K + CL - 1) // CL
    Q3 = np.empty((NB, C * n, CL), np.uint8)  # padding lanes: any bytes (never read back)
    rm = np.ones(NB * CL, np.float64)
    re = np.zeros(NB * CL, np.int64)
    for k in range(K):
        kb, kl = k // CL, k % CL
        for c in range(C):
            for t in range(n):
                Q3[kb, c * n + t, kl] = q[k, c, t]
    if is_mi:
        for k in range(K):
            lq = 0.0
            for c in range(C):
                lq += n * (log2n - h[k, c])
            e = math.floor(-lq)
            rm[k] = 2.0 ** (-lq - e)
            re[k] = np.int64(e)
    return Q3, rm, re


@njit(**_JIT, inline="always")
def _classes_of(q, cur, c, hist, rows, starts):
    """The value classes of more than one pixel of patch cur, channel c.

    Class i is rows[starts[i]:starts[i + 1]], the lane rows c * n + t of its
    pixels; returns the number of classes and the largest size. hist (>= bins,) int32 scratch,
    zero in and out (while placing, hist[v] < 0 is -2 - the next free slot).
    """
    n = q.shape[2]
    for t in range(n):
        hist[q[cur, c, t]] += 1
    ncls, o, biggest = 0, 0, 0
    for t in range(n):
        v = q[cur, c, t]
        hv = hist[v]
        if hv > 1:  # the first pixel of a shared value opens its class
            starts[ncls] = o
            ncls += 1
            biggest = max(biggest, hv)
            rows[o] = c * n + t
            hist[v] = -(o + 1) - 1
            o += hv
        elif hv < 0:
            rows[-hv - 1] = c * n + t
            hist[v] = hv - 1
    starts[ncls] = o
    for t in range(n):
        hist[q[cur, c, t]] = 0
    return ncls, biggest


@njit(**_JIT)
def _table_class(Qb, rows, o, sz, tabl, pv, pb, ev, every):
    """pv[s] *= each pixel's count in the large class rows[o:o + sz], in lane s of Qb.

    Counters per lane in tabl (>= bins, CL) int32 scratch, zero in and out;
    exponents out (:func:`_renorm` on pb, ev) before, and every ``every`` factors.
    """
    _renorm(pb, ev, CL)  # up to 2^512 from the compares before
    for i in range(sz):
        r = rows[o + i]
        for s in range(CL):
            tabl[Qb[r, s], s] += 1
    for i in range(sz):
        r = rows[o + i]
        for s in range(CL):
            pv[s] *= tabl[Qb[r, s], s]
        if (i + 1) % every == 0:
            _renorm(pb, ev, CL)
    for i in range(sz):
        r = rows[o + i]
        for s in range(CL):
            tabl[Qb[r, s], s] = 0
    _renorm(pb, ev, CL)


@njit(**_JIT)
def _block_products(Qb, rows, starts, ncls, biggest, G, tabl, pv, pb, ev, every):
    """pv (CL,) *= the joint counts of one channel's classes in the lane block Qb (R, CL)
    (see :func:`_fill_classes`; pb, ev: pv's bits and exponents; biggest: the
    largest class size)."""
    _channel_product(Qb, rows, starts, ncls, G, pv, ev)
    if biggest > CLASS_COMPARE_MAX:
        for i in range(ncls):
            o, sz = starts[i], starts[i + 1] - starts[i]
            if sz > CLASS_COMPARE_MAX:
                _table_class(Qb, rows, o, sz, tabl, pv, pb, ev, every)


@njit(**_JIT, inline="always")
def _fill_classes(ls, xs, cur, idx, m, descending, scale, prod, pbits, ex):
    """fill of :func:`_chain_of` for mi/je above 64 pixels: products of joint counts.

    The pixels of cur fall in value classes per channel; a pixel alone in
    its class counts 1. In a class, the joint count of a pixel in lane s is
    the number of the class's pixels where candidate s has the same value:
    byte compares of CL lanes at once (class size^2 per block of lanes),
    four counts multiplied into prod per pass; a class over
    ``CLASS_COMPARE_MAX`` pixels counts with a table per lane instead
    (:func:`_table_class`). prod starts at 1/Q_j (mi) or 1 (je), exponents
    go to ex exactly.
    """
    Q3, rm, re, G, tabl, rows, starts, hist, every = ls
    q = xs[0]
    C = q.shape[1]
    nb = (m + CL - 1) // CL
    for s in range(nb * CL):
        prod[s] = rm[s]
        ex[s] = re[s]
    for c in range(C):
        ncls, biggest = _classes_of(q, cur, c, hist, rows, starts)
        for blk in range(nb):
            b0 = blk * CL
            _block_products(Q3[blk], rows, starts, ncls, biggest, G, tabl, prod[b0:b0 + CL],
                            pbits[b0:b0 + CL], ex[b0:b0 + CL], every)


@njit(**_JIT, inline="always")
def _take_classes(ls, idx, pos, k, m):
    """take of :func:`_chain_of` for :func:`_fill_classes`: the last live slot's lane
    data moves into patch k's slot."""
    Q3, rm, re = ls[0], ls[1], ls[2]
    s, last = pos[k], m - 1
    if s != last:
        sb, sl, lb, ll = s // CL, s % CL, last // CL, last % CL
        for r in range(Q3.shape[1]):
            Q3[sb, r, sl] = Q3[lb, r, ll]
        rm[s] = rm[last]
        re[s] = re[last]


_chain_classes = _chain_of(_fill_classes, _take_classes, _score_classes, CL)


@njit(**_JIT)
def _classes(q, is_mi, bins, nu, nucnt, h, clogc, log2n, hist, joint, flip, band, reference,
             descending, scale, perm, abort):
    """The mi/je chain above 64 pixels: value classes of the reference in byte lanes."""
    K, C, n = q.shape
    every = max(1, int(900 // math.ceil(math.log2(n + 1))))  # counts <= n
    Q3, rm, re = _class_lanes(q, is_mi, h, log2n)
    tabl = joint[bins * bins:bins * bins + 256 * CL].reshape((256, CL))  # zero in and out
    ls = (Q3, rm, re, np.empty((CLASS_COMPARE_MAX + 3, CL), np.uint8), tabl,
          np.empty(n, np.int64), np.empty(n + 1, np.int64), hist, every)
    xs = (q, bins, nu, nucnt, h, clogc, log2n, is_mi, joint)
    _chain_classes(ls, xs, flip, band, True, K, reference, descending, scale, perm, abort)

@njit(**_JIT)
def _mi_je(q, is_mi, bins, reference, descending, ltab, clogc, log2n, tab, hist, joint, scale,
           perm, abort):
    """The mi/je chain: bitmask lanes up to 64 pixels, value classes in byte lanes above
    (exact scores for a few patches)."""
    K, C, n = q.shape
    nu = np.empty((K, C, n), np.int32)
    nucnt = np.empty((K, C), np.int32)
    h = np.empty((K, C), np.float64)
    flip = descending != is_mi  # mi is natively descending, je ascending
    band = 2.0 ** (-C * n * BAND_STEPS / scale)
    every = _renorm_every(C, n * math.log2(max(n, 2)))  # counts in [1, n]
    if n <= 16:
        E16 = np.empty((K, C, n), np.uint16)
        _masks(q, E16, nu, nucnt, h, ltab, log2n, tab)
        _chain_masks(_mask_lanes(E16, is_mi, every), (E16, nu, nucnt, h, ltab, log2n, is_mi),
                     flip, band, every > 0, K, reference, descending, scale, perm, abort)
    elif n <= 64:
        E64 = np.empty((K, C, n), np.uint64)
        _masks(q, E64, nu, nucnt, h, ltab, log2n, tab)
        _chain_masks(_mask_lanes(E64, is_mi, every), (E64, nu, nucnt, h, ltab, log2n, is_mi),
                     flip, band, every > 0, K, reference, descending, scale, perm, abort)
    else:
        _marginals(q, nu, nucnt, h, ltab, log2n, hist)
        if K <= DENSE_MAX_K:
            _dense(q, bins, nu, nucnt, h, clogc, log2n, is_mi, joint, reference, descending,
                   scale, perm, abort)
        else:
            _classes(q, is_mi, bins, nu, nucnt, h, clogc, log2n, hist, joint, flip, band,
                     reference, descending, scale, perm, abort)


# --------------------------------------------------------------------------
# kl: sparse histograms (a bitset of the bins present + their counts)


@njit(**_JIT)
def _kl_hists(q, bins, bits, pre, cnts, negh, tsum, plp, lt, hist):
    """Per patch channel: bitset of present bins and their counts, -H and sum log Q.

    bits (K, C, W) uint64 out; pre (K, C, W) int32 out: set bits in the words
    before w; cnts (K, C, n) int32 out: counts of the present bins in bin
    order; negh (K, C) out: sum_b P_b log2 P_b; tsum (K, C) out: sum_b log2 P_b;
    plp, lt (n + 1,): P(c) log2 P(c) and log2 P(c) of a bin with count c;
    hist (>= bins,) int32 scratch, zero in and out.
    """
    K, C, n = q.shape
    W = bits.shape[2]
    for k in range(K):
        for c in range(C):
            for w in range(W):
                bits[k, c, w] = _U0
            for t in range(n):
                v = q[k, c, t]
                bits[k, c, v >> 6] |= _U1 << np.uint64(v & 63)
                hist[v] += 1
            r = 0
            s_plp = 0.0
            s_lt = 0.0
            for w in range(W):
                pre[k, c, w] = r
                m = bits[k, c, w]
                while m:
                    v = w * 64 + np.int64(trailing_zeros(m))
                    m &= m - _U1
                    cnt = hist[v]
                    hist[v] = 0
                    cnts[k, c, r] = cnt
                    s_plp += plp[cnt]
                    s_lt += lt[cnt]
                    r += 1
            negh[k, c] = s_plp + (bins - r) * plp[0]
            tsum[k, c] = s_lt + (bins - r) * lt[0]


@njit(**_JIT, inline="always")
def _kl_score(bits, pre, cnts, negh, tsum, lt, n, bins, cur, j):
    """KL(cur || j) from :func:`_kl_hists` (bins present in both patches only)."""
    C, W = bits.shape[1], bits.shape[2]
    lt0 = lt[0]
    acc = 0.0
    for c in range(C):
        x = n * lt0
        for w in range(W):
            bc, bj = bits[cur, c, w], bits[j, c, w]
            m = bc & bj
            while m:
                low = (m & (_U0 - m)) - _U1  # the bits below the lowest set bit
                m &= m - _U1
                ri = pre[cur, c, w] + np.int64(popcount(bc & low))
                rj = pre[j, c, w] + np.int64(popcount(bj & low))
                x += cnts[cur, c, ri] * (lt[cnts[j, c, rj]] - lt0)
        cross = (x + tsum[j, c] / bins) / (n + 1)
        acc += negh[cur, c] - cross
    return acc / C


@njit(**_JIT, inline="always")
def _score_kl(xs, cur, j):
    """exact of :func:`_chain_of`: KL(cur || j), xs = (bits, pre, cnts, negh, tsum, lt, n,
    bins) from :func:`_kl_hists`."""
    bits, pre, cnts, negh, tsum, lt, n, bins = xs
    return _kl_score(bits, pre, cnts, negh, tsum, lt, n, bins, cur, j)


@njit(**_JIT, inline="always")
def _fill_kl_keys(ls, xs, cur, idx, m, descending, scale, val, vbits, ex):
    """fill of :func:`_chain_of` for kl above 64 pixels: every candidate's key."""
    bits, pre, cnts, negh, tsum, lt, n, bins = xs
    for s in range(m):
        sc = _kl_score(bits, pre, cnts, negh, tsum, lt, n, bins, cur, idx[s])
        val[s] = _key(sc, descending, scale)


@njit(**_JIT, inline="always")
def _fill_kl(ls, xs, cur, idx, m, descending, scale, prod, pbits, ex):
    """fill of :func:`_chain_of` for kl up to 64 pixels: products of smoothed counts.

    For every candidate j in lanes, prod_c T_j,c prod_t (cnt_j(cur_t) +
    1/bins) (:func:`_count_product_band`), two pixels of cur per pass.
    """
    ct, tau, q, every = ls
    C, n = q.shape[1], q.shape[2]
    bins = xs[7]
    ib = 1.0 / bins
    mm = (m + LANES - 1) // LANES * LANES
    for s in range(mm):
        prod[s] = 1.0
    if every:
        for s in range(mm):
            ex[s] = 0
    for c in range(C):
        for s in range(mm):
            prod[s] *= tau[c, s]
        for t in range(0, n - 1, 2):
            r0, r1 = c * bins + q[cur, c, t], c * bins + q[cur, c, t + 1]
            for s in range(mm):
                prod[s] *= (ct[r0, s] + ib) * (ct[r1, s] + ib)
        if n % 2:
            r0 = c * bins + q[cur, c, n - 1]
            for s in range(mm):
                prod[s] *= ct[r0, s] + ib
        if every and (c + 1) % every == 0 and c + 1 < C:
            _renorm(pbits, ex, mm)


@njit(**_JIT, inline="always")
def _take_kl(ls, idx, pos, k, m):
    """take of :func:`_chain_of` for kl: clear patch k's counts, move the last slot's in."""
    ct, tau, q = ls[0], ls[1], ls[2]
    C, n = q.shape[1], q.shape[2]
    bins = ct.shape[0] // C
    s, last = pos[k], m - 1
    lk = idx[last]
    for c in range(C):
        for t in range(n):
            ct[c * bins + q[k, c, t], s] = 0
        if s != last:
            for t in range(n):
                ct[c * bins + q[lk, c, t], s] = ct[c * bins + q[lk, c, t], last]
            for t in range(n):
                ct[c * bins + q[lk, c, t], last] = 0
    _move_col(tau, pos, k, m)


_chain_kl = _chain_of(_fill_kl, _take_kl, _score_kl)
_chain_kl_keys = _chain_of(_fill_kl_keys, _take_none)

@njit(**_JIT)
def _kl_lanes(q, xs, reference, descending, cntT, scale, perm, abort):
    """The kl chain with candidate-last bin counts in lanes (up to 64 pixels).

    cntT (C * bins * KP,) uint8 scratch (KP = K rounded up to LANES), zero in
    and out.
    """
    K, C, n = q.shape
    tsum, bins = xs[4], xs[7]
    flip = descending  # kl is natively ascending: the largest product is the best
    band = 2.0 ** (-C * (n + 1) * BAND_STEPS / scale)
    # n factors in [1/bins, n + 1) and T in [1/(bins (n + 1)), 1) per channel
    every = _renorm_every(C, n * max(math.log2(n + 1), math.log2(bins))
                          + math.log2(bins * (n + 1)))
    KP = (K + LANES - 1) // LANES * LANES
    ct = cntT[: C * bins * KP].reshape((C * bins, KP))
    tau = np.empty((C, KP), np.float64)
    for k in range(K):
        for c in range(C):
            for t in range(n):
                ct[c * bins + q[k, c, t], k] += 1
            tau[c, k] = 2.0 ** (tsum[k, c] / bins)
    for k in range(K, KP):
        for c in range(C):
            tau[c, k] = 1.0
    _chain_kl((ct, tau, q, every), xs, flip, band, every > 0, K, reference, descending, scale,
              perm, abort)
    if abort[0] != 0:  # perm unfinished; the caller drops this thread's scratch
        return
    last = perm[K - 1]  # still counted in slot 0: leave the scratch zeroed
    for c in range(C):
        for t in range(n):
            ct[c * bins + q[last, c, t], 0] = 0


@njit(**_JIT)
def _kl(q, bins, reference, descending, plp, lt, hist, cntT, scale, perm, abort):
    """The KL(reference || candidate) chain: counts in lanes up to 64 pixels, exact
    scores of every candidate above."""
    K, C, n = q.shape
    W = (bins + 63) // 64
    bits = np.empty((K, C, W), np.uint64)
    pre = np.empty((K, C, W), np.int32)
    cnts = np.empty((K, C, n), np.int32)
    negh = np.empty((K, C), np.float64)
    tsum = np.empty((K, C), np.float64)
    _kl_hists(q, bins, bits, pre, cnts, negh, tsum, plp, lt, hist)
    xs = (bits, pre, cnts, negh, tsum, lt, n, bins)
    if n <= 64:
        _kl_lanes(q, xs, reference, descending, cntT, scale, perm, abort)
    else:
        _chain_kl_keys(xs, xs, False, 1.0, False, K, reference, descending, scale, perm, abort)


# --------------------------------------------------------------------------
# l1 / l2 / ssim: exact integer pixel sums in lanes


@njit(**_JIT)
def _moments(q, s1, mu, var):
    """Per patch channel: pixel sum s1, mean mu and population variance var (K, C)."""
    K, C, n = q.shape
    for k in range(K):
        for c in range(C):
            a = 0
            b = 0
            for t in range(n):
                v = np.int64(q[k, c, t])
                a += v
                b += v * v
            fa, fb = float(a), float(b)
            s1[k, c] = fa
            mu[k, c] = fa / n
            var[k, c] = (n * fb - fa * fa) / (n * n)


@njit(**_JIT, inline="always")
def _fill_sums(ls, xs, cur, idx, m, descending, scale, tot, vbits, ex):
    """fill of :func:`_chain_of` for l1 / l2 / ssim: every candidate's key, in lanes.

    Accumulates for all candidates the exact per-channel sum of |a - b|,
    (a - b)^2 or a * b (int32 lanes over blocks of SUM_BLOCK pixels, which
    cannot overflow, added up in float64, exact below 2^53), then evaluates
    the float formula of porder.measures in the same order, in lanes too: the
    scores are bitwise the generic path's.
    """
    q2, st, acc, exs = ls
    q, code, s1, mu, var, c1, c2 = xs
    C, n = q.shape[1], q.shape[2]
    nn = float(n * n)
    mm = (m + LANES - 1) // LANES * LANES
    for s in range(mm):
        tot[s] = 0.0
    for c in range(C):
        for s in range(mm):
            exs[s] = 0.0
        for b0 in range(0, n, SUM_BLOCK):
            b1 = min(n, b0 + SUM_BLOCK)
            for s in range(mm):
                acc[s] = 0
            for t in range(b0, b1 - 1, 2):
                v0, v1 = np.int32(q[cur, c, t]), np.int32(q[cur, c, t + 1])
                r0, r1 = c * n + t, c * n + t + 1
                if code == L1:
                    for s in range(mm):
                        acc[s] += (np.int32(abs(np.int32(v0 - np.int32(q2[r0, s]))))
                                   + np.int32(abs(np.int32(v1 - np.int32(q2[r1, s])))))
                elif code == L2:
                    for s in range(mm):
                        d0 = np.int32(v0 - np.int32(q2[r0, s]))
                        d1 = np.int32(v1 - np.int32(q2[r1, s]))
                        acc[s] += np.int32(d0 * d0) + np.int32(d1 * d1)
                else:
                    for s in range(mm):
                        acc[s] += (np.int32(v0 * np.int32(q2[r0, s]))
                                   + np.int32(v1 * np.int32(q2[r1, s])))
            if (b1 - b0) % 2:
                v0, r0 = np.int32(q[cur, c, b1 - 1]), c * n + b1 - 1
                for s in range(mm):
                    d0 = np.int32(v0 - np.int32(q2[r0, s]))
                    if code == L1:
                        acc[s] += abs(d0)
                    elif code == L2:
                        acc[s] += d0 * d0
                    else:
                        acc[s] += v0 * np.int32(q2[r0, s])
            for s in range(mm):
                exs[s] += acc[s]
        # the formula of porder.measures, candidate by candidate, in lanes
        if code == L1:
            for s in range(mm):
                tot[s] += exs[s] / n
        elif code == L2:
            for s in range(mm):
                tot[s] += math.sqrt(exs[s] / n)
        else:
            s1a, mua, va = s1[cur, c], mu[cur, c], var[cur, c]
            for s in range(mm):
                mub = st[C + c, s]
                cov = (n * exs[s] - s1a * st[c, s]) / nn
                num = (2 * mua * mub + c1) * (2 * cov + c2)
                den = (mua * mua + mub * mub + c1) * (va + st[2 * C + c, s] + c2)
                tot[s] += num / den
    for s in range(mm):  # keys as _key computes them, in lanes
        r = np.rint(tot[s] / C * scale)
        r = r if descending else -r
        tot[s] = NEG_INF if r != r else r


_chain_sums = _chain_of(_fill_sums, _take_cols)

@njit(**_JIT)
def _sums(q, code, reference, descending, consts, perm, abort):
    """The l1 / l2 / ssim chain: exact pixel sums of all candidates in lanes."""
    K, C, n = q.shape
    KP = (K + LANES - 1) // LANES * LANES
    q2 = np.zeros((C * n, KP), np.uint8)  # candidate-last pixels, row c * n + t
    for k in range(K):
        for c in range(C):
            for t in range(n):
                q2[c * n + t, k] = q[k, c, t]
    s1 = np.empty((K, C), np.float64)
    mu = np.empty((K, C), np.float64)
    var = np.empty((K, C), np.float64)
    st = np.zeros((3 * C, KP), np.float64)  # ssim: candidate-last s1, mu, var
    if code == SSIM:
        _moments(q, s1, mu, var)
        for k in range(K):
            for c in range(C):
                st[c, k], st[C + c, k], st[2 * C + c, k] = s1[k, c], mu[k, c], var[k, c]
    ls = (q2, st, np.empty(KP, np.int32), np.empty(KP, np.float64))
    xs = (q, code, s1, mu, var, consts.ssim_c1, consts.ssim_c2)
    _chain_sums(ls, xs, False, 1.0, False, K, reference, descending, consts.round_scale, perm,
                abort)


# --------------------------------------------------------------------------
# Standalone measures: entropy and psnr, then a stable sort


@njit(**_JIT)
def _block_sum(a, lo, n):
    """NumPy's pairwise-sum leaf (n <= 128): eight running sums, then the rest."""
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[lo + i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    while i < n - (n % 8):
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@njit(**_JIT)
def _pairwise_sum(a, n, stack):
    """Sum of a[:n] in NumPy's pairwise order (np.add.reduce on float64).

    NumPy halves a range of more than 128 elements (the first half rounded
    down to a multiple of 8) and adds the two sums. The recursion is unrolled
    with an explicit stack (4, 64) int64 scratch: numba's cache cannot reload
    recursive functions.
    """
    if n <= 128:
        return _block_sum(a, 0, n)
    vals = stack[3].view(np.float64)
    sp, vp = 1, 0
    stack[0, 0], stack[1, 0], stack[2, 0] = 0, n, 0  # lo, length, state
    while sp:
        lo, m, s = stack[0, sp - 1], stack[1, sp - 1], stack[2, sp - 1]
        m2 = m // 2
        m2 -= m2 % 8
        if m <= 128:
            sp -= 1
            vals[vp] = _block_sum(a, lo, m)
            vp += 1
        elif s == 0:  # left half next
            stack[2, sp - 1] = 1
            stack[0, sp], stack[1, sp], stack[2, sp] = lo, m2, 0
            sp += 1
        elif s == 1:  # right half next
            stack[2, sp - 1] = 2
            stack[0, sp], stack[1, sp], stack[2, sp] = lo + m2, m - m2, 0
            sp += 1
        else:  # both done: combine
            sp -= 1
            vals[vp - 2] = vals[vp - 2] + vals[vp - 1]
            vp -= 1
    return vals[0]


@njit(**_JIT)
def _standalone(q, code, descending, clogc, log2n, hist, consts, perm):
    """Stable sort of entropy/psnr patch scores into perm (K,), NaN last.

    Entropy sums c log2 c of the bins present in bin order, zero-padded to n,
    pairwise like NumPy: the exact arithmetic of porder.measures.entropy.
    """
    K, C, n = q.shape
    keys = np.empty(K, np.float64)
    buf = np.zeros(n, np.float64)
    bits = np.zeros(4, np.uint64)
    stack = np.empty((4, 64), np.int64)
    for k in range(K):
        acc = 0.0
        for c in range(C):
            if code == ENTROPY:
                for t in range(n):
                    v = q[k, c, t]
                    hist[v] += 1
                    bits[v >> 6] |= _U1 << np.uint64(v & 63)
                r = 0
                for w in range(4):
                    b = bits[w]
                    bits[w] = _U0
                    while b:
                        v = w * 64 + np.int64(trailing_zeros(b))
                        b &= b - _U1
                        buf[r] = clogc[hist[v]]
                        hist[v] = 0
                        r += 1
                acc += log2n - _pairwise_sum(buf, n, stack) / n
                for i in range(r):
                    buf[i] = 0.0
            else:  # PSNR
                a = 0
                b2 = 0
                for t in range(n):
                    v = np.int64(q[k, c, t])
                    a += v
                    b2 += v * v
                fa, fb = float(a), float(b2)
                v2 = (n * fb - fa * fa) / (n * n)
                acc += 10.0 * math.log10(consts.psnr_peak2 / max(v2, consts.psnr_floor))
        r = np.rint(acc / C * consts.round_scale)  # np.round(., d) without the monotone / 10^d
        keys[k] = -r if descending else r
    _argsort_stable(keys, perm)


@njit(**_JIT, inline="always")
def _lt(a, b):
    """a < b with NaN after everything (NumPy's sort order)."""
    return a < b or (b != b and a == a)


@njit(**_JIT)
def _argsort_stable(keys, out):
    """out (K,) int64 = np.argsort(keys, kind='stable'): bottom-up merge sort."""
    K = keys.shape[0]
    tmp = np.empty(K, np.int64)
    for i in range(K):
        out[i] = i
    width = 1
    while width < K:
        for lo in range(0, K, 2 * width):
            mid, hi = min(lo + width, K), min(lo + 2 * width, K)
            i, j, o = lo, mid, lo
            while i < mid and j < hi:
                if _lt(keys[out[j]], keys[out[i]]):
                    tmp[o] = out[j]
                    j += 1
                else:
                    tmp[o] = out[i]
                    i += 1
                o += 1
            while i < mid:
                tmp[o] = out[i]
                i += 1
                o += 1
            while j < hi:
                tmp[o] = out[j]
                j += 1
                o += 1
        for i in range(K):
            out[i] = tmp[i]
        width *= 2


# --------------------------------------------------------------------------
# Drivers


@njit(**_JIT)
def _one(img, code, p, bins, reference, descending, qtab, ltab, clogc, log2n, plp, lt, consts,
         hist, tab, joint, cntT, out, perm, abort):
    """One image (S, S, C): its ordering into perm (K,) and reordered copy into out."""
    S, C = img.shape[0], img.shape[2]
    G = S // p
    K, n = G * G, p * p
    q = np.empty((K, C, n), np.uint8)
    _split(img, p, qtab, q)
    scale = consts.round_scale
    if code == ENTROPY or code == PSNR:
        _standalone(q, code, descending, clogc, log2n, hist, consts, perm)
    elif code == MI or code == JE:
        _mi_je(q, code == MI, bins, reference, descending, ltab, clogc, log2n, tab, hist, joint,
               scale, perm, abort)
    elif code == KL:
        _kl(q, bins, reference, descending, plp, lt, hist, cntT, scale, perm, abort)
    else:
        _sums(q, code, reference, descending, consts, perm, abort)
    if abort[0] != 0:  # perm unfinished: nothing to gather
        return
    _gather(img, perm, p, out)


@njit(**_JIT, nogil=True)
def reorder_range(images, lo, hi, code, p, bins, reference, descending, qtab, ltab, clogc,
                  log2n, plp, lt, consts, hist, tab, joint, cntT, out, perm, abort):
    """Images lo..hi-1 of (N, S, S, C) on the calling thread, GIL released.

    code: a measure code; qtab (256,) uint8 value -> bin; ltab, clogc, plp, lt
    (n + 1,): log2 c, c log2 c and KL's P log2 P, log2 P of a count c;
    consts: the measures' :data:`Constants`; hist (256,) int32, tab (1024,)
    uint64, joint (bins**2 + 256 * CL or 1,) int32 and cntT (C * bins * KP or 1,) uint8:
    zeroed scratch of this thread; out (N, S, S, C) uint8 and perm (N, K)
    int64 are written. abort (1,) uint8: set to 1 by another thread to stop; the
    chains poll it once per step, so a run ends within one step of one image,
    leaving out and perm unfinished (the caller raises instead of returning them).
    """
    for i in range(lo, hi):
        if abort[0] != 0:
            return
        _one(images[i], code, p, bins, reference, descending, qtab, ltab, clogc, log2n, plp, lt,
             consts, hist, tab, joint, cntT, out[i], perm[i], abort)

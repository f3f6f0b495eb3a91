"""An independent implementation of porder's greedy POR chain for ``mi`` and ``je``: the yardstick.

Written from the description in issue 21 ("What made the independent chain
faster"), without porder's kernels, so that porder's compiled backend has a bar
to reach at every size. It computes exactly porder's permutations (checked
against the generic path, :func:`porder.reorder` with ``backend='generic'``, on
every image a benchmark times: :func:`check`), for porder's defaults only:
``bins=256`` (each uint8 value its own bin, so no quantisation), reference patch
0, each measure's own direction (mi: highest first, je: lowest first), scores
averaged over the C channels, ties after rounding to 9 decimals to the lowest
patch index.

How one image is ordered (K patches of n = p * p pixels, C channels):

* **Candidates in lanes.** The remaining candidates sit side by side in slots
  of a candidate-last byte array (row ``c * n + t``: pixel t of channel c of
  every slot), 32 slots to a 256-bit vector; a used candidate's slot takes the
  last live slot's column, so the live slots stay dense.
* **Classes of the reference.** Per channel, the reference's pixels are grouped
  by value; a pixel unique in the reference has a joint count of 1 with any
  candidate and is skipped, so only classes of size > 1 are visited. The joint
  count of pixel t of a class T for candidate j is the number of u in T with
  ``j[u] == j[t]``: byte-wise equality compares of two 32-byte rows count it
  for 32 candidates at once, |T|^2 compares per class per 32 candidates
  (:func:`_group_products`, an LLVM vector loop written out as an intrinsic, so
  that the counts stay in registers).
* **Products as a proxy.** mi_j = const + log2(P_j / Q_j) / (n C) and je_j =
  const - log2(P_j) / (n C), with P_j the product of candidate j's joint counts
  over every pixel of the reference and Q_j the product of j's own counts. The
  counts are multiplied four at a time in 32-bit lanes (<= 64^4) and folded into
  a float64 product per candidate, whose binary exponent is moved out into an
  integer exactly (only exponent bits change) before it can overflow.
* **Flat areas.** Classes of more than 64 pixels use a scatter table of
  counters per candidate instead of |T|^2 compares.
* **Exact ties.** Only candidates whose product is within 2e-9 (in score units:
  a factor 2^(-2e-9 n C)) of the best one can win or tie after rounding; when
  there is more than one, each gets its exact score by the generic formula
  (per channel H(cur) + H(j) - JE from the joint histogram's sum of c log2 c)
  and the rounded key decides, ties to the lowest index.

Public: :func:`reorder` (images in, reordered images and perms out, on
``workers`` threads: the compiled loop releases the GIL) and :func:`check`.
It imports porder only in :func:`check` (the generic path it is held to).
"""
from __future__ import annotations

import functools
import math
import threading
import time

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

W = 32                  # candidate lanes per vector (bytes)
BIG = 64                # classes over this many pixels use a scatter table
BAND = 2e-9             # score distance from the best that is scored exactly
SCALE = 1e9             # porder rounds scores to 9 decimals
_MANT = np.int64(0x000FFFFFFFFFFFFF)
_ONE_EXP = np.int64(1023 << 52)
_JIT = {"cache": True, "error_model": "numpy", "boundscheck": False}


# --------------------------------------------------------------------------
# The vector loop: one class of the reference, 32 candidates


@intrinsic
def _group_products(typingctx, lanes, rows, cstart, csize, ncls, base, prod, ex):
    """Products of joint counts over the reference's classes of at most BIG pixels,
    for the 32 candidate slots from base.

    lanes (R * KP,) uint8: candidate-last pixels; class i is the pixels whose
    lane-row byte offsets (row * KP) are rows[cstart[i] : cstart[i] + csize[i]].
    For each pixel a of a class, count over b the slots whose byte b equals
    their byte a: one <32 x i8> compare and subtract per b, two pixels a at a
    time (each row b loaded once for both; two independent chains). Two counts
    are multiplied in 16 bits (<= 64 * 64), then into a <32 x i32> accumulator,
    which is folded into the <32 x double> product once it holds four or more
    counts (at most five: < 2^32, exact). Every 32 folds (< 2^960) and at the
    end, the products' binary exponents move into the <32 x i64> exponents
    exactly (mantissas in [1, 2)). Writes prod[base : base + 32] (mantissas)
    and ex[base : base + 32].
    """
    sig = types.void(lanes, rows, cstart, csize, ncls, base, prod, ex)

    def codegen(context, builder, signature, args):
        lanes_a, rows_a, cs_a, cz_a, ncls_v, base_v, prod_a, ex_a = args
        ty = signature.args
        data = [context.make_array(ty[i])(context, builder, args[i]).data
                for i in (0, 1, 2, 3, 6, 7)]
        ldata, rdata, csdata, czdata, pdata, edata = data
        i64 = ir.IntType(64)
        v8 = ir.VectorType(ir.IntType(8), W)
        v16 = ir.VectorType(ir.IntType(16), W)
        v32 = ir.VectorType(ir.IntType(32), W)
        v64 = ir.VectorType(i64, W)
        vd = ir.VectorType(ir.DoubleType(), W)
        prodp = builder.bitcast(builder.gep(pdata, [base_v]), vd.as_pointer())
        exp_ = builder.bitcast(builder.gep(edata, [base_v]), v64.as_pointer())
        ones = ir.Constant(v32, [1] * W)
        zero8 = ir.Constant(v8, [0] * W)
        one8 = ir.Constant(v8, [1] * W)
        prod_s = cgutils.alloca_once_value(builder, ir.Constant(vd, [1.0] * W))
        ex_s = cgutils.alloca_once_value(builder, ir.Constant(v64, [0] * W))
        acc_s = cgutils.alloca_once_value(builder, ones)
        nacc_s = cgutils.alloca_once_value(builder, i64(0))
        nfold_s = cgutils.alloca_once_value(builder, i64(0))
        c1_s = cgutils.alloca_once_value(builder, zero8)
        c2_s = cgutils.alloca_once_value(builder, zero8)
        mant = ir.Constant(v64, [0x000FFFFFFFFFFFFF] * W)
        onexp = ir.Constant(v64, [1023 << 52] * W)

        def renorm():
            b = builder.bitcast(builder.load(prod_s), v64)
            e = builder.sub(builder.lshr(b, ir.Constant(v64, [52] * W)),
                            ir.Constant(v64, [1023] * W))
            builder.store(builder.add(builder.load(ex_s), e), ex_s)
            b = builder.or_(builder.and_(b, mant), onexp)
            builder.store(builder.bitcast(b, vd), prod_s)

        def fold():
            f = builder.uitofp(builder.load(acc_s), vd)
            builder.store(builder.fmul(builder.load(prod_s), f), prod_s)
            builder.store(ones, acc_s)

        with cgutils.for_range(builder, ncls_v) as lc:
            r0 = builder.load(builder.gep(csdata, [lc.index]))
            s_v = builder.load(builder.gep(czdata, [lc.index]))

            def row(i):
                off = builder.load(builder.gep(rdata, [builder.add(r0, i)]))
                p = builder.gep(ldata, [builder.add(off, base_v)])
                return builder.load(builder.bitcast(p, v8.as_pointer()), align=1)

            def take(factor, ncounts):
                """acc *= factor (ncounts counts of <= 64: acc had at most 3, so < 2^32)."""
                builder.store(builder.mul(builder.load(acc_s), factor), acc_s)
                k = builder.add(builder.load(nacc_s), ncounts)
                builder.store(k, nacc_s)
                with builder.if_then(builder.icmp_signed(">=", k, i64(4))):
                    fold()
                    builder.store(i64(0), nacc_s)
                    nf = builder.add(builder.load(nfold_s), i64(1))
                    builder.store(nf, nfold_s)
                    with builder.if_then(builder.icmp_signed(">=", nf, i64(32))):
                        renorm()
                        builder.store(i64(0), nfold_s)

            def eq(x, y):
                return builder.sext(builder.icmp_unsigned("==", x, y), v8)  # -1 where equal

            is2 = builder.icmp_signed("==", s_v, i64(2))
            is3 = builder.icmp_signed("==", s_v, i64(3))
            with builder.if_else(is2) as (two, other):
                with two:  # both counts 2 where the bytes are equal, else 1: a factor 4 or 1
                    e = builder.icmp_unsigned("==", row(i64(0)), row(i64(1)))
                    take(builder.select(e, ir.Constant(v32, [4] * W), ones), i64(2))
                with other:
                    with builder.if_else(is3) as (three, general):
                        with three:  # three compares give the three counts
                            x0, x1, x2 = row(i64(0)), row(i64(1)), row(i64(2))
                            e01, e02, e12 = eq(x0, x1), eq(x0, x2), eq(x1, x2)
                            c0 = builder.sub(builder.sub(one8, e01), e02)
                            c1 = builder.sub(builder.sub(one8, e01), e12)
                            c2 = builder.sub(builder.sub(one8, e02), e12)
                            f = builder.mul(builder.zext(c0, v16), builder.zext(c1, v16))
                            f = builder.mul(builder.zext(f, v32), builder.zext(c2, v32))
                            take(f, i64(3))
                        with general:
                            npairs = builder.ashr(builder.add(s_v, i64(1)), i64(1))
                            with cgutils.for_range(builder, npairs) as la:
                                a1 = builder.shl(la.index, i64(1))
                                a2 = builder.add(a1, i64(1))
                                has2 = builder.icmp_signed("<", a2, s_v)
                                va1 = row(a1)
                                va2 = row(builder.select(has2, a2, a1))
                                builder.store(zero8, c1_s)
                                builder.store(zero8, c2_s)
                                with cgutils.for_range(builder, s_v) as lb:
                                    vb = row(lb.index)
                                    builder.store(builder.sub(builder.load(c1_s), eq(va1, vb)),
                                                  c1_s)
                                    builder.store(builder.sub(builder.load(c2_s), eq(va2, vb)),
                                                  c2_s)
                                c2 = builder.select(has2, builder.load(c2_s), one8)
                                pair = builder.mul(builder.zext(builder.load(c1_s), v16),
                                                   builder.zext(c2, v16))
                                take(builder.zext(pair, v32),
                                     builder.select(has2, i64(2), i64(1)))
        fold()
        renorm()
        builder.store(builder.load(prod_s), prodp, align=8)
        builder.store(builder.load(ex_s), exp_, align=8)
        return context.get_dummy_value()

    return sig, codegen


# --------------------------------------------------------------------------
# Per image: patches into lanes, marginals, the reference's classes


@njit(**_JIT)
def _split(img, p, q, lanes, KP):
    """img (S, S, C) -> q (K, C, n) and lanes ((C * n) * KP,), slot k = patch k."""
    S, C = img.shape[0], img.shape[2]
    G = S // p
    n = p * p
    flat = img.reshape(S * S * C)
    K = G * G
    for k in range(K):
        o = (k // G) * p * S * C + (k % G) * p * C
        for c in range(C):
            for y in range(p):
                r = o + y * S * C + c
                for x in range(p):
                    q[k, c, y * p + x] = flat[r + x * C]
    for r in range(C * n):  # the transpose, a lane row at a time
        c, t = r // n, r % n
        for k in range(K):
            lanes[r * KP + k] = q[k, c, t]


@njit(**_JIT)
def _frexp_mul(m, e, f):
    """(m, e) * f with m kept in [1, 2): the product m 2^e of positive floats."""
    m *= f
    b = np.int64(np.float64(m).view(np.int64))
    e += (b >> 52) - 1023
    m = np.int64((b & _MANT) | _ONE_EXP).view(np.float64)
    return m, e


@njit(**_JIT)
def _marginals(q, hist, clogc, cpm, cpe, h, invm, inve):
    """Entropy h (K, C) in bits and 1/Q (mantissa invm, exponent inve) of every patch.

    Q_k = prod over channels and pixels of patch k's own count of the pixel's
    value (prod over values of c^c).
    """
    K, C, n = q.shape
    log2n = math.log2(n)
    for k in range(K):
        m, e = 1.0, 0
        for c in range(C):
            for t in range(n):
                hist[q[k, c, t]] += 1
            lsum = 0.0
            for t in range(n):
                v = q[k, c, t]
                g = hist[v]
                if g:
                    lsum += clogc[g]
                    hist[v] = 0
                    m *= cpm[g]
                    e += cpe[g]
            m, e = _frexp_mul(m, e, 1.0)
            h[k, c] = log2n - lsum / n
        inv = 1.0 / m  # in (0.5, 1]
        invm[k], inve[k] = _frexp_mul(inv, -e, 1.0)


@njit(**_JIT)
def _classes(q, cur, KP, hist, rows, pix, cstart, csize, bstart, bsize):
    """The classes of size > 1 of every channel of patch cur, as byte offsets of lane rows.

    rows gets the offsets (c * n + t) * KP grouped by class and pix the pixels
    c * n + t in the same order; (cstart, csize)
    the classes of at most BIG pixels, (bstart, bsize) those above. Returns
    (number of small classes, number of big ones).
    """
    C, n = q.shape[1], q.shape[2]
    pos = 0
    ns = nb = 0
    for c in range(C):
        for t in range(n):
            hist[q[cur, c, t]] += 1
        for t in range(n):
            v = q[cur, c, t]
            g = hist[v]
            if g > 1:  # first pixel of a shared value: reserve its class
                if g <= BIG:
                    cstart[ns], csize[ns] = pos, g
                    ns += 1
                else:
                    bstart[nb], bsize[nb] = pos, g
                    nb += 1
                hist[v] = -pos - 1  # negative: the next write position, encoded
                pos += g
            if hist[v] < 0:
                rows[-hist[v] - 1] = (c * n + t) * KP
                pix[-hist[v] - 1] = c * n + t
                hist[v] -= 1
        for t in range(n):
            hist[q[cur, c, t]] = 0
    return ns, nb


@njit(**_JIT)
def _renorm(prod, ex, lo, hi):
    """Move the binary exponents of prod[lo:hi] into ex exactly (mantissas in [1, 2))."""
    pb = prod.view(np.int64)
    for s in range(lo, hi):
        b = pb[s]
        ex[s] += (b >> 52) - 1023
        pb[s] = (b & _MANT) | _ONE_EXP


@njit(**_JIT)
def _scatter(lanes, rows, start, g, base, tab, cpm, cpe, pm, pe, prod, ex):
    """A class of more than BIG pixels, for the 32 slots from base: counts in tables.

    The class's product of joint counts for a candidate is prod over its values
    v in the class of c_v^c_v (c_v: the pixels of the class where it has v),
    with c^c read as mantissa cpm[c] and exponent cpe[c] (cpm[0] = 1, cpe[0] =
    0). tab (256 * W,) uint16 holds one counter per value and lane (v * W +
    lane, so that the 32 lanes of a row never share one), zero in and out; pm
    (W,) float64 and pe (W,) int64 are scratch.
    """
    for ln in range(W):
        pm[ln] = 1.0
        pe[ln] = 0
    for i in range(start, start + g):
        r = rows[i] + base
        for ln in range(W):
            tab[np.int64(lanes[r + ln]) * W + ln] += 1
    for i in range(start, start + g):
        r = rows[i] + base
        for ln in range(W):  # each value's c^c once: its counter is cleared when read
            ix = np.int64(lanes[r + ln]) * W + ln
            c = tab[ix]
            tab[ix] = 0
            pm[ln] *= cpm[c]
            pe[ln] += cpe[c]
        if (i - start) % 512 == 511:  # a product of 512 mantissas in [1, 2) fits
            _renorm(pm, pe, 0, W)
    for ln in range(W):
        prod[base + ln] *= pm[ln]
        ex[base + ln] += pe[ln]
    _renorm(prod, ex, base, base + W)


@njit(**_JIT)
def _class_logs(qj, pix, start, g, tab, clogc):
    """Sum of c log2 c over the cells of the joint histogram within one reference class:
    c the number of the class's pixels where candidate j (qj (C * n,)) has one value."""
    lsum = 0.0
    for i in range(start, start + g):
        tab[qj[pix[i]]] += 1
    for i in range(start, start + g):
        v = qj[pix[i]]
        c = tab[v]
        if c:
            lsum += clogc[c]
            tab[v] = 0
    return lsum


@njit(**_JIT)
def _exact(q, q2, cur, j, h, clogc, tab, pix, cstart, csize, ns, bstart, bsize, nb, lsum, is_mi):
    """The generic formula: mi or je of candidate j against cur, averaged over channels.

    Per channel JE = log2 n - (sum over joint-histogram cells of c log2 c) / n; a
    cell holds pixels of one reference class only, and a pixel unique in the
    reference is a cell of 1 (adds 0), so the sum runs over the reference's
    classes (:func:`_classes`). mi = H(cur) + H(j) - JE.
    """
    C, n = q.shape[1], q.shape[2]
    qj = q2[j]
    log2n = math.log2(n)
    for c in range(C):
        lsum[c] = 0.0
    for i in range(ns):
        lsum[pix[cstart[i]] // n] += _class_logs(qj, pix, cstart[i], csize[i], tab, clogc)
    for i in range(nb):
        lsum[pix[bstart[i]] // n] += _class_logs(qj, pix, bstart[i], bsize[i], tab, clogc)
    acc = 0.0
    for c in range(C):
        je = log2n - lsum[c] / n
        acc += (h[cur, c] + h[j, c] - je) if is_mi else je
    return acc / C


# --------------------------------------------------------------------------
# The chain


@njit(**_JIT)
def _chain(img, p, is_mi, clogc, cpm, cpe, hist, tab, perm, out):
    """Greedy chain of one image from patch 0, into perm (K,); out gets the reordered image."""
    S, C = img.shape[0], img.shape[2]
    G = S // p
    K, n = G * G, p * p
    KP = (K + W - 1) // W * W
    q = np.empty((K, C, n), np.uint8)
    lanes = np.zeros(C * n * KP, np.uint8)
    _split(img, p, q, lanes, KP)
    q2 = q.reshape(K, C * n)
    h = np.empty((K, C))
    invm = np.empty(KP)
    inve = np.zeros(KP, np.int64)
    if is_mi:  # je needs neither the entropies nor the candidates' own counts
        _marginals(q, hist, clogc, cpm, cpe, h, invm, inve)
    idx = np.arange(KP)  # slot -> patch
    pos = np.arange(KP)  # patch -> slot
    rows = np.empty(C * n, np.int64)
    pix = np.empty(C * n, np.int64)
    lsum = np.empty(C)
    cstart = np.empty(C * n, np.int64)
    csize = np.empty(C * n, np.int64)
    bstart = np.empty(C * n, np.int64)
    bsize = np.empty(C * n, np.int64)
    prod = np.empty(KP)
    ex = np.empty(KP, np.int64)
    pm = np.empty(W)
    pe = np.empty(W, np.int64)
    # threshold of the band: a score 2e-9 below the best is a product ratio 2^(-2e-9 n C)
    band = 2.0 ** (-BAND * n * C)
    cur = 0
    m = K
    for step in range(K):
        perm[step] = cur
        # cur leaves the live slots: the last live slot's column takes its place
        sc, last = pos[cur], m - 1
        if sc != last:
            lk = idx[last]
            for r in range(C * n):
                lanes[r * KP + sc] = lanes[r * KP + last]
            invm[sc], inve[sc] = invm[last], inve[last]
            idx[sc], pos[lk] = lk, sc
        m -= 1
        if m == 0:
            break
        if m == 1:
            cur = idx[0]
            continue
        ns, nb = _classes(q, cur, KP, hist, rows, pix, cstart, csize, bstart, bsize)
        for base in range(0, m, W):
            lim = min(m, base + W)
            _group_products(lanes, rows, cstart, csize, ns, base, prod, ex)
            for i in range(nb):
                _scatter(lanes, rows, bstart[i], bsize[i], base, tab, cpm, cpe, pm, pe, prod,
                         ex)
            if is_mi:
                for s in range(base, lim):
                    prod[s] *= invm[s]
                    ex[s] += inve[s]
                _renorm(prod, ex, base, lim)
        # the best product: the largest exponent, then mantissa
        bs = 0
        for s in range(1, m):
            if ex[s] > ex[bs] or (ex[s] == ex[bs] and prod[s] > prod[bs]):
                bs = s
        eb, mb = ex[bs], prod[bs]
        thr = mb * band
        inband = 0
        for s in range(m):
            d = ex[s] - eb
            if d == 0 and prod[s] >= thr:
                inband += 1
            elif d == -1 and prod[s] * 0.5 >= thr:
                inband += 1
        if inband == 1:
            cur = idx[bs]
            continue
        best, bkey = -1, -np.inf
        for s in range(m):
            d = ex[s] - eb
            if (d == 0 and prod[s] >= thr) or (d == -1 and prod[s] * 0.5 >= thr):
                j = idx[s]
                sc = _exact(q, q2, cur, j, h, clogc, hist, pix, cstart, csize, ns, bstart, bsize, nb,
                            lsum, is_mi)
                key = np.rint(sc * SCALE)
                if not is_mi:
                    key = -key
                if best < 0 or key > bkey or (key == bkey and j < best):
                    best, bkey = j, key
        cur = best
    # the reordered image: output patch j is input patch perm[j]
    w = p * C
    a = img.reshape(S * S * C)
    b = out.reshape(S * S * C)
    if w % 8 == 0:
        _copy_rows(a.view(np.uint64), b.view(np.uint64), perm, G, p, S * C // 8, w // 8)
    elif w % 4 == 0:
        _copy_rows(a.view(np.uint32), b.view(np.uint32), perm, G, p, S * C // 4, w // 4)
    else:
        _copy_rows(a, b, perm, G, p, S * C, w)


@njit(**_JIT)
def _copy_rows(a, b, perm, G, p, rowlen, w):
    """b patch j = a patch perm[j], in words: a patch row is w words, an image row rowlen."""
    for j in range(G * G):
        k = perm[j]
        so = (k // G) * p * rowlen + (k % G) * w
        do = (j // G) * p * rowlen + (j % G) * w
        for _y in range(p):
            for x in range(w):
                b[do + x] = a[so + x]
            so += rowlen
            do += rowlen


@njit(**_JIT, nogil=True)
def chain_range(images, lo, hi, p, is_mi, clogc, cpm, cpe, perm, out):
    """Images lo..hi-1 on the calling thread, GIL released."""
    hist = np.zeros(256, np.int64)
    tab = np.zeros(256 * W, np.uint16)
    for i in range(lo, hi):
        _chain(images[i], p, is_mi, clogc, cpm, cpe, hist, tab, perm[i], out[i])


# --------------------------------------------------------------------------
# Python side

_POOLS: dict = {}
_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def _clogc(n: int) -> np.ndarray:
    c = np.arange(n + 1, dtype=np.float64)
    t = np.zeros(n + 1)
    t[1:] = c[1:] * np.log2(c[1:])
    return t


@functools.lru_cache(maxsize=None)
def _powers(n: int):
    """c^c for c in 0..n as float64 mantissas in [1, 2) and int64 exponents (from exact ints)."""
    cpm, cpe = np.ones(n + 1), np.zeros(n + 1, np.int64)
    for c in range(1, n + 1):
        v = c**c
        e = v.bit_length() - 1
        cpm[c] = v / 2**e if e < 1000 else (v >> (e - 60)) / 2**60
        cpe[c] = e
    return cpm, cpe


def reorder(images: np.ndarray, measure: str = "mi", patch: int = 16, *, workers: int = 2,
            chunk: int = 16):
    """(reordered images, perm) of uint8 images (N, S, S, C) by the mi or je chain.

    ``workers`` threads take chunks of ``chunk`` images in turn (the calling
    thread is one of them).
    """
    if measure not in ("mi", "je"):
        raise ValueError(f"the independent chain implements mi and je, not {measure!r}")
    images = np.ascontiguousarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be uint8 (N, S, S, C), got {images.dtype} {images.shape}")
    n_img, size = images.shape[0], images.shape[1]
    if size % patch:
        raise ValueError(f"patch {patch} does not divide {size}")
    k = (size // patch) ** 2
    perm = np.empty((n_img, k), np.int64)
    out = np.empty_like(images)
    clogc = _clogc(patch * patch)
    cpm, cpe = _powers(patch * patch)
    is_mi = measure == "mi"
    starts = list(range(0, n_img, chunk))
    if workers <= 1 or len(starts) <= 1:
        chain_range(images, 0, n_img, patch, is_mi, clogc, cpm, cpe, perm, out)
        return out, perm
    nxt = iter(starts)

    def work():
        for lo in nxt:  # a shared iterator: each chunk is taken once (next() holds the GIL)
            chain_range(images, lo, min(n_img, lo + chunk), patch, is_mi, clogc, cpm, cpe,
                        perm, out)

    threads = [threading.Thread(target=work) for _ in range(workers - 1)]
    for t in threads:
        t.start()
    work()
    for t in threads:
        t.join()
    return out, perm


def check(images: np.ndarray, measure: str, patch: int, perm=None) -> int:
    """Images whose perm differs from porder's generic path (0 when all agree)."""
    import porder

    if perm is None:
        perm = reorder(images, measure, patch)[1]
    ref = porder.reorder(images, measure, patch, backend="generic")[1]
    return int((np.asarray(ref) != perm).any(axis=1).sum())


# --------------------------------------------------------------------------
# Where the chain's time goes (bench_native's profile and limit)


@njit(**_JIT)
def _replay(img, p, perm, upto, clogc, cpm, cpe, hist, tab):
    """The chain's work on one image up to stage ``upto``, following a known perm:
    0 split and marginals, 1 + slot moves and the reference's classes, 2 + the
    vector products, 3 + the scatter tables, 4 + the best product of each step."""
    S, C = img.shape[0], img.shape[2]
    G = S // p
    K, n = G * G, p * p
    KP = (K + W - 1) // W * W
    q = np.empty((K, C, n), np.uint8)
    lanes = np.zeros(C * n * KP, np.uint8)
    _split(img, p, q, lanes, KP)
    h = np.empty((K, C))
    invm = np.empty(KP)
    inve = np.zeros(KP, np.int64)
    _marginals(q, hist, clogc, cpm, cpe, h, invm, inve)
    if upto == 0:
        return 0.0
    idx = np.arange(KP)
    pos = np.arange(KP)
    rows = np.empty(C * n, np.int64)
    pix = np.empty(C * n, np.int64)
    cstart = np.empty(C * n, np.int64)
    csize = np.empty(C * n, np.int64)
    bstart = np.empty(C * n, np.int64)
    bsize = np.empty(C * n, np.int64)
    prod = np.ones(KP)
    ex = np.zeros(KP, np.int64)
    pm = np.empty(W)
    pe = np.empty(W, np.int64)
    m = K
    tot = 0.0
    for step in range(K):
        cur = perm[step]
        sc, last = pos[cur], m - 1
        if sc != last:
            lk = idx[last]
            for r in range(C * n):
                lanes[r * KP + sc] = lanes[r * KP + last]
            invm[sc], inve[sc] = invm[last], inve[last]
            idx[sc], pos[lk] = lk, sc
        m -= 1
        if m <= 1:
            break
        ns, nb = _classes(q, cur, KP, hist, rows, pix, cstart, csize, bstart, bsize)
        if upto == 1:
            continue
        for base in range(0, m, W):
            _group_products(lanes, rows, cstart, csize, ns, base, prod, ex)
            if upto >= 3:
                for i in range(nb):
                    _scatter(lanes, rows, bstart[i], bsize[i], base, tab, cpm, cpe, pm, pe,
                             prod, ex)
        if upto >= 4:
            bs = 0
            for s in range(1, m):
                if ex[s] > ex[bs] or (ex[s] == ex[bs] and prod[s] > prod[bs]):
                    bs = s
            tot += prod[bs]
    return tot


@njit(**_JIT)
def _replay_all(images, p, perms, upto, clogc, cpm, cpe):
    hist = np.zeros(256, np.int64)
    tab = np.zeros(256 * W, np.uint16)
    t = 0.0
    for i in range(images.shape[0]):
        t += _replay(images[i], p, perms[i], upto, clogc, cpm, cpe, hist, tab)
    return t


def stage_times(images: np.ndarray, measure: str, patch: int, repeats: int = 3) -> dict:
    """Microseconds per image of the chain's stages on one thread (best of ``repeats``),
    each the difference of two replays of the chain's own order (:func:`_replay`)."""
    n = patch * patch
    clogc = _clogc(n)
    cpm, cpe = _powers(n)
    perms = reorder(images, measure, patch, workers=1)[1]

    def best(fn) -> float:
        fn()
        b = math.inf
        for _ in range(repeats):
            t0 = time.thread_time()
            fn()
            b = min(b, time.thread_time() - t0)
        return b / len(images) * 1e6

    cum = [best(lambda u=u: _replay_all(images, patch, perms, u, clogc, cpm, cpe))
           for u in range(5)]
    full = best(lambda: reorder(images, measure, patch, workers=1))
    names = ["split_and_marginals", "moves_and_classes", "vector_products", "scatter_tables",
             "best_product"]
    out = {names[0]: cum[0]}
    for i in range(1, 5):  # differences of separately timed runs: 0 when within noise
        out[names[i]] = max(0.0, cum[i] - cum[i - 1])
    out["band_exact_and_gather"] = max(0.0, full - cum[4])
    out["total"] = full
    return {k: round(v, 1) for k, v in out.items()}


def class_work(images: np.ndarray, patch: int, perms: np.ndarray) -> dict:
    """Per image, what the chain's vector loop has to do, from the reference's class sizes:
    32-lane compares (sum over steps of ceil(m / 32) * sum of s^2 over classes of 2..BIG
    pixels), folded pixels (ceil(m / 32) * pixels in those classes) and scatter-table
    pixel-lanes (32 ceil(m / 32) * pixels in larger classes); m the candidates left."""
    N, S, C = images.shape[0], images.shape[1], images.shape[3]
    G = S // patch
    K = G * G
    pt = images.reshape(N, G, patch, G, patch, C).transpose(0, 1, 3, 5, 2, 4)
    pt = pt.reshape(N, K, C, patch * patch)
    counts = np.zeros((N, K, C, 256), np.int64)
    np.add.at(counts, (np.arange(N)[:, None, None, None], np.arange(K)[None, :, None, None],
                       np.arange(C)[None, None, :, None], pt), 1)
    small = (counts > 1) & (counts <= BIG)
    sq = (counts**2 * small).sum(axis=(2, 3))  # (N, K)
    px = (counts * small).sum(axis=(2, 3))
    bigpx = (counts * (counts > BIG)).sum(axis=(2, 3))
    m = K - 1 - np.arange(K)
    groups = -(-m // W)
    ref = np.take_along_axis
    return {"compares": float((groups * ref(sq, perms, 1)).sum(1).mean()),
            "folded_pixels": float((groups * ref(px, perms, 1)).sum(1).mean()),
            "scatter_pixel_lanes": float((groups * W * ref(bigpx, perms, 1)).sum(1).mean()),
            "classes_2_to_64_sum_sq_per_patch_channel": float(sq.mean() / C),
            "shared_pixels_per_patch_channel": float((px + bigpx).mean() / C)}


@njit(**_JIT)
def _compare_loop(lanes, rows, cstart, csize, reps, prod, ex):
    for _ in range(reps):
        _group_products(lanes, rows, cstart, csize, 1, 0, prod, ex)
    return prod[0]


def compare_rate(seconds: float = 0.3) -> float:
    """32-lane compares per second of one core in the chain's vector loop: one class of
    64 pixels, in cache (the loop's own throughput, folds included)."""
    rng = np.random.default_rng(0)
    lanes = rng.integers(0, 4, 64 * W, dtype=np.uint8)
    rows = np.arange(64, dtype=np.int64) * W
    cs, cz = np.zeros(1, np.int64), np.full(1, 64, np.int64)
    prod, ex = np.ones(W), np.zeros(W, np.int64)
    _compare_loop(lanes, rows, cs, cz, 1, prod, ex)
    reps = 1000
    while True:
        t0 = time.thread_time()
        _compare_loop(lanes, rows, cs, cz, reps, prod, ex)
        dt = time.thread_time() - t0
        if dt >= seconds:
            return reps * 64 * 64 / dt
        reps *= 2

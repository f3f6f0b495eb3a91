"""Slow, plain-Python reference implementations written straight from the formulas.

They share no code with porder and are used only by the tests.
"""
from __future__ import annotations

import math
from collections import Counter

C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


def channels(patch):
    """(p, p, C) array -> list of C lists of python ints, row-major."""
    p, _, c = patch.shape
    return [[int(patch[i, j, k]) for i in range(p) for j in range(p)] for k in range(c)]


def _h(values):
    n = len(values)
    return -sum(c / n * math.log2(c / n) for c in Counter(values).values())


def binned(v, bins):
    return [x * bins // 256 for x in v]


def entropy(a, bins=256):
    return sum(_h(binned(v, bins)) for v in channels(a)) / a.shape[-1]


def joint_entropy(a, b, bins=256):
    return sum(_h(list(zip(binned(x, bins), binned(y, bins))))
               for x, y in zip(channels(a), channels(b))) / a.shape[-1]


def kl(a, b, bins=256):
    out = 0.0
    for x, y in zip(channels(a), channels(b)):
        n = len(x)
        cx, cy = Counter(binned(x, bins)), Counter(binned(y, bins))
        for i in range(bins):
            p = (cx[i] + 1 / bins) / (n + 1)
            q = (cy[i] + 1 / bins) / (n + 1)
            out += p * math.log2(p / q)
    return out / a.shape[-1]


def l1(a, b):
    return sum(sum(abs(p - q) for p, q in zip(x, y)) / len(x)
               for x, y in zip(channels(a), channels(b))) / a.shape[-1]


def l2(a, b):
    return sum(math.sqrt(sum((p - q) ** 2 for p, q in zip(x, y)) / len(x))
               for x, y in zip(channels(a), channels(b))) / a.shape[-1]


def ssim(a, b):
    out = 0.0
    for x, y in zip(channels(a), channels(b)):
        n = len(x)
        mx, my = sum(x) / n, sum(y) / n
        vx = sum((p - mx) ** 2 for p in x) / n
        vy = sum((q - my) ** 2 for q in y) / n
        cov = sum((p - mx) * (q - my) for p, q in zip(x, y)) / n
        out += ((2 * mx * my + C1) * (2 * cov + C2)) / ((mx * mx + my * my + C1) * (vx + vy + C2))
    return out / a.shape[-1]


def psnr(a):
    out = 0.0
    for x in channels(a):
        n = len(x)
        m = sum(x) / n
        var = sum((p - m) ** 2 for p in x) / n
        out += 10 * math.log10(255**2 / max(var, 1 / 12))
    return out / a.shape[-1]


def greedy_chain(score, k, *, higher_is_better, reference=0):
    """POR chain in pure Python; score(i, j) scores candidate j against reference i."""
    order, left = [reference], [i for i in range(k) if i != reference]
    while left:
        cur = order[-1]
        best = left[0]
        for j in left[1:]:
            s, sb = score(cur, j), score(cur, best)
            if abs(s - sb) <= 1e-9 * max(1.0, abs(sb)):  # a tie up to rounding noise
                continue
            if (s > sb) if higher_is_better else (s < sb):
                best = j
        order.append(best)
        left.remove(best)
    return order

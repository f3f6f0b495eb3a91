// porder_core.cuh: the per-image POR algorithm, written once for the GPU and the CPU.
//
// Every function here is __host__ __device__. The CUDA kernel (reorder.cu) runs
// run_image() with one thread block per image; the host harness (host_harness.cu,
// built with g++ or nvcc and loaded through ctypes by tests/test_kernels_cuda.py)
// runs the very same functions with one "thread" (tid 0 of 1), so the scoring,
// the 9-decimal keys, the tie rules and the chain are checked on a CPU against
// porder's NumPy reference. Only three things differ between the two: the
// barriers (no-ops on the host), the warp-shuffle argmax of a chain step (a
// sequential loop on the host; both reduce under one total order, so the result
// is the same), and the kernel's entry (reorder.cu).
//
// Shapes and layout. An image is (S, S, C) uint8, row-major. It has K = G*G
// patches of P x P pixels (G = S / P), n = P*P pixels each; patch j = r*G + c.
// A "unit" is one (channel c, patch j) pair, index u = c*K + j.
//
// Two modes (template WB > 0: shared, WB = NW = 0: stream). In shared mode,
// shared memory (one block = one image) holds all the regions below. In stream
// mode (images that do not fit) bit r of params[P_SPACE] moves region r to the
// block's slice of a global scratch: raw is then the input image itself, tab
// the kernel's table argument, and the histogram measures run in "table mode"
// (per-thread value tables tbl and the reference's value classes cls instead of
// mask and cnt; see the table-mode section); the standalone measures sort
// their keys in sort (bitonic) instead of ranking them. Offsets are computed in
// Python (porder/kernels/cuda_geometry.py, launch_geometry) and passed in the
// params array:
//   tab   double  [8 + 3*(n+1)]   constants, log2(c), KL tables
//   raw   uint8   [S*S*C]         the image as loaded (the gather reads it)
//   q     uint8   [C*K][QS]       unit pixels in patch raster order (quantised
//                                 for histogram measures); QS = 16*odd bytes
//   mask  Mask    [C][n][K]       histogram pairwise measures: bit u of
//                                 mask[c][t][j] is set when pixel u of unit
//                                 (c, j) has the same value as pixel t
//   aux, aux2 double [C*K]        per-unit statistics (see unit_stats)
//   part  double  [C*K]           per-unit partial of a chain step (pairwise)
//                                 or keys (standalone)
//   hist  uint32  [C][bins]       kl: the current reference's histogram, each
//                                 entry stamped with its chain step
//   cnt   uint16  [C*K][n]        entropy: count of each pixel's value
//   perm  int32   [K]             the permutation being built
//   used  uint8   [K]             chain: patches already placed
//   tbl   uint32  [NT][bins]      table mode: per-thread value counters
//   cls   int32   [C][bins+1], [C][n]  table mode: reference value classes
//   sort  double [SORTN], int32 [SORTN]  stream mode, standalone: bitonic sort
//
// Numerics follow porder.measures: exact integer counts and pixel sums; float64
// only in the final formulas, in the NumPy formulas' order of operations
// (compile with --fmad=false so that no multiply-add is fused); scores rounded
// to 9 decimals as numpy.round does (x*1e9, rint, /1e9) before comparing.
#pragma once

#if defined(__CUDACC__)
#define PORDER_HD __host__ __device__ __forceinline__
#define PORDER_UNROLL _Pragma("unroll")
#else
#include <cmath>
#include <cstring>
#define PORDER_HD inline
#define PORDER_UNROLL
#endif

namespace porder {

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

// Measure ids (porder/kernels/cuda_geometry.py MEASURE_IDS mirrors these).
enum MeasureId {
    M_ENTROPY = 0, M_PSNR = 1, M_MI = 2, M_JE = 3, M_KL = 4, M_L1 = 5, M_L2 = 6, M_SSIM = 7
};

// Indices into the int32 params array (porder/kernels/cuda_geometry.py PARAM_NAMES mirrors
// this list; a test checks the two against each other).
enum Param {
    P_S = 0, P_C, P_P, P_G, P_K, P_N, P_BINS, P_MID, P_DESC, P_REF, P_QS, P_NT,
    P_WB, P_NW, P_NTAB,
    P_OFF_TAB, P_OFF_RAW, P_OFF_Q, P_OFF_MASK, P_OFF_AUX, P_OFF_AUX2, P_OFF_PART,
    P_OFF_HIST, P_OFF_CNT, P_OFF_PERM, P_OFF_USED, P_SMEM,
    P_OFF_TBL, P_OFF_CLS, P_SPACE, P_GMEM, P_OFF_SORT, P_SORTN,
    P_COUNT
};

// Indices into the float64 table (header, then three tables of n+1 entries).
enum Tab {
    T_LOG2N = 0,  // math.log2(n), as porder.measures._entropy_bits uses it
    T_C1 = 1,     // SSIM C1
    T_C2 = 2,     // SSIM C2
    T_DR2 = 3,    // PSNR peak: 255.0**2
    T_FLOOR = 4,  // PSNR noise floor 1/12
    T_HDR = 8     // lg[c] = log2(c) at T_HDR, kt[c] = log2(c + 1/bins) next,
                  // kp[c] = (c + 1/bins)/(n + 1) last (c = 0..n)
};

// Largest finite double; keys map NaN and +-inf onto +-DBL_MAX as numpy.nan_to_num does.
#define PORDER_DBL_MAX 1.7976931348623157e308

// ---------------------------------------------------------------------------
// Portable primitives

PORDER_HD double p_rint(double x) {
#if defined(__CUDACC__)
    return rint(x);
#else
    return std::rint(x);
#endif
}
PORDER_HD double p_sqrt(double x) {
#if defined(__CUDACC__)
    return sqrt(x);
#else
    return std::sqrt(x);
#endif
}
PORDER_HD double p_log10(double x) {
#if defined(__CUDACC__)
    return log10(x);
#else
    return std::log10(x);
#endif
}
PORDER_HD double p_nan() {
#if defined(__CUDA_ARCH__)
    return __longlong_as_double(0x7FF8000000000000LL);
#else
    return std::nan("");
#endif
}
PORDER_HD int popc(u16 x) {
#if defined(__CUDA_ARCH__)
    return __popc((u32)x);
#else
    return __builtin_popcount((u32)x);
#endif
}
PORDER_HD int popc(u32 x) {
#if defined(__CUDA_ARCH__)
    return __popc(x);
#else
    return __builtin_popcount(x);
#endif
}
PORDER_HD int popc(u64 x) {
#if defined(__CUDA_ARCH__)
    return __popcll(x);
#else
    return __builtin_popcountll(x);
#endif
}
PORDER_HD u32 load_u32(const u8* p) {  // p is 4-byte aligned
#if defined(__CUDACC__)
    return *reinterpret_cast<const u32*>(p);
#else
    u32 v;
    std::memcpy(&v, p, 4);
    return v;
#endif
}
PORDER_HD void store_u32(u8* p, u32 v) {  // p is 4-byte aligned
#if defined(__CUDACC__)
    *reinterpret_cast<u32*>(p) = v;
#else
    std::memcpy(p, &v, 4);
#endif
}
PORDER_HD void block_sync() {
#if defined(__CUDA_ARCH__)
    __syncthreads();
#endif
}

// 4-bit mask of the zero bytes of x (bit b set when byte b of x is 0).
PORDER_HD u32 zero_bytes4(u32 x) {
    u32 y = ~(((x & 0x7F7F7F7Fu) + 0x7F7F7F7Fu) | x | 0x7F7F7F7Fu);  // 0x80 per zero byte
    return (((y >> 7) * 0x00204081u) >> 21) & 0xFu;
}

// ---------------------------------------------------------------------------
// Equality masks: MaskT<WB, NW> holds NW words of WB bits (n <= WB*NW pixels).

template <int WB> struct WordT;
template <> struct WordT<16> { typedef u16 type; };
template <> struct WordT<32> { typedef u32 type; };
template <> struct WordT<64> { typedef u64 type; };

template <int WB, int NW> struct alignas((NW == 2 || NW == 4) ? 16 : WB / 8) MaskT {
    typename WordT<WB>::type w[NW];
};

// Word w of the equality mask of pixel t in a unit's pixels qu[0..n).
template <int WB>
PORDER_HD typename WordT<WB>::type mask_word(const u8* qu, int n, int t, int w) {
    typedef typename WordT<WB>::type W;
    const int base = w * WB;
    const int rem = n - base;
    if (rem <= 0) return (W)0;
    const u32 v4 = (u32)qu[t] * 0x01010101u;
    W word = (W)0;
PORDER_UNROLL
    for (int g = 0; g < WB / 4; ++g) {
        if (4 * g < rem) {
            u32 m = zero_bytes4(load_u32(qu + base + 4 * g) ^ v4);
            word = (W)(word | (W)((W)m << (4 * g)));
        }
    }
    if (rem < WB) word = (W)(word & (W)((((u64)1) << rem) - 1));  // drop padding bytes
    return word;
}

template <int WB, int NW>
PORDER_HD int and_popc(const MaskT<WB, NW>& a, const MaskT<WB, NW>& b) {
    int s = 0;
PORDER_UNROLL
    for (int w = 0; w < NW; ++w) s += popc((typename WordT<WB>::type)(a.w[w] & b.w[w]));
    return s;
}

template <int WB, int NW>
PORDER_HD int mask_popc(const MaskT<WB, NW>& a) {
    int s = 0;
PORDER_UNROLL
    for (int w = 0; w < NW; ++w) s += popc(a.w[w]);
    return s;
}

// True when t is the lowest pixel of its value class (no bit below t is set).
template <int WB, int NW>
PORDER_HD bool first_of_class(const MaskT<WB, NW>& m, int t) {
    typedef typename WordT<WB>::type W;
    const int wt = t / WB;
    const W below = (W)((((u64)1) << (t % WB)) - 1);
    bool ok = true;
PORDER_UNROLL
    for (int w = 0; w < NW; ++w) {  // compile-time indices only: m stays in registers
        if (w < wt) ok = ok && (m.w[w] == (W)0);
        else if (w == wt) ok = ok && ((W)(m.w[w] & below) == (W)0);
    }
    return ok;
}

// ---------------------------------------------------------------------------
// Keys and orders

// Chain key: numpy.nan_to_num(numpy.round(s, 9)) with s = score (higher is
// better) or -score; NaN ranks last.
PORDER_HD double chain_key(double score, bool descending) {
    double s = descending ? score : -score;
    double r = p_rint(s * 1e9) / 1e9;
    if (r != r) return -PORDER_DBL_MAX;
    if (r > PORDER_DBL_MAX) return PORDER_DBL_MAX;
    if (r < -PORDER_DBL_MAX) return -PORDER_DBL_MAX;
    return r;
}

// Standalone key: numpy.round(-score if descending else score, 9), sorted ascending.
PORDER_HD double sort_key(double score, bool descending) {
    double s = descending ? -score : score;
    return p_rint(s * 1e9) / 1e9;
}

// Chain: (key a, index i) beats (key b, index j): larger key, then lower index.
PORDER_HD bool better(double a, int i, double b, int j) {
    return a > b || (a == b && i < j);
}

// Stable ascending sort with NaN last (numpy.argsort(kind='stable')).
PORDER_HD bool sorts_before(double a, int i, double b, int j) {
    const bool an = a != a, bn = b != b;
    if (an) return bn && i < j;
    if (bn) return true;
    return a < b || (a == b && i < j);
}

// ---------------------------------------------------------------------------
// The per-image context: params and the carved shared memory.

// Region ids: bit r of params[P_SPACE] set puts region r in the block's slice
// of the global scratch instead of shared memory (cuda_geometry.py REGIONS
// mirrors this order). Two regions are never copied there: a global tab is the
// kernel's tab argument and a global raw is the input image itself.
enum Region {
    R_TAB = 0, R_RAW, R_Q, R_MASK, R_AUX, R_AUX2, R_PART, R_HIST, R_CNT, R_PERM, R_USED,
    R_TBL, R_CLS, R_SORT, R_COUNT
};

struct Ctx {
    int S, C, P, G, K, n, bins, mid, qs, nt, ntab;
    bool desc;
    bool tab_global;  // tab is the kernel's tab argument (not copied)
    bool raw_input;   // raw is the input image (not copied)
    int ref;
    double* tab;
    u8* raw;
    u8* q;
    void* mask;
    double* aux;
    double* aux2;
    double* part;
    u32* hist;
    u16* cnt;
    int* perm;
    u8* used;
    u32* tbl;  // table mode: bins counters per thread, zero between uses
    int* cls;  // table mode: the reference's value classes per channel
    int sortn;  // stream mode, standalone: keys sorted (a power of 2 >= K)
    double* sort_key;  // [sortn] keys, then int [sortn] patch indices
    int* sort_idx;
};

// smem: the block's shared memory; gmem: its slice of the global scratch;
// tab: the kernel's (global, read-only) table argument. STREAM (the template's
// WB == 0) is stream mode, where params[P_SPACE] places each region; in shared
// mode every pointer is into smem, known as such at compile time (shared-memory
// loads and stores, no generic addressing).
template <bool STREAM>
PORDER_HD Ctx make_ctx(const int* p, u8* smem, u8* gmem, const double* tab) {
    Ctx x;
    x.S = p[P_S]; x.C = p[P_C]; x.P = p[P_P]; x.G = p[P_G]; x.K = p[P_K]; x.n = p[P_N];
    x.bins = p[P_BINS]; x.mid = p[P_MID]; x.qs = p[P_QS]; x.nt = p[P_NT]; x.ntab = p[P_NTAB];
    x.desc = p[P_DESC] != 0;
    x.ref = p[P_REF];
    const int space = STREAM ? p[P_SPACE] : 0;
    auto at = [&](int region, int param) -> u8* {
        if constexpr (!STREAM) return smem + p[param];
        return (((space >> region) & 1) ? gmem : smem) + p[param];
    };
    x.tab_global = ((space >> R_TAB) & 1) != 0;
    x.raw_input = ((space >> R_RAW) & 1) != 0;
    x.tab = x.tab_global ? const_cast<double*>(tab)
                         : reinterpret_cast<double*>(smem + p[P_OFF_TAB]);
    x.raw = x.raw_input ? nullptr : smem + p[P_OFF_RAW];  // set per image when raw_input
    x.q = at(R_Q, P_OFF_Q);
    x.mask = at(R_MASK, P_OFF_MASK);
    x.aux = reinterpret_cast<double*>(at(R_AUX, P_OFF_AUX));
    x.aux2 = reinterpret_cast<double*>(at(R_AUX2, P_OFF_AUX2));
    x.part = reinterpret_cast<double*>(at(R_PART, P_OFF_PART));
    x.hist = reinterpret_cast<u32*>(at(R_HIST, P_OFF_HIST));
    x.cnt = reinterpret_cast<u16*>(at(R_CNT, P_OFF_CNT));
    x.perm = reinterpret_cast<int*>(at(R_PERM, P_OFF_PERM));
    x.used = at(R_USED, P_OFF_USED);
    x.tbl = reinterpret_cast<u32*>(at(R_TBL, P_OFF_TBL));
    x.cls = reinterpret_cast<int*>(at(R_CLS, P_OFF_CLS));
    x.sortn = p[P_SORTN];
    x.sort_key = reinterpret_cast<double*>(at(R_SORT, P_OFF_SORT));
    x.sort_idx = reinterpret_cast<int*>(x.sort_key + x.sortn);
    return x;
}

PORDER_HD const double* lg_table(const Ctx& x) { return x.tab + T_HDR; }
PORDER_HD const double* kt_table(const Ctx& x) { return x.tab + T_HDR + (x.n + 1); }
PORDER_HD const double* kp_table(const Ctx& x) { return x.tab + T_HDR + 2 * (x.n + 1); }
PORDER_HD u8* unit_q(const Ctx& x, int c, int j) { return x.q + (i64)(c * x.K + j) * x.qs; }

// ---------------------------------------------------------------------------
// Table mode (template WB = NW = 0): the histogram measures without equality
// masks, for patches of any size. Every thread owns a table of `bins` u32
// counters (zero between uses: whoever counts into it clears what it counted).
// Per chain step, the reference's pixels of each channel are grouped by value
// (a counting sort: cls_start[v] .. cls_start[v+1] index cls_ord, in pixel
// order); the joint count of a candidate's pixel t is then the count of its
// value within t's reference class. Work per candidate and channel: O(n +
// bins), memory: bins counters per thread and (bins + 1 + n) ints per channel.

PORDER_HD u32* thread_table(const Ctx& x, int tid) { return x.tbl + (i64)tid * x.bins; }
PORDER_HD int* cls_start(const Ctx& x, int c) { return x.cls + c * (x.bins + 1); }
PORDER_HD int* cls_ord(const Ctx& x, int c) { return x.cls + x.C * (x.bins + 1) + c * x.n; }

// sum_t log2(count of q[t] in q[0..n)), in pixel order (as the masks' popcounts).
PORDER_HD double table_log_count_sum(const u8* qu, int n, u32* tb, const double* lg) {
    for (int t = 0; t < n; ++t) tb[qu[t]] += 1u;
    double L = 0.0;
    for (int t = 0; t < n; ++t) L += lg[tb[qu[t]]];
    for (int t = 0; t < n; ++t) tb[qu[t]] = 0u;
    return L;
}

// The reference's value classes of every channel (table mode, pairwise
// histogram measures): kl needs the class sizes only.
template <int MID>
PORDER_HD void phase_ref_classes(const Ctx& x, int ref, int tid, int nt) {
    for (int c = tid; c < x.C; c += nt) {
        int* st = cls_start(x, c);
        const u8* qr = unit_q(x, c, ref);
        for (int v = 0; v <= x.bins; ++v) st[v] = 0;
        for (int t = 0; t < x.n; ++t) st[qr[t] + 1] += 1;
        for (int v = 1; v <= x.bins; ++v) st[v] += st[v - 1];  // st[v]: first index of v
        if constexpr (MID != M_KL) {
            int* ord = cls_ord(x, c);
            u32* cur = thread_table(x, tid);  // zero here; offsets within each class
            for (int t = 0; t < x.n; ++t) {
                const int v = qr[t];
                ord[st[v] + (int)cur[v]] = t;
                cur[v] += 1u;
            }
            for (int t = 0; t < x.n; ++t) cur[qr[t]] = 0u;
        }
    }
}

template <int MID> struct Family {
    static const bool hist_pair = MID == M_MI || MID == M_JE || MID == M_KL;
    static const bool moment_pair = MID == M_L1 || MID == M_L2 || MID == M_SSIM;
    static const bool pairwise = hist_pair || moment_pair;
    static const bool quantised = hist_pair || MID == M_ENTROPY;
};

// Mean over channels of v(c), summed in channel order, as numpy's mean over the
// channel axis of a score matrix.
template <class F>
PORDER_HD double channel_mean(int C, F v) {
    double s = v(0);
    for (int c = 1; c < C; ++c) s += v(c);
    return s / (double)C;
}

// ---------------------------------------------------------------------------
// Phases of one image. Each loops "for (i = tid; i < total; i += nt)" over its
// work items and writes disjoint shared-memory locations; a barrier separates
// phases that read what another wrote.

// Global image -> raw. vec bit 0: the image address and S*S*C are 4-byte multiples.
PORDER_HD void phase_load(const Ctx& x, const u8* img, int vec, int tid, int nt) {
    if (x.raw_input) return;  // raw is img itself
    const int bytes = x.S * x.S * x.C;
    if (vec & 1) {
        for (int i = tid; i < bytes / 4; i += nt) store_u32(x.raw + 4 * i, load_u32(img + 4 * i));
    } else {
        for (int i = tid; i < bytes; i += nt) x.raw[i] = img[i];
    }
}

// raw -> q (patch raster order per unit, quantised for histogram measures);
// zeroes the q padding, the kl histogram and the chain state.
template <int MID, int WB>
PORDER_HD void phase_relayout(const Ctx& x, int tid, int nt) {
    for (int pix = tid; pix < x.S * x.S; pix += nt) {  // one pixel, all its channels
        const int xx = pix % x.S, y = pix / x.S;
        const int j = (y / x.P) * x.G + xx / x.P;
        const int t = (y % x.P) * x.P + xx % x.P;
        for (int c = 0; c < x.C; ++c) {
            int v = x.raw[pix * x.C + c];
            if constexpr (Family<MID>::quantised) v = (v * x.bins) >> 8;  // value * bins // 256
            unit_q(x, c, j)[t] = (u8)v;
        }
    }
    const int pad = x.qs - x.n;
    for (int e = tid; e < x.C * x.K * pad; e += nt) x.q[(e / pad) * x.qs + x.n + e % pad] = 0;
    if constexpr (MID == M_KL && WB > 0) {
        for (int e = tid; e < x.C * x.bins; e += nt) x.hist[e] = 0u;
    }
    if constexpr (WB == 0 && Family<MID>::quantised) {  // table mode: tables start at zero
        u32* tb = thread_table(x, tid);
        for (int v = 0; v < x.bins; ++v) tb[v] = 0u;
    }
    if constexpr (Family<MID>::pairwise) {
        for (int j = tid; j < x.K; j += nt) x.used[j] = (u8)(j == x.ref);
        if (tid == 0) x.perm[0] = x.ref;
    }
}

// Equality masks of every pixel of every unit (histogram pairwise measures).
template <int WB, int NW>
PORDER_HD void phase_masks(const Ctx& x, int tid, int nt) {
    MaskT<WB, NW>* M = reinterpret_cast<MaskT<WB, NW>*>(x.mask);
    const int total = x.C * x.n * x.K * NW;
    for (int e = tid; e < total; e += nt) {
        const int w = e % NW;
        int r = e / NW;
        const int j = r % x.K;
        r /= x.K;
        const int t = r % x.n, c = r / x.n;
        M[(c * x.n + t) * x.K + j].w[w] = mask_word<WB>(unit_q(x, c, j), x.n, t, w);
    }
}

// Count of each pixel's value within its unit (entropy).
template <int WB, int NW>
PORDER_HD void phase_counts(const Ctx& x, int tid, int nt) {
    const int total = x.C * x.K * x.n;
    for (int e = tid; e < total; e += nt) {
        const int t = e % x.n, u = e / x.n;
        const u8* qu = x.q + u * x.qs;
        int s = 0;
PORDER_UNROLL
        for (int w = 0; w < NW; ++w) s += popc(mask_word<WB>(qu, x.n, t, w));
        x.cnt[e] = (u16)s;
    }
}

// kl: stamp the reference patch's histogram (per channel) into x.hist.
template <int WB, int NW>
PORDER_HD void build_ref_hist(const Ctx& x, int ref, u32 stamp, int tid, int nt) {
    const MaskT<WB, NW>* M = reinterpret_cast<const MaskT<WB, NW>*>(x.mask);
    for (int e = tid; e < x.C * x.n; e += nt) {
        const int c = e / x.n, t = e % x.n;
        const MaskT<WB, NW> m = M[(c * x.n + t) * x.K + ref];
        if (first_of_class(m, t)) {
            x.hist[c * x.bins + unit_q(x, c, ref)[t]] = (stamp << 16) | (u32)mask_popc(m);
        }
    }
}

// Per-unit statistics.
//   mi:      aux = sum_t log2(count_t)          (the patch's own log-count sum)
//   kl:      aux = sum over its values v of P_v * (log2(a_v+s) - log2(s))
//   ssim:    aux = sum of pixels, aux2 = sum of squares
//   psnr:    aux = the unit's PSNR
//   entropy: aux = the unit's entropy
template <int MID, int WB, int NW>
PORDER_HD void phase_unit_stats(const Ctx& x, int tid, int nt) {
    const double* lg = lg_table(x);
    const double n = (double)x.n;
    for (int u = tid; u < x.C * x.K; u += nt) {
        const int j = u % x.K, c = u / x.K;
        if constexpr (WB == 0 && (MID == M_MI || MID == M_ENTROPY)) {
            const double L = table_log_count_sum(unit_q(x, c, j), x.n, thread_table(x, tid), lg);
            if constexpr (MID == M_MI) x.aux[u] = L;
            else x.aux[u] = x.tab[T_LOG2N] - L / n;
        } else if constexpr (WB == 0 && MID == M_KL) {
            const double* kt = kt_table(x);
            const double* kp = kp_table(x);
            const u8* qu = unit_q(x, c, j);
            u32* tb = thread_table(x, tid);
            for (int t = 0; t < x.n; ++t) tb[qu[t]] += 1u;
            double r0 = 0.0;
            for (int t = 0; t < x.n; ++t) {  // values in order of first occurrence
                const int a = (int)tb[qu[t]];
                if (a) {
                    r0 += kp[a] * (kt[a] - kt[0]);
                    tb[qu[t]] = 0u;
                }
            }
            x.aux[u] = r0;
        } else if constexpr (MID == M_MI) {
            const MaskT<WB, NW>* M = reinterpret_cast<const MaskT<WB, NW>*>(x.mask);
            double L = 0.0;
            for (int t = 0; t < x.n; ++t) L += lg[mask_popc(M[(c * x.n + t) * x.K + j])];
            x.aux[u] = L;
        } else if constexpr (MID == M_KL) {
            const MaskT<WB, NW>* M = reinterpret_cast<const MaskT<WB, NW>*>(x.mask);
            const double* kt = kt_table(x);
            const double* kp = kp_table(x);
            double r0 = 0.0;
            for (int t = 0; t < x.n; ++t) {
                const MaskT<WB, NW> m = M[(c * x.n + t) * x.K + j];
                if (first_of_class(m, t)) {
                    const int a = mask_popc(m);
                    r0 += kp[a] * (kt[a] - kt[0]);
                }
            }
            x.aux[u] = r0;
        } else if constexpr (MID == M_SSIM || MID == M_PSNR) {
            const u8* qu = unit_q(x, c, j);
            u64 s1 = 0, s2 = 0;
            for (int t = 0; t < x.n; ++t) {
                const u64 v = qu[t];
                s1 += v;
                s2 += v * v;
            }
            if constexpr (MID == M_SSIM) {
                x.aux[u] = (double)s1;
                x.aux2[u] = (double)s2;
            } else {
                const double d1 = (double)s1, d2 = (double)s2;
                const double var = (n * d2 - d1 * d1) / (double)((i64)x.n * x.n);
                const double floor_ = x.tab[T_FLOOR];
                x.aux[u] = 10.0 * p_log10(x.tab[T_DR2] / (var > floor_ ? var : floor_));
            }
        } else if constexpr (MID == M_ENTROPY) {
            double L = 0.0;
            for (int t = 0; t < x.n; ++t) L += lg[x.cnt[u * x.n + t]];
            x.aux[u] = x.tab[T_LOG2N] - L / n;
        }
    }
}

// Partial of candidate j's score against reference ref, channel c:
//   mi, je: sum_t log2(joint count of (ref_t, j_t))
//   kl:     sum over values v of j: P_v (log2 s - log2(b_v + s)), P_v from ref
//   l1:     sum |a - b|;  l2: sum (a - b)^2;  ssim: sum a*b
template <int MID, int WB, int NW>
PORDER_HD double pair_partial(const Ctx& x, int ref, int j, int c, u32 stamp, int tid) {
    if constexpr (Family<MID>::hist_pair && WB == 0) {
        const int* st = cls_start(x, c);
        const u8* qb = unit_q(x, c, j);
        u32* tb = thread_table(x, tid);
        if constexpr (MID == M_KL) {
            const double* kt = kt_table(x);
            const double* kp = kp_table(x);
            for (int t = 0; t < x.n; ++t) tb[qb[t]] += 1u;
            double acc = 0.0;
            for (int t = 0; t < x.n; ++t) {  // values of j in order of first occurrence
                const int v = qb[t];
                const int b = (int)tb[v];
                if (b) {
                    acc += kp[st[v + 1] - st[v]] * (kt[0] - kt[b]);
                    tb[v] = 0u;
                }
            }
            return acc;
        } else {
            // Reference classes of size 1 add log2(1) = 0: skipped.
            const int* ord = cls_ord(x, c);
            const double* lg = lg_table(x);
            double L = 0.0;
            for (int v = 0; v < x.bins; ++v) {
                const int lo = st[v], hi = st[v + 1];
                if (hi - lo < 2) continue;
                for (int i = lo; i < hi; ++i) tb[qb[ord[i]]] += 1u;
                for (int i = lo; i < hi; ++i) L += lg[tb[qb[ord[i]]]];
                for (int i = lo; i < hi; ++i) tb[qb[ord[i]]] = 0u;
            }
            return L;
        }
    } else if constexpr (Family<MID>::hist_pair) {
        const MaskT<WB, NW>* M = reinterpret_cast<const MaskT<WB, NW>*>(x.mask) + c * x.n * x.K;
        if constexpr (MID == M_KL) {
            const double* kt = kt_table(x);
            const double* kp = kp_table(x);
            const u8* qb = unit_q(x, c, j);
            const u32* h = x.hist + c * x.bins;
            double acc = 0.0;
            for (int t = 0; t < x.n; ++t) {
                const MaskT<WB, NW> mb = M[t * x.K + j];
                if (first_of_class(mb, t)) {
                    const u32 e = h[qb[t]];
                    const int a = (e >> 16) == stamp ? (int)(e & 0xFFFFu) : 0;
                    acc += kp[a] * (kt[0] - kt[mask_popc(mb)]);
                }
            }
            return acc;
        } else {
            const double* lg = lg_table(x);
            double L = 0.0;
            for (int t = 0; t < x.n; ++t) L += lg[and_popc(M[t * x.K + ref], M[t * x.K + j])];
            return L;
        }
    } else {
        const u8* qa = unit_q(x, c, ref);
        const u8* qb = unit_q(x, c, j);
        u64 s = 0;
        for (int t = 0; t < x.n; ++t) {
            const int a = qa[t], b = qb[t];
            if constexpr (MID == M_L1) s += (u64)(a > b ? a - b : b - a);
            else if constexpr (MID == M_L2) s += (u64)((a - b) * (a - b));
            else s += (u64)(a * b);
        }
        return (double)s;
    }
}

// Single-window SSIM from exact sums, in porder.measures._ssim_formula's order.
PORDER_HD double ssim_formula(double s1a, double s1b, double s2a, double s2b, double sab,
                              double n, double nn, double c1, double c2) {
    const double mua = s1a / n, mub = s1b / n;
    const double va = (n * s2a - s1a * s1a) / nn;
    const double vb = (n * s2b - s1b * s1b) / nn;
    const double cov = (n * sab - s1a * s1b) / nn;
    const double num = (2 * mua * mub + c1) * (2 * cov + c2);
    const double den = (mua * mua + mub * mub + c1) * (va + vb + c2);
    return num / den;
}

// Score of candidate j against reference ref from the per-channel partials in
// x.part (unit c*K + j) and the per-unit statistics.
template <int MID>
PORDER_HD double pair_score(const Ctx& x, int ref, int j) {
    const double n = (double)x.n;
    const double log2n = x.tab[T_LOG2N];
    return channel_mean(x.C, [&](int c) -> double {
        const int uj = c * x.K + j, ur = c * x.K + ref;
        const double p = x.part[uj];
        if constexpr (MID == M_JE) {
            return log2n - p / n;
        } else if constexpr (MID == M_MI) {
            const double ha = log2n - x.aux[ur] / n, hb = log2n - x.aux[uj] / n;
            return ha + hb - (log2n - p / n);
        } else if constexpr (MID == M_KL) {
            return x.aux[ur] + p;
        } else if constexpr (MID == M_L1) {
            return p / n;
        } else if constexpr (MID == M_L2) {
            return p_sqrt(p / n);
        } else {
            return ssim_formula(x.aux[ur], x.aux[uj], x.aux2[ur], x.aux2[uj], p, n,
                                (double)((i64)x.n * x.n), x.tab[T_C1], x.tab[T_C2]);
        }
    });
}

// One chain step's partials: every (channel, unused candidate) unit against ref.
template <int MID, int WB, int NW>
PORDER_HD void phase_partials(const Ctx& x, int ref, u32 stamp, int tid, int nt) {
    for (int u = tid; u < x.C * x.K; u += nt) {
        const int j = u % x.K, c = u / x.K;
        if (!x.used[j]) x.part[u] = pair_partial<MID, WB, NW>(x, ref, j, c, stamp, tid);
    }
}

// The best unused candidate against ref; writes perm[step] and used[]. Warp 0
// reduces on the device (lanes take candidates lane, lane+32, ...), one thread
// on the host: the same maximum under better()'s total order.
template <int MID>
PORDER_HD void phase_select(const Ctx& x, int ref, int step, int tid, int nt) {
    const int lanes = nt < 32 ? nt : 32;
    if (tid >= lanes) return;
    double bk = -PORDER_DBL_MAX;
    int bj = 0x7FFFFFFF;
    for (int j = tid; j < x.K; j += lanes) {
        if (x.used[j]) continue;
        const double k = chain_key(pair_score<MID>(x, ref, j), x.desc);
        if (better(k, j, bk, bj)) { bk = k; bj = j; }
    }
#if defined(__CUDA_ARCH__)
    for (int off = 16; off > 0; off >>= 1) {
        const double ok = __shfl_xor_sync(0xFFFFFFFFu, bk, off);
        const int oj = __shfl_xor_sync(0xFFFFFFFFu, bj, off);
        if (better(ok, oj, bk, bj)) { bk = ok; bj = oj; }
    }
#endif
    if (tid == 0) {
        x.perm[step] = bj;
        x.used[bj] = 1;
    }
}

// Standalone score of patch j: the mean of its units' scores (x.aux).
PORDER_HD double standalone_score(const Ctx& x, int j) {
    return channel_mean(x.C, [&](int c) -> double { return x.aux[c * x.K + j]; });
}

// Standalone: keys per patch (into x.part), then a stable rank into perm.
PORDER_HD void phase_standalone_keys(const Ctx& x, int tid, int nt) {
    for (int j = tid; j < x.K; j += nt) x.part[j] = sort_key(standalone_score(x, j), x.desc);
}

PORDER_HD void phase_rank(const Ctx& x, int tid, int nt) {
    for (int j = tid; j < x.K; j += nt) {
        const double kj = x.part[j];
        int r = 0;
        for (int i = 0; i < x.K; ++i) r += (i != j && sorts_before(x.part[i], i, kj, j)) ? 1 : 0;
        x.perm[r] = j;
    }
}

// Stream mode: the same order as phase_rank (sorts_before is a total order:
// key, then NaN last, then index) by a block-wide bitonic sort of sortn
// (key, index) pairs, O(K log^2 K / nt) per thread instead of O(K^2 / nt);
// sortn - K padding entries (NaN, index >= K) sort last.
PORDER_HD void phase_sort(const Ctx& x, int tid, int nt) {
    const int N = x.sortn;
    for (int i = tid; i < N; i += nt) {
        x.sort_key[i] = i < x.K ? x.part[i] : p_nan();
        x.sort_idx[i] = i;
    }
    block_sync();
    for (int k = 2; k <= N; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = tid; i < N; i += nt) {
                const int l = i ^ j;
                if (l <= i) continue;
                const bool up = (i & k) == 0;
                const double ki = x.sort_key[i], kl = x.sort_key[l];
                const int ii = x.sort_idx[i], il = x.sort_idx[l];
                if (sorts_before(kl, il, ki, ii) == up) {
                    x.sort_key[i] = kl; x.sort_key[l] = ki;
                    x.sort_idx[i] = il; x.sort_idx[l] = ii;
                }
            }
            block_sync();
        }
    }
    for (int r = tid; r < x.K; r += nt) x.perm[r] = x.sort_idx[r];
}

// perm -> global (int64) and the reordered image -> global. vec bit 1: P*C is
// a multiple of 4 and the output is 4-byte aligned (then every 4 output bytes
// come from one patch row, at a 4-byte aligned source offset).
PORDER_HD void phase_gather(const Ctx& x, u8* out, i64* perm_out, int vec, int tid, int nt) {
    for (int j = tid; j < x.K; j += nt) perm_out[j] = (i64)x.perm[j];
    const int bytes = x.S * x.S * x.C;
    // 4-byte copies need an aligned source too when raw is the input image (vec bit 0)
    const bool wide = (vec & 2) && (!x.raw_input || (vec & 1));
    const int step = wide ? 4 : 1;
    for (int e = tid * step; e < bytes; e += nt * step) {
        const int c = e % x.C, pix = e / x.C;
        const int xx = pix % x.S, y = pix / x.S;
        const int sj = x.perm[(y / x.P) * x.G + xx / x.P];
        const int sy = (sj / x.G) * x.P + y % x.P, sx = (sj % x.G) * x.P + xx % x.P;
        const int src = (sy * x.S + sx) * x.C + c;
        if (wide) store_u32(out + e, load_u32(x.raw + src));
        else out[e] = x.raw[src];
    }
}

// Load, relayout and per-unit statistics: everything before ordering.
// x.raw for one image: the input itself when raw_input, else the shared copy.
PORDER_HD Ctx image_ctx(const Ctx& x, const u8* img) {
    Ctx y = x;
    if (x.raw_input) y.raw = const_cast<u8*>(img);  // only read
    return y;
}

template <int MID, int WB, int NW>
PORDER_HD void prepare_image(const Ctx& x, const u8* img, int vec, int tid, int nt) {
    phase_load(x, img, vec, tid, nt);
    block_sync();
    phase_relayout<MID, WB>(x, tid, nt);
    block_sync();
    if constexpr (Family<MID>::hist_pair && WB > 0) {
        phase_masks<WB, NW>(x, tid, nt);
        block_sync();
    }
    if constexpr (MID == M_ENTROPY && WB > 0) {
        phase_counts<WB, NW>(x, tid, nt);
        block_sync();
    }
    phase_unit_stats<MID, WB, NW>(x, tid, nt);
    if constexpr (MID == M_KL && WB > 0) build_ref_hist<WB, NW>(x, x.ref, 1u, tid, nt);
    block_sync();
}

// The whole per-image pipeline: uint8 image -> reordered image and perm.
template <int MID, int WB, int NW>
PORDER_HD void run_image(const Ctx& x0, const u8* img, u8* out, i64* perm_out, int vec,
                         int tid, int nt) {
    const Ctx x = image_ctx(x0, img);
    prepare_image<MID, WB, NW>(x, img, vec, tid, nt);
    if constexpr (Family<MID>::pairwise) {
        for (int step = 1; step < x.K; ++step) {
            const int ref = x.perm[step - 1];
            const u32 stamp = (u32)step;  // the reference at position step-1 has stamp step
            if constexpr (Family<MID>::hist_pair && WB == 0) {
                phase_ref_classes<MID>(x, ref, tid, nt);
                block_sync();
            }
            phase_partials<MID, WB, NW>(x, ref, stamp, tid, nt);
            block_sync();
            phase_select<MID>(x, ref, step, tid, nt);
            block_sync();
            if constexpr (MID == M_KL && WB > 0) {
              if (step + 1 < x.K) {
                build_ref_hist<WB, NW>(x, x.perm[step], (u32)(step + 1), tid, nt);
                block_sync();
              }
            }
        }
    } else {
        phase_standalone_keys(x, tid, nt);
        block_sync();
        if constexpr (WB == 0) phase_sort(x, tid, nt);
        else phase_rank(x, tid, nt);
        block_sync();
    }
    phase_gather(x, out, perm_out, vec, tid, nt);
    block_sync();  // the next image overwrites shared memory
}

}  // namespace porder

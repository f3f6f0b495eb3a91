// host_harness.cu: runs porder_core.cuh's per-image functions on the CPU.
//
// Built by tests/test_kernels_cuda.py with g++ (-x c++) or nvcc into a shared
// library and called through ctypes: the same scoring, keys, ties and chain as
// the CUDA kernel, with one "thread" per image (tid 0 of 1; barriers are no-ops).
// The shared-memory buffer and the block's global scratch are filled with
// garbage first and followed by a guard band, so a read of an unwritten byte or
// a write past the layout that launch_geometry() computed shows up as a wrong
// result or a nonzero return.
#include "porder_core.cuh"

#include <cstdlib>
#include <cstring>

namespace {

using namespace porder;

const int GUARD = 256;    // bytes after the layout that must stay untouched
const u8 GARBAGE = 0xA5;  // shared memory starts with this, not zeros

struct Smem {
    u8* base;
    int size;
    explicit Smem(int bytes) : size(bytes) {
        base = static_cast<u8*>(std::aligned_alloc(64, ((bytes + GUARD + 63) / 64) * 64));
        std::memset(base, GARBAGE, bytes + GUARD);
    }
    ~Smem() { std::free(base); }
    bool guard_ok() const {
        for (int i = 0; i < GUARD; ++i)
            if (base[size + i] != GARBAGE) return false;
        return true;
    }
};

// Dispatch (mid, wb, nw) to a template instantiation of F, as the kernel's
// name expressions do.
template <template <int, int, int> class F, class... A>
int dispatch(int mid, int wb, int nw, A... a) {
#define PORDER_CASE(M, W, N) \
    if (mid == M && wb == W && nw == N) return F<M, W, N>::run(a...);
#define PORDER_HIST(M) \
    PORDER_CASE(M, 0, 0) PORDER_CASE(M, 16, 1) PORDER_CASE(M, 32, 1) PORDER_CASE(M, 64, 1) \
    PORDER_CASE(M, 64, 2) PORDER_CASE(M, 64, 3) PORDER_CASE(M, 64, 4)
    PORDER_HIST(M_ENTROPY)
    PORDER_CASE(M_PSNR, 0, 0) PORDER_CASE(M_PSNR, 64, 1)
    PORDER_HIST(M_MI)
    PORDER_HIST(M_JE)
    PORDER_HIST(M_KL)
    PORDER_CASE(M_L1, 0, 0) PORDER_CASE(M_L1, 64, 1)
    PORDER_CASE(M_L2, 0, 0) PORDER_CASE(M_L2, 64, 1)
    PORDER_CASE(M_SSIM, 0, 0) PORDER_CASE(M_SSIM, 64, 1)
#undef PORDER_HIST
#undef PORDER_CASE
    return -1;
}

template <int MID, int WB, int NW>
struct Reorder {
    static int run(const u8* images, i64 n_images, int vec, u8* out, i64* perm,
                   const int* params, const double* tab) {
        Smem sm(params[P_SMEM]), gm(params[P_GMEM]);
        const Ctx x = make_ctx<WB == 0>(params, sm.base, gm.base, tab);
        if (!x.tab_global) {
            for (int i = 0; i < x.ntab; ++i) x.tab[i] = tab[i];
        }
        const i64 img_bytes = (i64)x.S * x.S * x.C;
        for (i64 i = 0; i < n_images; ++i) {
            run_image<MID, WB, NW>(x, images + i * img_bytes, out + i * img_bytes,
                                   perm + i * x.K, vec, 0, 1);
        }
        return sm.guard_ok() && gm.guard_ok() ? 0 : -2;
    }
};

// scores (n_images, K, K): scores[i, r, j] = score of candidate j against
// reference r (pairwise; the diagonal is left as given), or (n_images, K):
// the standalone score of each patch.
template <int MID, int WB, int NW>
struct Scores {
    static int run(const u8* images, i64 n_images, const int* params, const double* tab,
                   double* scores) {
        Smem sm(params[P_SMEM]), gm(params[P_GMEM]);
        const Ctx x0 = make_ctx<WB == 0>(params, sm.base, gm.base, tab);
        if (!x0.tab_global) {
            for (int i = 0; i < x0.ntab; ++i) x0.tab[i] = tab[i];
        }
        const i64 img_bytes = (i64)x0.S * x0.S * x0.C;
        for (i64 i = 0; i < n_images; ++i) {
            const Ctx x = image_ctx(x0, images + i * img_bytes);
            prepare_image<MID, WB, NW>(x, images + i * img_bytes, 0, 0, 1);
            if constexpr (Family<MID>::pairwise) {
                double* s = scores + i * x.K * x.K;
                for (int r = 0; r < x.K; ++r) {
                    if constexpr (MID == M_KL && WB > 0) {
                        build_ref_hist<WB, NW>(x, r, (u32)(r + 2), 0, 1);
                    } else if constexpr (Family<MID>::hist_pair && WB == 0) {
                        phase_ref_classes<MID>(x, r, 0, 1);
                    }
                    for (int j = 0; j < x.K; ++j) {
                        if (j == r) continue;
                        for (int c = 0; c < x.C; ++c)
                            x.part[c * x.K + j] =
                                pair_partial<MID, WB, NW>(x, r, j, c, (u32)(r + 2), 0);
                        s[r * x.K + j] = pair_score<MID>(x, r, j);
                    }
                }
            } else {
                for (int j = 0; j < x.K; ++j) scores[i * x.K + j] = standalone_score(x, j);
            }
        }
        return sm.guard_ok() && gm.guard_ok() ? 0 : -2;
    }
};

}  // namespace

extern "C" {

// Returns 0, -1 for an unknown (mid, wb, nw), -2 when the guard band was written.
int porder_host_reorder(int mid, int wb, int nw, const unsigned char* images, long long n_images,
                        int vec, unsigned char* out, long long* perm, const int* params,
                        const double* tab) {
    return dispatch<Reorder>(mid, wb, nw, images, (i64)n_images, vec, out, (i64*)perm, params,
                             tab);
}

int porder_host_scores(int mid, int wb, int nw, const unsigned char* images, long long n_images,
                       const int* params, const double* tab, double* scores) {
    return dispatch<Scores>(mid, wb, nw, images, (i64)n_images, params, tab, scores);
}

// The key functions alone, for direct tests of rounding, NaN and tie rules.
double porder_host_chain_key(double score, int descending) {
    return chain_key(score, descending != 0);
}

double porder_host_sort_key(double score, int descending) {
    return sort_key(score, descending != 0);
}

int porder_host_param_count(void) { return P_COUNT; }

}  // extern "C"

// reorder.cu: the fused POR kernel. One launch takes a batch of uint8 images to
// reordered images and int64 permutations: one thread block per image (a
// grid-stride loop over images), everything in between in shared memory when
// one image's working set fits it, else partly in the block's own slice of a
// global scratch buffer the host allocates (params[P_SPACE] says which regions,
// params[P_GMEM] the bytes per block; see cuda_geometry.py launch_geometry).
//
// porder/kernels/cuda.py compiles it through cupy.RawModule (NVRTC, -std=c++17,
// --fmad=false), one template instantiation per (measure, mask words) it needs,
// and launches it with the params and table its launch_geometry() computed.
// tests/test_kernels_cuda.py compiles every instantiation with nvcc
// (-DPORDER_INSTANTIATE_ALL) for sm_90 and sm_80, warnings as errors.
#include "porder_core.cuh"

// images  uint8 (n_images, S, S, C), contiguous
// n_images number of images in this launch
// vec     bit 0: 4-byte loads of images are aligned; bit 1: 4-byte stores of out
// out     uint8 (n_images, S, S, C): the reordered images
// perm    int64 (n_images, K): output patch j is input patch perm[:, j]
// params  int32 (P_COUNT,): shape, measure and shared-memory layout
// tab     float64 (params[P_NTAB],): constants and log tables
// err     int32 (1,): set (bitwise or) when the launch does not match params:
//         1 dynamic shared memory too small, 2 template arguments, 4 block size,
//         8 no global scratch although params ask for it
// scratch uint8 (gridDim.x * params[P_GMEM],): block b owns bytes
//         [b * P_GMEM, (b + 1) * P_GMEM); may be null when P_GMEM is 0
template <int MID, int WB, int NW>
__global__ void __launch_bounds__(256) porder_reorder(
    const porder::u8* __restrict__ images, long long n_images, int vec,
    porder::u8* __restrict__ out, long long* __restrict__ perm,
    const int* __restrict__ params, const double* __restrict__ tab, int* err,
    porder::u8* __restrict__ scratch) {
    using namespace porder;
    extern __shared__ __align__(16) u8 smem[];
    u32 dyn;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    int bad = 0;
    if (dyn < (u32)params[P_SMEM]) bad |= 1;
    if (params[P_MID] != MID || params[P_WB] != WB || params[P_NW] != NW) bad |= 2;
    if ((int)blockDim.x != params[P_NT]) bad |= 4;
    if ((WB > 0) != (params[P_SPACE] == 0)) bad |= 2;  // WB = 0: stream mode
    if (params[P_GMEM] > 0 && scratch == nullptr) bad |= 8;
    if (bad) {  // uniform over the block: every thread leaves here
        if (threadIdx.x == 0) atomicOr(err, bad);
        return;
    }
    const Ctx x = make_ctx<WB == 0>(params, smem, scratch + (long long)blockIdx.x * params[P_GMEM], tab);
    const int tid = threadIdx.x, nt = blockDim.x;
    if (!x.tab_global) {
        for (int i = tid; i < x.ntab; i += nt) x.tab[i] = tab[i];
    }
    __syncthreads();
    const long long img_bytes = (long long)x.S * x.S * x.C;
    for (long long i = blockIdx.x; i < n_images; i += gridDim.x) {
        run_image<MID, WB, NW>(x, images + i * img_bytes, out + i * img_bytes, perm + i * x.K,
                               vec, tid, nt);
    }
}

#ifdef PORDER_INSTANTIATE_ALL
// Every instantiation porder/kernels/cuda_geometry.py can ask for (kernel_name()):
// WB = NW = 0 is stream mode (and table mode for the histogram measures).
#define PORDER_ONE(MID, WB, NW)                                                       \
    template __global__ void porder_reorder<MID, WB, NW>(const porder::u8*, long long, int, \
        porder::u8*, long long*, const int*, const double*, int*, porder::u8*);
#define PORDER_HIST(MID)                                                              \
    PORDER_ONE(MID, 0, 0) PORDER_ONE(MID, 16, 1) PORDER_ONE(MID, 32, 1)               \
    PORDER_ONE(MID, 64, 1) PORDER_ONE(MID, 64, 2) PORDER_ONE(MID, 64, 3) PORDER_ONE(MID, 64, 4)
#define PORDER_MOMENT(MID) PORDER_ONE(MID, 0, 0) PORDER_ONE(MID, 64, 1)
PORDER_HIST(0)    // entropy
PORDER_MOMENT(1)  // psnr
PORDER_HIST(2)    // mi
PORDER_HIST(3)    // je
PORDER_HIST(4)    // kl
PORDER_MOMENT(5)  // l1
PORDER_MOMENT(6)  // l2
PORDER_MOMENT(7)  // ssim
#endif

// The CUDA kernels of the LNCC family (arithmetic in lncc.h), kept apart from the launcher
// (lncc_cuda.cu) so that tests/simt can run the same code on the CPU (blocks and threads emulated by
// fibers on one host thread) against the CPU ops. Needs: __global__, threadIdx / blockIdx / blockDim /
// gridDim (CUDA, or tests/simt/simt.h). The launch geometry (threads per block, blocks for n
// grid-stride work items) is host arithmetic here too, so that the emulation launches as the GPU does.
//
// One thread per voxel (grid-stride). The box sums are separable direct sums (box_taps) between two
// field-major buffers [kFields][B * C * volume]; no atomics, so results are reproducible run to run.
#pragma once
#include <cstdint>

#include "common/launch_geometry.h"
#include "common/macros.h"
#include "lncc/lncc.h"

namespace medfast::lncc {

// ---- Launch geometry (host) ----

constexpr int kThreads = 256;

// Blocks of kThreads for n grid-stride work items on `sms` multiprocessors.
inline int64_t blocks_for(int64_t n, int64_t sms) { return grid_blocks_for(n, kThreads, sms); }

// ---- Kernels ----

#define MEDFAST_GRID_STRIDE(i, total) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (total); i += int64_t(gridDim.x) * blockDim.x)

template <typename T>
__global__ void products_kernel(const T* t, const T* p, T* buf, int64_t M) {
  MEDFAST_GRID_STRIDE(i, M) {
    T f[kFields];
    products(t[i], p[i], f);
    for (int k = 0; k < kFields; ++k) buf[k * M + i] = f[k];
  }
}

// out = box sum of in along the middle axis of the layout [outer][n][inner].
template <typename T>
__global__ void box_kernel(const T* in, T* out, int64_t n, int64_t inner, int64_t r, int64_t total) {
  MEDFAST_GRID_STRIDE(e, total) {
    const int64_t v = e % inner, i = (e / inner) % n, o = e / (inner * n);
    out[e] = box_taps(in + o * n * inner + v, i, n, inner, r);
  }
}

template <typename T>
__global__ void ncc_kernel(const T* buf, T* out, int64_t M, T N, T nr, T dr) {
  MEDFAST_GRID_STRIDE(i, M) {
    T s[kFields];
    for (int k = 0; k < kFields; ++k) s[k] = buf[k * M + i];
    out[i] = ncc_voxel(s, N, nr, dr);
  }
}

template <typename T>
__global__ void adjoint_kernel(const T* sums, T* buf, const T* g, int64_t M, T N, T nr, T dr) {
  MEDFAST_GRID_STRIDE(i, M) {
    T s[kFields];
    for (int k = 0; k < kFields; ++k) s[k] = sums[k * M + i];
    adjoint_voxel(s, g[i], N, nr, dr);
    for (int k = 0; k < kFields; ++k) buf[k * M + i] = s[k];
  }
}

template <typename T>
__global__ void combine_kernel(const T* buf, const T* t, const T* p, T* gt, T* gp, int64_t M) {
  MEDFAST_GRID_STRIDE(i, M) {
    T s[kFields];
    for (int k = 0; k < kFields; ++k) s[k] = buf[k * M + i];
    combine_voxel(s, t[i], p[i], gt[i], gp[i]);
  }
}

#undef MEDFAST_GRID_STRIDE

}  // namespace medfast::lncc

// The CUDA kernels of the warp op's forward and (atomic) backward, kept apart from the launcher
// (warp_cuda.cu) so that tests/simt can run the same code on the CPU (threads, warp shuffles and
// atomicAdd emulated by fibers on one host thread) against the CPU op. Needs: __global__, threadIdx / blockIdx /
// blockDim / gridDim, __shfl_up_sync / __shfl_down_sync and atomicAdd (CUDA, or tests/simt/simt.h).
// One thread per output voxel (grid-stride); the flat index is split by IndexSplit (warp.h).
#pragma once
#include <cmath>

#include "common/macros.h"
#include "warp/warp.h"

namespace medfast::warp {

// Threads per block of every launch of these kernels (warp_cuda.cu).
constexpr int kBlockThreads = 256;
// The register budget of the float32 / half linear and nearest backward kernels, as blocks of kBlockThreads
// per multiprocessor (65536 registers): 2, so at most 128 registers. Without it the zeros-padding outside
// test and the zero-weight rules took the linear backward from 122 to 140 registers (sm_90), one block per
// multiprocessor instead of two, and its kernel time at 256^3 on an H200 from 0.69 to 1.19 ms (h200b /
// h200c_warp_profile). With it ptxas spills 44 bytes (zeros padding) and the kernel took 0.78 ms
// (h200d_warp_profile). Cubic and float64 keep what they need.
// (Capping forward_kernel at 64 registers spilled 48 bytes; the default forward, ilp1, uses 64 unbounded.)
template <int MODE, typename T>
constexpr int backward_min_blocks = MODE != kCubic && sizeof(T) == 4 ? 2 : 1;

template <typename S, typename T, int NDIM, int MODE, int PAD>
__global__ void forward_kernel(const WarpArgs<S, T, NDIM> A, const IndexSplit<NDIM> U, S* out, int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t b, x, xi[NDIM];
    split_index<NDIM>(i, U, A.out_numel, A.out_size, b, x, xi);
    forward_voxel<MODE, PAD>(A, out, b, xi, x);
  }
}

// The forward with V output voxels per thread (the default for linear / nearest with V = 1; ilp2 / ilp4 by
// MEDFAST_WARP_CUDA_FORWARD, slower on an H200):
// the kernel is bound by memory latency more than by bandwidth (one voxel's displacement loads, then its
// gathers, then its store, in sequence), so each thread first issues the displacement loads of all its
// V voxels (voxels base + v * blockDim.x: each load instruction still coalesced across the warp), then
// forms their stencils with 32-bit offsets (the launcher checks that one batch element of the image has
// fewer than 2^31 elements), then issues all their gathers before any store. The arithmetic of each voxel
// is forward_voxel's (forward_stencil, stencil_sum), so the results are bitwise those of forward_kernel.
template <typename S, typename T, int NDIM, int MODE, int PAD, int V>
__global__ void forward_ilp_kernel(const WarpArgs<S, T, NDIM> A, const IndexSplit<NDIM> U, S* out, int64_t total) {
  using St = Stencil<T, NDIM, taps_of<MODE>::value, int32_t>;
  const int64_t nt = blockDim.x;
  for (int64_t base = blockIdx.x * nt * V + threadIdx.x; base < total; base += int64_t(gridDim.x) * nt * V) {
    St s[V];
    int64_t b[V], x[V];
    bool active[V];
    int kind[V];  // SampleKind
    MEDFAST_UNROLL
    for (int v = 0; v < V; ++v) {
      const int64_t i = base + v * nt;
      active[v] = i < total;
      kind[v] = kSampleZero;
      b[v] = x[v] = 0;
      if (active[v]) {
        int64_t xi[NDIM];
        split_index<NDIM>(i, U, A.out_numel, A.out_size, b[v], x[v], xi);
        kind[v] = forward_stencil<MODE, PAD>(A, b[v], xi, s[v]);
      }
    }
    for (int64_t c = 0; c < A.channels; ++c) {
      T acc[V];
      MEDFAST_UNROLL
      for (int v = 0; v < V; ++v)
        acc[v] = active[v] && kind[v] == kSampleStencil
                     ? stencil_sum(s[v], A.image + b[v] * A.image_sb + c * A.image_sc) : T(0);
      MEDFAST_UNROLL
      for (int v = 0; v < V; ++v)
        if (active[v])
          out[(b[v] * A.channels + c) * A.out_numel + x[v]] =
              kind[v] == kSampleNaN ? static_cast<S>(NAN) : static_cast<S>(acc[v]);
    }
  }
}

template <typename S, typename T, int NDIM, int MODE, int PAD>
__global__ void MEDFAST_LAUNCH_BOUNDS(kBlockThreads, (backward_min_blocks<MODE, T>))
    backward_kernel(const WarpArgs<S, T, NDIM> A, const IndexSplit<NDIM> U, const S* gout, T* grad_pos,
                    T* grad_image, int64_t in_numel, int64_t total) {
  auto add = [grad_image](int64_t off, T val) { atomicAdd(grad_image + off, val); };
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t b, x, xi[NDIM];
    split_index<NDIM>(i, U, A.out_numel, A.out_size, b, x, xi);
    backward_voxel<MODE, PAD>(A, gout, grad_pos, grad_image != nullptr, in_numel, b, xi, x, add);
  }
}

// Linear-mode backward with the image-gradient scatter merged inside each warp. Neighbouring lanes
// are neighbouring output voxels along the last axis; under a smooth displacement the upper tap of
// one lane's row pair is the lower tap of the next lane's. Such a lane hands that value to its
// neighbour (one shuffle), which adds it to its own lower tap: about half the float atomics,
// which bound this kernel. The loop is warp-uniform so every lane reaches every shuffle; the
// arithmetic is warp.h's (taps, stencil, position gradient).
template <typename S, typename T, int NDIM, int PAD>
__global__ void MEDFAST_LAUNCH_BOUNDS(kBlockThreads, (backward_min_blocks<kLinear, T>))
    backward_linear_merged_kernel(const WarpArgs<S, T, NDIM> A, const IndexSplit<NDIM> U, const S* gout,
                                              T* grad_pos, T* grad_image, int64_t in_numel, int64_t total) {
  using St = Stencil<T, NDIM, 2>;
  constexpr unsigned kFull = 0xffffffffu;
  const int lane = threadIdx.x & 31;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i0 = blockIdx.x * int64_t(blockDim.x) + (threadIdx.x & ~31); i0 < total; i0 += stride) {
    const int64_t i = i0 + lane;
    int64_t b = 0, x = 0, xi[NDIM];
    T p[NDIM];
    St s;
    bool ok = false;
    if (i < total) {
      split_index<NDIM>(i, U, A.out_numel, A.out_size, b, x, xi);
      ok = sample_position(A, b, xi, p);
      const bool zero = ok && sample_outside<kLinear, PAD, T, NDIM>(p, A.in_size);  // 0, no gradient
      if ((!ok || zero) && grad_pos != nullptr)
        for (int d = 0; d < NDIM; ++d) grad_pos[(b * NDIM + d) * A.out_numel + x] = zero ? T(0) : static_cast<T>(NAN);
      ok = ok && !zero;
    }
    if (ok) {
      AxisTaps<T, 2> ax[NDIM];
      compute_taps<kLinear, PAD>(A, p, ax);
      make_stencil<true>(ax, A.image_st, A.in_size, s);
    }
    T gp[NDIM];
    for (int d = 0; d < NDIM; ++d) gp[d] = T(0);
    const S* img = A.image + b * A.image_sb;
    const S* g = gout + b * A.channels * A.out_numel + x;
    long long gbase = (A.image_batch == 1 ? 0 : b) * A.channels * in_numel;
    for (int64_t c = 0; c < A.channels; ++c, img += A.image_sc, gbase += in_numel) {
      const T gc = ok ? static_cast<T>(g[c * A.out_numel]) : T(0);
      if (grad_pos != nullptr && gc != T(0)) add_position_grad(s, img, gc, gp);
      if (grad_image == nullptr) continue;  // uniform across the warp
      MEDFAST_UNROLL
      for (int q = 0; q < St::N / 2; ++q) {  // taps 2q, 2q + 1 differ along the last axis only
        const long long lo = ok ? gbase + s.lin[2 * q] : -1, hi = ok ? gbase + s.lin[2 * q + 1] : -2;
        const T vlo = ok ? tap_product(s.w[2 * q], gc) : T(0);
        const T vhi = ok ? tap_product(s.w[2 * q + 1], gc) : T(0);
        const long long next_lo = __shfl_down_sync(kFull, lo, 1);
        const bool give = lane < 31 && next_lo == hi;  // next lane is valid: hi >= 0
        const T got = __shfl_up_sync(kFull, give ? vhi : T(0), 1);
        const T mine = vlo + (lane > 0 ? got : T(0));
        if (mine != T(0)) atomicAdd(grad_image + lo, mine);
        if (!give && vhi != T(0)) atomicAdd(grad_image + hi, vhi);
      }
    }
    if (ok && grad_pos != nullptr)
      for (int d = 0; d < NDIM; ++d) grad_pos[(b * NDIM + d) * A.out_numel + x] = gp[d];
  }
}

}  // namespace medfast::warp

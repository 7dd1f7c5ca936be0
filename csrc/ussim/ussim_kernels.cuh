// The one-thread-per-ray / per-line / per-sample CUDA kernels of the ultrasound ray march (ray march
// forward and backward, line march, the property-gradient scatter, and the PSF's axial, lateral and
// transposed lateral passes; arithmetic in ussim.h), kept apart from the launcher (ussim_cuda.cu) so
// that tests/simt can run the same code on the CPU (blocks and threads emulated by fibers on one host
// thread) against the CPU ops. The warp-cooperative kernels are in ussim_warp.cuh. Needs: __global__ /
// __device__, threadIdx / blockIdx / blockDim / gridDim and atomicAdd (CUDA, or tests/simt/simt.h). The
// launch geometry (threads per block, blocks for n grid-stride work items) is host arithmetic here too,
// so that the emulation launches as the GPU does.
//
// The plain property-gradient scatter (MEDFAST_USSIM_CUDA_SCATTER=plain; the default is the merged
// scatter_merged_kernel of ussim_warp.cuh) adds each sample's share with atomicAdd, one thread per sample
// (not bitwise deterministic on a GPU; see docs/ultrasound.md).
#pragma once
#include <cstdint>

#include "common/launch_geometry.h"
#include "common/macros.h"
#include "ussim/ussim.h"

namespace medfast::ussim {

// ---- Launch geometry (host) ----

constexpr int kThreads = 128;

// Blocks of kThreads for n grid-stride work items on `sms` multiprocessors.
inline int64_t blocks_for(int64_t n, int64_t sms) { return grid_blocks_for(n, kThreads, sms); }

// ---- Kernels ----

// The adder of scatter_props on the GPU: one atomicAdd per property (the emulation: a plain add).
struct AtomicAdd {
  template <typename T>
  __device__ void operator()(T* dst, T v) const { atomicAdd(dst, v); }
};

template <typename T>
__global__ void march_kernel(const T* vol, const float* table, const Params P, const T* coords, T* out, int64_t rays,
                             int64_t R) {
  using A = acc_t<T>;
  const int64_t vol_stride = P.D * P.H * P.W * kProps;
  for (int64_t ray = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; ray < rays; ray += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = ray / R;
    march_ray<T, A>(vol + frame_volume(P, b) * vol_stride, table, P, coords + ray * P.S * 3, out + ray * P.S * 3);
  }
}

template <typename T>
__global__ void lines_kernel(const T* vol, const float* table, const Params P, const T* start, const T* step,
                             const T* w, T* out, int64_t lines, int64_t L, int64_t E) {
  using A = acc_t<T>;
  const int64_t vol_stride = P.D * P.H * P.W * kProps;
  for (int64_t line = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; line < lines;
       line += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = line / L;
    march_line<T, A>(vol + frame_volume(P, b) * vol_stride, table, P, start + line * E * 3, step + line * 3, w, E,
                     out + line * 3 * P.S, P.S);
  }
}

// PSF: one thread per output sample, its sum in a register (psf_axial_at / psf_lateral_at of ussim.h).
template <typename T>
__global__ void psf_axial_kernel(const T* x, const T* h, T* out, int64_t rows, int64_t K, int64_t S, bool flip) {
  using A = acc_t<T>;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < rows * S; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = k / S, s = k - r * S;
    out[k] = psf_axial_at<T, A>(x + r * S, h + (r % 3) * K, K, S, s, flip);
  }
}

// (B, L, 3, S) -> (B, 2, L, S): real part = lateral(specular) + lateral(scatter re), imaginary part =
// lateral(scatter im), each channel with its own weights.
template <typename T>
__global__ void psf_lateral_kernel(const T* y, const T* w, T* out, int64_t B, int64_t L, int64_t J, int64_t S) {
  using A = acc_t<T>;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < B * L * S; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = k / S, s = k - row * S, l = row % L, b = row / L;
    const T* yb = y + b * L * 3 * S;
    T re = psf_lateral_at<T, A>(yb, 3 * S, w, J, L, S, l, s, false, T(0));
    re = psf_lateral_at<T, A>(yb + S, 3 * S, w + J * S, J, L, S, l, s, false, re);
    out[(b * 2 * L + l) * S + s] = re;
    out[((b * 2 + 1) * L + l) * S + s] = psf_lateral_at<T, A>(yb + 2 * S, 3 * S, w + 2 * J * S, J, L, S, l, s, false,
                                                               T(0));
  }
}

// The transpose: (B, 2, L, S) -> (B, L, 3, S), channel c reading the real (c < 2) or imaginary part.
template <typename T>
__global__ void psf_lateral_t_kernel(const T* g, const T* w, T* out, int64_t B, int64_t L, int64_t J, int64_t S) {
  using A = acc_t<T>;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < B * L * 3 * S;
       k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = k / S, s = k - r * S, c = r % 3, l = (r / 3) % L, b = r / (3 * L);
    out[k] = psf_lateral_at<T, A>(g + (b * 2 + (c < 2 ? 0 : 1)) * L * S, S, w + c * J * S, J, L, S, l, s, true, T(0));
  }
}

template <typename T>
__global__ void backward_kernel(const T* vol, const float* table, const Params P, const T* coords, const T* grad,
                                T* gvals, T* gcoords, int64_t rays, int64_t R) {
  using A = acc_t<T>;
  const int64_t vol_stride = P.D * P.H * P.W * kProps;
  for (int64_t ray = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; ray < rays; ray += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = ray / R;
    march_ray_backward<T, A>(vol + frame_volume(P, b) * vol_stride, table, P, coords + ray * P.S * 3,
                             grad + ray * P.S * 3, gvals ? gvals + ray * P.S * kProps : nullptr,
                             gcoords ? gcoords + ray * P.S * 3 : nullptr);
  }
}

template <typename T>
__global__ void scatter_kernel(T* gprops, const Params P, const T* coords, const T* gvals, int64_t samples,
                               int64_t per_frame) {
  using A = acc_t<T>;
  const int64_t vol_stride = P.D * P.H * P.W * kProps;
  const AtomicAdd add;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < samples; k += int64_t(gridDim.x) * blockDim.x) {
    A g[kProps];
    for (int q = 0; q < kProps; ++q) g[q] = static_cast<A>(gvals[k * kProps + q]);
    scatter_props<A>(gprops + frame_volume(P, k / per_frame) * vol_stride, P, static_cast<A>(coords[3 * k]),
                     static_cast<A>(coords[3 * k + 1]), static_cast<A>(coords[3 * k + 2]), g, add);
  }
}

}  // namespace medfast::ussim

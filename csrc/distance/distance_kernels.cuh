// The CUDA kernels of the distance family (arithmetic in distance.h), kept apart from the launcher
// (distance_cuda.cu) so that tests/simt can run the same code on the CPU (blocks and threads emulated
// by fibers on one host thread) against the CPU ops. Needs: __global__, threadIdx / blockIdx /
// blockDim / gridDim (CUDA, or tests/simt/simt.h). The launch geometry (threads per block, blocks for
// n grid-stride work items) is host arithmetic here too, so that the emulation launches as the GPU does.
//
// One thread per line (grid-stride). Neighbouring threads take neighbouring lines, so the reads of the
// strided axes are coalesced; the envelope scratch lives in global memory, interleaved by line
// (element k of line l at [k * lines + l]) for the same reason. No atomics: deterministic.
#pragma once
#include <cstdint>

#include "common/launch_geometry.h"
#include "common/macros.h"
#include "distance/distance.h"

namespace medfast::distance {

// ---- Launch geometry (host) ----

constexpr int kThreads = 128;

// Blocks of kThreads for n grid-stride work items on `sms` multiprocessors.
inline int64_t blocks_for(int64_t n, int64_t sms) { return grid_blocks_for(n, kThreads, sms); }

// Sizes and spacings of the spatial axes (unused axes: size 1, spacing 1), passed by value.
struct Geometry {
  int64_t size[3];
  double spacing[3];
};

// ---- Kernels ----

// One envelope pass over each of the `lines` lines L (scratch: index (lines x n), values 2 (lines x n)).
template <typename T>
__global__ void pass_kernel(T* d, const Lines L, T h, int64_t* index, T* scratch, int64_t lines) {
  for (int64_t l = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; l < lines; l += int64_t(gridDim.x) * blockDim.x) {
    T* s = scratch + l;
    envelope_pass<T>(d + L.start(l), L.inner, L.n, h, index + l, s, s + L.n * lines, lines);
  }
}

// The first pass over the binary start (binary_line_pass): no scratch.
template <typename T>
__global__ void binary_pass_kernel(T* d, const Lines L, T h, int64_t lines) {
  for (int64_t l = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; l < lines; l += int64_t(gridDim.x) * blockDim.x)
    binary_line_pass<T>(d + L.start(l), L.inner, L.n, h);
}

// Squared distances to distances (the virtual background voxel where none is finite).
template <typename T>
__global__ void finish_kernel(T* d, int64_t total, int ndim, const Geometry g, int64_t numel) {
  T h[3] = {T(g.spacing[0]), T(g.spacing[1]), T(g.spacing[2])};
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    d[i] = finish<T>(d[i], i % numel, ndim, g.size, h);
}

// The binary first pass of the seed distances along the lines L.
__global__ inline void seed_pass_kernel(const bool* s, float* d, const Lines L, float h, int64_t lines) {
  for (int64_t l = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; l < lines; l += int64_t(gridDim.x) * blockDim.x) {
    const int64_t start = L.start(l);
    seed_line_pass<float>(s + start, L.inner, d + start, L.inner, L.n, h);
  }
}

// The last pass of the seed distances at the `count` query voxels index[k], along the lines L.
__global__ inline void query_kernel(const float* d, const int64_t* index, int64_t count, const Lines L, float h,
                                    float* out) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < count; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t x = index[k], plane = L.n * L.inner;
    const int64_t b = x / plane, r = x - b * plane, i = r / L.inner;
    out[k] = distance_at<float>(d + b * plane + (r - i * L.inner), L.inner, L.n, i, h);
  }
}

// Surface voxels of a (B, D, H, W) mask (D = 1, has_z false in 2D), one thread per voxel: a voxel on
// the image border has a neighbour outside, hence no interior.
__global__ inline void surface_kernel(const uint8_t* m, uint8_t* out, int64_t total, int64_t D, int64_t H, int64_t W,
                                      bool has_z) {
  const int64_t plane = H * W;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const uint8_t c = m[i];
    const int64_t x = i % W, y = (i / W) % H, z = (i / plane) % D;
    const bool border = x == 0 || x == W - 1 || y == 0 || y == H - 1 || (has_z && (z == 0 || z == D - 1));
    if (border || c == 0) {
      out[i] = c;
      continue;
    }
    const int64_t dz = has_z ? plane : W;
    out[i] = surface_voxel(c, m[i - 1], m[i + 1], m[i - W], m[i + W], m[i - dz], m[i + dz]);
  }
}

}  // namespace medfast::distance

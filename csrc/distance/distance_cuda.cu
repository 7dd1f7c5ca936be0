// CUDA launcher of the distance transform: one kernel per axis, one thread per line (grid-stride),
// the arithmetic from distance.h. Neighbouring threads take neighbouring lines, so the reads of the
// strided axes are coalesced; the envelope scratch lives in global memory, interleaved by line
// (element k of line l at [k * lines + l]) for the same reason. No atomics: deterministic.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "common/cuda_launch.h"
#include "distance/distance_launch.h"

namespace medfast::distance {
namespace {

constexpr int kThreads = 128;

int64_t blocks_for(int64_t n) { return grid_blocks(n, kThreads); }

template <typename T>
__global__ void pass_kernel(T* d, const Lines L, T h, int64_t* index, T* scratch, int64_t lines) {
  for (int64_t l = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; l < lines; l += int64_t(gridDim.x) * blockDim.x) {
    T* s = scratch + l;
    envelope_pass<T>(d + L.start(l), L.inner, L.n, h, index + l, s, s + L.n * lines, lines);
  }
}

struct Geometry {
  int64_t size[3];
  double spacing[3];
};

template <typename T>
__global__ void finish_kernel(T* d, int64_t total, int ndim, const Geometry g, int64_t numel) {
  T h[3] = {T(g.spacing[0]), T(g.spacing[1]), T(g.spacing[2])};
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    d[i] = finish<T>(d[i], i % numel, ndim, g.size, h);
}

}  // namespace

Tensor distance_cuda(const Tensor& mask, const std::vector<double>& spacing, at::ScalarType dtype) {
  const c10::cuda::CUDAGuard guard(mask.device());
  Tensor d = initial_squared(mask, dtype);
  const int ndim = static_cast<int>(d.dim() - 1);
  Geometry g{{1, 1, 1}, {1.0, 1.0, 1.0}};
  int64_t numel = 1;
  for (int a = 0; a < ndim; ++a) {
    g.size[a] = d.size(1 + a);
    g.spacing[a] = spacing[a];
    numel *= g.size[a];
  }
  // Every axis has lines x n = d.numel() entries per scratch array.
  Tensor index = at::empty({d.numel()}, d.options().dtype(at::kLong));
  Tensor scratch = at::empty({2 * d.numel()}, d.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(dtype, "medfast_distance_cuda", [&] {
    scalar_t* ptr = d.mutable_data_ptr<scalar_t>();
    for (int a = 0; a < ndim; ++a) {
      const Lines L = lines_along(d, a);
      const int64_t lines = L.count();
      pass_kernel<scalar_t><<<blocks_for(lines), kThreads, 0, stream>>>(
          ptr, L, static_cast<scalar_t>(spacing[a]), index.mutable_data_ptr<int64_t>(),
          scratch.mutable_data_ptr<scalar_t>(), lines);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    finish_kernel<scalar_t><<<blocks_for(d.numel()), kThreads, 0, stream>>>(ptr, d.numel(), ndim, g, numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return d;
}

}  // namespace medfast::distance

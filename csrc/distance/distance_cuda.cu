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

__global__ void seed_pass_kernel(const bool* s, float* d, const Lines L, float h, int64_t lines) {
  for (int64_t l = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; l < lines; l += int64_t(gridDim.x) * blockDim.x) {
    const int64_t start = L.start(l);
    seed_line_pass<float>(s + start, L.inner, d + start, L.inner, L.n, h);
  }
}

__global__ void query_kernel(const float* d, const int64_t* index, int64_t count, const Lines L, float h, float* out) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < count; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t x = index[k], plane = L.n * L.inner;
    const int64_t b = x / plane, r = x - b * plane, i = r / L.inner;
    out[k] = distance_at<float>(d + b * plane + (r - i * L.inner), L.inner, L.n, i, h);
  }
}

}  // namespace

// Same passes as seed_distances_cpu. The seed pass runs along the last axis there (contiguous
// lines); here along the first, so that neighbouring threads read neighbouring voxels, and the
// queries scan along the last axis.
Tensor seed_distances_cuda(const Tensor& seeds_in, const Tensor& query, const std::vector<double>& spacing) {
  const c10::cuda::CUDAGuard guard(seeds_in.device());
  const Tensor seeds = seeds_in.ne(0).contiguous();
  const Tensor index = query.ne(0).flatten().nonzero().flatten();
  Tensor d = at::empty(seeds.sizes(), seeds.options().dtype(at::kFloat));
  Tensor out = at::empty({index.numel()}, d.options());
  const int ndim = static_cast<int>(d.dim() - 1);
  const auto stream = at::cuda::getCurrentCUDAStream();
  float* dp = d.mutable_data_ptr<float>();
  const Lines first = lines_along(d, 0);
  seed_pass_kernel<<<blocks_for(first.count()), kThreads, 0, stream>>>(
      seeds.const_data_ptr<bool>(), dp, first, static_cast<float>(spacing[0]), first.count());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (ndim == 3) {
    const Lines mid = lines_along(d, 1);
    Tensor vidx = at::empty({d.numel()}, d.options().dtype(at::kLong));
    Tensor scratch = at::empty({2 * d.numel()}, d.options());
    pass_kernel<float><<<blocks_for(mid.count()), kThreads, 0, stream>>>(
        dp, mid, static_cast<float>(spacing[1]), vidx.mutable_data_ptr<int64_t>(), scratch.mutable_data_ptr<float>(),
        mid.count());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (index.numel() > 0) {
    const Lines lastL = lines_along(d, ndim - 1);
    query_kernel<<<blocks_for(index.numel()), kThreads, 0, stream>>>(dp, index.const_data_ptr<int64_t>(),
                                                                     index.numel(), lastL,
                                                                     static_cast<float>(spacing[ndim - 1]),
                                                                     out.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

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

// CUDA launcher of the distance transform: one kernel per axis, one thread per line (grid-stride).
// The kernels and their launch geometry are in distance_kernels.cuh (arithmetic in distance.h).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "common/cuda_launch.h"
#include "distance/distance_kernels.cuh"
#include "distance/distance_launch.h"

namespace medfast::distance {
namespace {

// Blocks for n grid-stride work items on this device (distance_kernels.cuh blocks_for).
int64_t grid_for(int64_t n) { return blocks_for(n, sm_count()); }

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
  seed_pass_kernel<<<grid_for(first.count()), kThreads, 0, stream>>>(
      seeds.const_data_ptr<bool>(), dp, first, static_cast<float>(spacing[0]), first.count());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (ndim == 3) {
    const Lines mid = lines_along(d, 1);
    Tensor vidx = at::empty({d.numel()}, d.options().dtype(at::kLong));
    Tensor scratch = at::empty({2 * d.numel()}, d.options());
    pass_kernel<float><<<grid_for(mid.count()), kThreads, 0, stream>>>(
        dp, mid, static_cast<float>(spacing[1]), vidx.mutable_data_ptr<int64_t>(), scratch.mutable_data_ptr<float>(),
        mid.count());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (index.numel() > 0) {
    const Lines lastL = lines_along(d, ndim - 1);
    query_kernel<<<grid_for(index.numel()), kThreads, 0, stream>>>(dp, index.const_data_ptr<int64_t>(),
                                                                     index.numel(), lastL,
                                                                     static_cast<float>(spacing[ndim - 1]),
                                                                     out.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

std::tuple<Tensor, Tensor> surface_edges_cuda(const Tensor& mask) {
  const c10::cuda::CUDAGuard guard(mask.device());
  const int64_t nd = mask.dim() - 1;
  Tensor out = at::empty_like(mask);
  if (out.numel() > 0) {
    const int64_t D = nd == 3 ? mask.size(1) : 1, H = mask.size(nd - 1), W = mask.size(nd);
    surface_kernel<<<grid_for(out.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>()),
        reinterpret_cast<uint8_t*>(out.mutable_data_ptr<bool>()), out.numel(), D, H, W, nd == 3);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out, out.flatten(1).sum(1)};
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
      if (a == 0)  // the binary start: two sweeps, no envelope
        binary_pass_kernel<scalar_t><<<grid_for(lines), kThreads, 0, stream>>>(ptr, L, static_cast<scalar_t>(spacing[a]),
                                                                               lines);
      else
        pass_kernel<scalar_t><<<grid_for(lines), kThreads, 0, stream>>>(
            ptr, L, static_cast<scalar_t>(spacing[a]), index.mutable_data_ptr<int64_t>(),
            scratch.mutable_data_ptr<scalar_t>(), lines);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    finish_kernel<scalar_t><<<grid_for(d.numel()), kThreads, 0, stream>>>(ptr, d.numel(), ndim, g, numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return d;
}

}  // namespace medfast::distance

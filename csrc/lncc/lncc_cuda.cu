// CUDA launcher of the LNCC family: one thread per voxel (grid-stride). The kernels and their launch
// geometry are in lncc_kernels.cuh (arithmetic in lncc.h).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <utility>

#include "common/cuda_launch.h"
#include "lncc/lncc_kernels.cuh"
#include "lncc/lncc_launch.h"

namespace medfast::lncc {
namespace {

// Blocks for n grid-stride work items on this device (lncc_kernels.cuh blocks_for).
int64_t grid_for(int64_t n) { return blocks_for(n, sm_count()); }

// Box-sums the fields in `a` along every axis (ping-pong with `b`); returns the buffer holding them.
template <typename T>
T* box_all(const Geometry& g, T* a, T* b, cudaStream_t stream) {
  const int64_t total = kFields * g.total();
  for (int ax = 0; ax < 3; ++ax) {
    if (g.r[ax] == 0) continue;
    box_kernel<T><<<grid_for(total), kThreads, 0, stream>>>(a, b, g.n[ax], g.inner(ax), g.r[ax], total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    std::swap(a, b);
  }
  return a;
}

}  // namespace

std::tuple<Tensor, Tensor> lncc_cuda(const Tensor& pred, const Tensor& target, at::IntArrayRef kernel_size,
                                     double nr, double dr) {
  const c10::cuda::CUDAGuard guard(pred.device());
  const Geometry g(pred, kernel_size);
  const Tensor p = pred.contiguous(), t = target.contiguous();
  Tensor out = at::empty_like(p);
  const int64_t M = g.total();
  Tensor sums = at::empty(sums_shape(p), p.options());
  if (M == 0) return {out, sums};  // nothing to launch (as lncc_cpu)
  Tensor scratch = at::empty({kFields * M}, p.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "medfast_lncc_cuda", [&] {
    using T = scalar_t;
    T* a = sums.mutable_data_ptr<T>();
    T* b = scratch.mutable_data_ptr<T>();
    const int64_t blocks = grid_for(M);
    products_kernel<T><<<blocks, kThreads, 0, stream>>>(t.const_data_ptr<T>(), p.const_data_ptr<T>(), a, M);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    T* s = box_all(g, a, b, stream);
    if (s != a) {  // an odd number of box passes: the sums are in the scratch buffer
      C10_CUDA_CHECK(cudaMemcpyAsync(a, s, sizeof(T) * kFields * M, cudaMemcpyDeviceToDevice, stream));
    }
    ncc_kernel<T><<<blocks, kThreads, 0, stream>>>(a, out.mutable_data_ptr<T>(), M, static_cast<T>(g.window),
                                                   static_cast<T>(nr), static_cast<T>(dr));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, sums};
}

std::tuple<Tensor, Tensor> lncc_backward_cuda(const Tensor& grad, const Tensor& pred, const Tensor& target,
                                              const Tensor& sums, at::IntArrayRef kernel_size, double nr,
                                              double dr) {
  const c10::cuda::CUDAGuard guard(pred.device());
  const Geometry g(pred, kernel_size);
  const Tensor p = pred.contiguous(), t = target.contiguous(), gr = grad.contiguous(), sm = sums.contiguous();
  Tensor grad_pred = at::empty_like(p), grad_target = at::empty_like(t);
  const int64_t M = g.total();
  if (M == 0) return {grad_pred, grad_target};  // nothing to launch (as lncc_backward_cpu)
  Tensor bufs = at::empty({2, kFields * M}, p.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "medfast_lncc_backward_cuda", [&] {
    using T = scalar_t;
    T* a = bufs[0].mutable_data_ptr<T>();
    T* b = bufs[1].mutable_data_ptr<T>();
    const T N = static_cast<T>(g.window), tnr = static_cast<T>(nr), tdr = static_cast<T>(dr);
    const int64_t blocks = grid_for(M);
    adjoint_kernel<T><<<blocks, kThreads, 0, stream>>>(sm.const_data_ptr<T>(), a, gr.const_data_ptr<T>(), M, N,
                                                       tnr, tdr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    T* adj = box_all(g, a, b, stream);
    combine_kernel<T><<<blocks, kThreads, 0, stream>>>(adj, t.const_data_ptr<T>(), p.const_data_ptr<T>(),
                                                       grad_target.mutable_data_ptr<T>(),
                                                       grad_pred.mutable_data_ptr<T>(), M);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_pred, grad_target};
}

}  // namespace medfast::lncc

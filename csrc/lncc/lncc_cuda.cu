// CUDA launcher of the LNCC family: one thread per voxel (grid-stride), the arithmetic from
// lncc.h. The box sums are separable direct sums (box_taps) between two field-major buffers
// [kFields][B * C * volume]; no atomics, so results are reproducible run to run.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <utility>

#include "common/cuda_launch.h"
#include "lncc/lncc_launch.h"

namespace medfast::lncc {
namespace {

constexpr int kThreads = 256;

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

// Box-sums the fields in `a` along every axis (ping-pong with `b`); returns the buffer holding them.
template <typename T>
T* box_all(const Geometry& g, T* a, T* b, cudaStream_t stream) {
  const int64_t total = kFields * g.total();
  for (int ax = 0; ax < 3; ++ax) {
    if (g.r[ax] == 0) continue;
    box_kernel<T><<<grid_blocks(total, kThreads), kThreads, 0, stream>>>(a, b, g.n[ax], g.inner(ax), g.r[ax], total);
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
  Tensor scratch = at::empty({kFields * M}, p.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "medfast_lncc_cuda", [&] {
    using T = scalar_t;
    T* a = sums.mutable_data_ptr<T>();
    T* b = scratch.mutable_data_ptr<T>();
    const int64_t blocks = grid_blocks(M, kThreads);
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
  Tensor bufs = at::empty({2, kFields * M}, p.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "medfast_lncc_backward_cuda", [&] {
    using T = scalar_t;
    T* a = bufs[0].mutable_data_ptr<T>();
    T* b = bufs[1].mutable_data_ptr<T>();
    const T N = static_cast<T>(g.window), tnr = static_cast<T>(nr), tdr = static_cast<T>(dr);
    const int64_t blocks = grid_blocks(M, kThreads);
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

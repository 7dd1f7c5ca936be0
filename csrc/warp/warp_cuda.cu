// CUDA launcher of the warp family: one thread per output voxel (grid-stride), the arithmetic
// from warp.h / spline.h. The image gradient uses float atomics by default; under
// torch.use_deterministic_algorithms(True) it is built from per-tap lists reduced by the
// deterministic (sort-based) index_put_ with accumulate, so it is bitwise reproducible.
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "common/cuda_launch.h"
#include "warp/spline.h"
#include "warp/warp_launch.h"
#include "warp/warp_kernels.cuh"

namespace medfast::warp {
namespace {

constexpr int kThreads = kBlockThreads;

int64_t blocks_for(int64_t n) { return grid_blocks(n, kThreads); }

// The linear backward's scatter: merged (lanes hand shared taps to their neighbour before the
// atomics) for several channels, plain (one atomic per tap) for one; on an H200 merged took 15 % less
// kernel time at C=4 and 3 % more at C=1, 256^3 (h200b_warp_profile). MEDFAST_WARP_CUDA_SCATTER=plain
// or =merged forces one.
bool merged_scatter(int64_t channels) {
  const char* v = std::getenv("MEDFAST_WARP_CUDA_SCATTER");
  if (v != nullptr && std::strcmp(v, "merged") == 0) return true;
  if (v != nullptr && std::strcmp(v, "plain") == 0) return false;
  return channels > 1;
}

// The linear / nearest forward: forward_ilp_kernel with 32-bit tap offsets and one output voxel per thread
// (ilp1) by default, where the offsets fit. On an H200 (h200c_warp_profile) it was the fastest of the four
// in every case: 1339 GB/s effective at 256^3 against 1057 for forward_kernel (80 registers per thread
// since the zeros-padding outside test), 1180 for ilp2, 882 for ilp4. MEDFAST_WARP_CUDA_FORWARD=one
// selects forward_kernel, =ilp2 / =ilp4 two or four voxels per thread.
int forward_ilp() {
  const char* v = std::getenv("MEDFAST_WARP_CUDA_FORWARD");
  if (v == nullptr) return 1;
  if (std::strcmp(v, "one") == 0) return 0;
  if (std::strcmp(v, "ilp2") == 0) return 2;
  if (std::strcmp(v, "ilp4") == 0) return 4;
  return 1;
}

// True when every tap offset within one batch element and channel of the image fits in an int32.
template <typename S, typename T, int NDIM>
bool int32_offsets(const WarpArgs<S, T, NDIM>& A) {
  int64_t most = 0;
  for (int i = 0; i < NDIM; ++i) most += (A.in_size[i] - 1) * A.image_st[i];
  return most < (int64_t(1) << 31);
}

// MEDFAST_WARP_CUDA_INDEX=int64 splits the flat index by int64 division instead of FastDiv (both
// are always compiled: the flag is per launch), so the two can be timed on one build.
template <int NDIM>
IndexSplit<NDIM> index_split(int64_t total, const int64_t out_numel, const int64_t* out_size) {
  auto u = make_index_split<NDIM>(total, out_numel, out_size);
  const char* v = std::getenv("MEDFAST_WARP_CUDA_INDEX");
  if (v != nullptr && std::strcmp(v, "int64") == 0) u.fast = false;
  return u;
}

// Deterministic path: for output voxels [begin, begin + count), the flat image offsets (channel 0)
// and weights of all taps. A NaN position, or one that reads nothing (zeros padding wholly outside),
// contributes nothing: its taps get offset -1, and the launcher masks its output gradient (an inf or
// NaN gradient times the weights 0 would be NaN at offset 0, where the CPU and atomic paths add nothing).
template <typename S, typename T, int NDIM, int MODE, int PAD>
__global__ void taps_kernel(const WarpArgs<S, T, NDIM> A, int64_t in_numel, int64_t begin, int64_t count,
                            int64_t* idx, T* w) {
  constexpr int K = taps_of<MODE>::value;
  constexpr int KT = Stencil<T, NDIM, K>::N;
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < count; j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = begin + j, b = i / A.out_numel, x = i - b * A.out_numel;
    int64_t xi[NDIM];
    unravel<NDIM>(x, A.out_size, xi);
    T p[NDIM];
    int64_t* oi = idx + j * KT;
    T* ow = w + j * KT;
    if (sample_position(A, b, xi, p) && !sample_outside<MODE, PAD, T, NDIM>(p, A.in_size)) {
      AxisTaps<T, K> ax[NDIM];
      compute_taps<MODE, PAD>(A, p, ax);
      Stencil<T, NDIM, K> s;
      make_stencil<false>(ax, A.image_st, A.in_size, s);
      const int64_t base = (A.image_batch == 1 ? 0 : b) * A.channels * in_numel;
      for (int t = 0; t < KT; ++t) {
        oi[t] = base + s.lin[t];
        ow[t] = s.w[t];
      }
    } else {
      for (int t = 0; t < KT; ++t) {
        oi[t] = -1;
        ow[t] = T(0);
      }
    }
  }
}

template <typename S, typename T, int NDIM, int MODE, int PAD>
void deterministic_image_grad(const WarpArgs<S, T, NDIM>& A, const Tensor& gout, Tensor& grad_image,
                              int64_t in_numel, cudaStream_t stream) {
  constexpr int KT = Stencil<T, NDIM, taps_of<MODE>::value>::N;
  const int64_t total = A.batch * A.out_numel;
  // (C, batch * out_numel) view of the output gradient.
  const Tensor g = gout.view({A.batch, A.channels, A.out_numel}).transpose(0, 1).reshape({A.channels, total});
  const Tensor flat = grad_image.view({-1});
  const Tensor chan_off = at::arange(A.channels, gout.options().dtype(at::kLong)).mul_(in_numel).view({-1, 1, 1});
  if (A.channels == 0 || total == 0) return;  // (a direct op call with C = 0: no division by zero below)
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 25) / (KT * A.channels));
  for (int64_t begin = 0; begin < total; begin += chunk) {
    const int64_t count = std::min(chunk, total - begin);
    Tensor idx = at::empty({count, KT}, gout.options().dtype(at::kLong));
    Tensor w = at::empty({count, KT}, grad_image.options());
    taps_kernel<S, T, NDIM, MODE, PAD><<<blocks_for(count), kThreads, 0, stream>>>(
        A, in_numel, begin, count, idx.mutable_data_ptr<int64_t>(), w.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const Tensor reads_nothing = idx.select(1, 0).lt(0).unsqueeze(0);  // (1, count)
    const Tensor gc = g.narrow(1, begin, count).to(w.scalar_type()).masked_fill(reads_nothing, 0);
    // a tap with no weight gets nothing (warp.h tap_product): 0 x an inf or NaN gradient would be NaN
    const Tensor vals = (w.unsqueeze(0) * gc.unsqueeze(2)).masked_fill_(w.unsqueeze(0) == 0, 0);
    idx.clamp_min_(0);
    flat.index_put_({(idx.unsqueeze(0) + chan_off).view({-1})}, vals.view({-1}), /*accumulate=*/true);
  }
}

}  // namespace

Tensor forward_cuda(const Tensor& image, const OptTensor& theta, const OptTensor& ddf, at::IntArrayRef shape,
                    int mode, int padding) {
  const c10::cuda::CUDAGuard guard(image.device());
  const int64_t batch = output_batch(image, theta, ddf);
  Tensor out = at::empty(output_sizes(batch, image.size(1), shape), image.options());
  const int64_t total = batch * c10::multiply_integers(shape);
  if (out.numel() == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_warp(image.scalar_type(), image.dim() - 2, mode, padding, [&]<typename S, int NDIM, int MODE, int PAD>() {
    const auto A = make_args<S, acc_t<S>, NDIM>(image, theta, ddf, shape);
    const auto U = index_split<NDIM>(total, A.out_numel, A.out_size);
    S* o = out.mutable_data_ptr<S>();
    const int v = MODE == kCubic ? 0 : forward_ilp();
    if (v > 0 && int32_offsets(A)) {
      if (v == 1)
        forward_ilp_kernel<S, acc_t<S>, NDIM, MODE, PAD, 1><<<blocks_for(total), kThreads, 0, stream>>>(A, U, o, total);
      else if (v == 2)
        forward_ilp_kernel<S, acc_t<S>, NDIM, MODE, PAD, 2><<<blocks_for((total + 1) / 2), kThreads, 0, stream>>>(
            A, U, o, total);
      else
        forward_ilp_kernel<S, acc_t<S>, NDIM, MODE, PAD, 4><<<blocks_for((total + 3) / 4), kThreads, 0, stream>>>(
            A, U, o, total);
    } else {
      forward_kernel<S, acc_t<S>, NDIM, MODE, PAD><<<blocks_for(total), kThreads, 0, stream>>>(A, U, o, total);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<Tensor, Tensor> backward_cuda(const Tensor& grad, const Tensor& image, const OptTensor& theta,
                                         const OptTensor& ddf, at::IntArrayRef shape, int mode, int padding,
                                         bool image_grad, bool position_grad) {
  const c10::cuda::CUDAGuard guard(image.device());
  const int64_t batch = output_batch(image, theta, ddf);
  const int64_t ndim = image.dim() - 2;
  const auto pos_opts = image.options().dtype(position_dtype(image.scalar_type()));
  const Tensor gout = grad.contiguous();
  Tensor grad_pos = position_grad ? at::empty(output_sizes(batch, ndim, shape), pos_opts) : at::empty({0}, pos_opts);
  Tensor grad_image = image_grad ? at::zeros(image.sizes(), pos_opts) : at::empty({0}, pos_opts);
  const int64_t total = batch * c10::multiply_integers(shape);
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (total > 0 && (image_grad || position_grad)) {
    dispatch_warp(image.scalar_type(), ndim, mode, padding, [&]<typename S, int NDIM, int MODE, int PAD>() {
      using T = acc_t<S>;
      const auto A = make_args<S, T, NDIM>(image, theta, ddf, shape);
      const auto U = index_split<NDIM>(total, A.out_numel, A.out_size);
      int64_t in_numel = 1;
      for (int i = 0; i < NDIM; ++i) in_numel *= A.in_size[i];
      const bool atomics = image_grad && !deterministic;
      if constexpr (MODE == kLinear) {
        if ((position_grad || atomics) && merged_scatter(A.channels)) {
          backward_linear_merged_kernel<S, T, NDIM, PAD><<<blocks_for(total), kThreads, 0, stream>>>(
              A, U, gout.const_data_ptr<S>(), position_grad ? grad_pos.mutable_data_ptr<T>() : nullptr,
              atomics ? grad_image.mutable_data_ptr<T>() : nullptr, in_numel, total);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          if (image_grad && deterministic)
            deterministic_image_grad<S, T, NDIM, MODE, PAD>(A, gout, grad_image, in_numel, stream);
          return;
        }
      }
      if (position_grad || atomics) {
        backward_kernel<S, T, NDIM, MODE, PAD><<<blocks_for(total), kThreads, 0, stream>>>(
            A, U, gout.const_data_ptr<S>(), position_grad ? grad_pos.mutable_data_ptr<T>() : nullptr,
            atomics ? grad_image.mutable_data_ptr<T>() : nullptr, in_numel, total);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (image_grad && deterministic) deterministic_image_grad<S, T, NDIM, MODE, PAD>(A, gout, grad_image, in_numel, stream);
    });
  }
  if (image_grad && grad_image.scalar_type() != image.scalar_type()) grad_image = grad_image.to(image.scalar_type());
  return {grad_image, grad_pos};
}

namespace {
template <typename T>
__global__ void spline_factors_kernel(T* out, int64_t n, int padding, bool transpose) {
  spline_factors_into(out, n, padding, transpose);
}

template <typename T>
__global__ void prefilter_kernel(T* data, int64_t lines, int64_t n, int64_t inner, const T* factors) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < lines; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t o = i / inner, j = i - o * inner;
    spline_solve_lines(data + o * n * inner + j, n, inner, 1, factors);
  }
}
}  // namespace

Tensor prefilter_cuda(const Tensor& image, int padding, bool transpose) {
  const c10::cuda::CUDAGuard guard(image.device());
  const auto acc = position_dtype(image.scalar_type());
  Tensor coef = image.to(acc, /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous);
  if (coef.numel() == 0) return coef.to(image.scalar_type());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t ndim = image.dim() - 2;
  AT_DISPATCH_FLOATING_TYPES(acc, "medfast_spline_prefilter", [&] {
    for (int64_t axis = 0; axis < ndim; ++axis) {
      const int64_t n = coef.size(2 + axis);
      const int64_t inner = c10::multiply_integers(coef.sizes().slice(3 + axis));
      const int64_t lines = coef.numel() / n;
      const Tensor factors = at::empty({3 * n}, coef.options());
      spline_factors_kernel<scalar_t><<<1, 1, 0, stream>>>(factors.mutable_data_ptr<scalar_t>(), n, padding, transpose);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      prefilter_kernel<scalar_t><<<blocks_for(lines), kThreads, 0, stream>>>(
          coef.mutable_data_ptr<scalar_t>(), lines, n, inner, factors.const_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return coef.scalar_type() == image.scalar_type() ? coef : coef.to(image.scalar_type());
}

}  // namespace medfast::warp

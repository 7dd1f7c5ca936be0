// Host-side glue shared by the warp launchers: argument packing, dtype/rank/mode dispatch, and the
// launcher entry points that warp.cpp registers with the dispatcher.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <optional>
#include <tuple>

#include "warp/warp.h"

namespace medfast::warp {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

int parse_mode(c10::string_view mode);
int parse_padding(c10::string_view padding);

// Batch of the output: the largest of the image, theta and ddf batches (the others are 1 or equal).
inline int64_t output_batch(const Tensor& image, const OptTensor& theta, const OptTensor& ddf) {
  int64_t b = image.size(0);
  if (theta) b = std::max(b, theta->size(0));
  if (ddf) b = std::max(b, ddf->size(0));
  return b;
}

// theta is expected contiguous (the caller makes it so; it is tiny).
template <typename S, typename T, int NDIM>
WarpArgs<S, T, NDIM> make_args(const Tensor& image, const OptTensor& theta, const OptTensor& ddf,
                               at::IntArrayRef shape) {
  WarpArgs<S, T, NDIM> A{};
  A.batch = output_batch(image, theta, ddf);
  A.channels = image.size(1);
  A.image = image.const_data_ptr<S>();
  A.image_batch = image.size(0);
  A.image_sb = image.size(0) == 1 ? 0 : image.stride(0);
  A.image_sc = image.stride(1);
  for (int i = 0; i < NDIM; ++i) {
    A.image_st[i] = image.stride(2 + i);
    A.in_size[i] = image.size(2 + i);
    A.out_size[i] = shape[i];
  }
  A.out_numel = 1;
  for (int i = 0; i < NDIM; ++i) A.out_numel *= shape[i];
  A.ddf = nullptr;
  if (ddf) {
    A.ddf = ddf->const_data_ptr<T>();
    A.ddf_sb = ddf->size(0) == 1 ? 0 : ddf->stride(0);
    A.ddf_sc = ddf->stride(1);
    for (int i = 0; i < NDIM; ++i) A.ddf_st[i] = ddf->stride(2 + i);
  }
  A.theta = nullptr;
  if (theta) {
    A.theta = theta->const_data_ptr<T>();
    A.theta_sb = theta->size(0) == 1 ? 0 : NDIM * (NDIM + 1);
  }
  return A;
}

// Calls f.template operator()<S, NDIM, MODE, PAD>() for the image dtype, spatial rank, mode and
// padding (all compile-time in the kernels: no per-tap branches).
template <typename F>
void dispatch_warp(at::ScalarType dtype, int64_t ndim, int mode, int padding, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "medfast_warp", [&] {
    auto by_pad = [&]<int NDIM, int MODE>() {
      if (padding == kZeros) f.template operator()<scalar_t, NDIM, MODE, kZeros>();
      else if (padding == kBorder) f.template operator()<scalar_t, NDIM, MODE, kBorder>();
      else f.template operator()<scalar_t, NDIM, MODE, kReflection>();
    };
    auto by_mode = [&]<int NDIM>() {
      if (mode == kNearest) by_pad.template operator()<NDIM, kNearest>();
      else if (mode == kLinear) by_pad.template operator()<NDIM, kLinear>();
      else by_pad.template operator()<NDIM, kCubic>();
    };
    if (ndim == 2) by_mode.template operator()<2>();
    else by_mode.template operator()<3>();
  });
}

// Position / accumulation dtype that goes with an image dtype.
inline at::ScalarType position_dtype(at::ScalarType image_dtype) {
  return image_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline std::vector<int64_t> output_sizes(int64_t batch, int64_t channels, at::IntArrayRef shape) {
  std::vector<int64_t> sizes{batch, channels};
  sizes.insert(sizes.end(), shape.begin(), shape.end());
  return sizes;
}

// grad_image += each of the (chunks - 1) buffers in `extra`, in a fixed order (CPU image gradients).
void reduce_chunk_buffers(float* grad_image, const float* extra, int64_t chunks, int64_t numel);
void reduce_chunk_buffers(double* grad_image, const double* extra, int64_t chunks, int64_t numel);

// AVX2 fast path (warp_cpu_avx2.cpp): linear/nearest, float32, 3D, zeros/border. false: not applicable.
bool try_forward_avx2(const WarpArgs<float, float, 3>& A, int mode, int padding, float* out);
// Both gradients in one sweep without per-thread buffers, where that is race-free; false: not done.
bool try_backward_avx2_one_sweep(const WarpArgs<float, float, 3>& A, int mode, int padding, const float* gout,
                                 float* grad_pos, float* grad_image);
bool try_backward_avx2(const WarpArgs<float, float, 3>& A, int mode, int padding, const float* gout,
                       float* grad_pos, float* grad_image, float* extra, int64_t chunks, bool plane_parallel);

Tensor forward_cpu(const Tensor& image, const OptTensor& theta, const OptTensor& ddf, at::IntArrayRef shape,
                   int mode, int padding);
std::tuple<Tensor, Tensor> backward_cpu(const Tensor& grad, const Tensor& image, const OptTensor& theta,
                                        const OptTensor& ddf, at::IntArrayRef shape, int mode, int padding,
                                        bool image_grad, bool position_grad);
Tensor prefilter_cpu(const Tensor& image, int padding, bool transpose);

#ifdef MEDFAST_WITH_CUDA
Tensor forward_cuda(const Tensor& image, const OptTensor& theta, const OptTensor& ddf, at::IntArrayRef shape,
                    int mode, int padding);
std::tuple<Tensor, Tensor> backward_cuda(const Tensor& grad, const Tensor& image, const OptTensor& theta,
                                         const OptTensor& ddf, at::IntArrayRef shape, int mode, int padding,
                                         bool image_grad, bool position_grad);
Tensor prefilter_cuda(const Tensor& image, int padding, bool transpose);
#endif

}  // namespace medfast::warp

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
                               at::IntArrayRef shape, int mode, int padding) {
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
  A.mode = mode;
  A.padding = padding;
  return A;
}

// Calls f.template operator()<S, NDIM, MODE>() for the image dtype, spatial rank and mode.
template <typename F>
void dispatch_warp(at::ScalarType dtype, int64_t ndim, int mode, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "medfast_warp", [&] {
    auto by_mode = [&]<int NDIM>() {
      if (mode == kNearest) f.template operator()<scalar_t, NDIM, kNearest>();
      else if (mode == kLinear) f.template operator()<scalar_t, NDIM, kLinear>();
      else f.template operator()<scalar_t, NDIM, kCubic>();
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

template <int NDIM>
struct Strides {
  int64_t v[NDIM];
};

// Contiguous strides of the spatial block (in elements).
template <int NDIM>
Strides<NDIM> contiguous_strides(const int64_t* size) {
  Strides<NDIM> s{};
  s.v[NDIM - 1] = 1;
  for (int i = NDIM - 2; i >= 0; --i) s.v[i] = s.v[i + 1] * size[i + 1];
  return s;
}

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

// Schemas of the warp family and their dispatch to the CPU / CUDA launchers. Friendly argument
// validation happens in Python (medfast/ops/_warp.py); the checks here only keep a direct call of
// torch.ops.medfast.* from reaching a kernel with arguments it cannot handle.
#include <torch/library.h>

#include "warp/warp_launch.h"

namespace medfast::warp {

int parse_mode(c10::string_view mode) {
  if (mode == "nearest") return kNearest;
  if (mode == "linear") return kLinear;
  if (mode == "cubic") return kCubic;
  TORCH_CHECK_VALUE(false, "medfast warp: mode must be 'nearest', 'linear' or 'cubic', got '", mode, "'");
}

int parse_padding(c10::string_view padding) {
  if (padding == "zeros") return kZeros;
  if (padding == "border") return kBorder;
  if (padding == "reflection") return kReflection;
  TORCH_CHECK_VALUE(false, "medfast warp: padding must be 'zeros', 'border' or 'reflection', got '", padding, "'");
}

namespace {

void check_args(const Tensor& image, const OptTensor& theta, const OptTensor& ddf, at::IntArrayRef shape) {
  const int64_t nd = image.dim() - 2;
  TORCH_CHECK_VALUE(nd == 2 || nd == 3, "medfast warp: image must be (B, C, H, W) or (B, C, D, H, W), got ",
                    image.sizes());
  TORCH_CHECK_VALUE(static_cast<int64_t>(shape.size()) == nd, "medfast warp: shape must have ", nd, " entries");
  TORCH_CHECK_TYPE(at::isFloatingType(image.scalar_type()), "medfast warp: image must be floating, got ",
                   image.scalar_type());
  for (int64_t i = 0; i < nd; ++i) {
    TORCH_CHECK_VALUE(image.size(2 + i) >= 1, "medfast warp: image has an empty spatial axis: ", image.sizes());
    TORCH_CHECK_VALUE(shape[i] >= 0, "medfast warp: shape must not be negative, got ", shape);
  }
  const auto pos = position_dtype(image.scalar_type());
  const int64_t batch = output_batch(image, theta, ddf);
  TORCH_CHECK_VALUE(image.size(0) == 1 || image.size(0) == batch, "medfast warp: image batch mismatch");
  if (ddf) {
    TORCH_CHECK_VALUE(ddf->dim() == nd + 2 && ddf->size(1) == nd, "medfast warp: ddf must be (B, ", nd, ", *shape)");
    for (int64_t i = 0; i < nd; ++i) TORCH_CHECK_VALUE(ddf->size(2 + i) == shape[i], "medfast warp: ddf shape mismatch");
    TORCH_CHECK_VALUE(ddf->size(0) == 1 || ddf->size(0) == batch, "medfast warp: ddf batch mismatch");
    TORCH_CHECK_TYPE(ddf->scalar_type() == pos, "medfast warp: ddf dtype must be ", pos);
    TORCH_CHECK_VALUE(ddf->device() == image.device(), "medfast warp: ddf and image on different devices");
  }
  if (theta) {
    TORCH_CHECK_VALUE(theta->dim() == 3 && theta->size(1) == nd && theta->size(2) == nd + 1,
                      "medfast warp: theta must be (B, ", nd, ", ", nd + 1, ")");
    TORCH_CHECK_VALUE(theta->size(0) == 1 || theta->size(0) == batch, "medfast warp: theta batch mismatch");
    TORCH_CHECK_TYPE(theta->scalar_type() == pos, "medfast warp: theta dtype must be ", pos);
    TORCH_CHECK_VALUE(theta->device() == image.device(), "medfast warp: theta and image on different devices");
  }
}

OptTensor contiguous_theta(const OptTensor& theta) {
  return theta ? OptTensor(theta->contiguous()) : std::nullopt;
}

template <typename Fwd>
Tensor forward(Fwd launch, const Tensor& image, const OptTensor& theta, const OptTensor& ddf, at::IntArrayRef shape,
               c10::string_view mode, c10::string_view padding) {
  check_args(image, theta, ddf, shape);
  return launch(image, contiguous_theta(theta), ddf, shape, parse_mode(mode), parse_padding(padding));
}

template <typename Bwd>
std::tuple<Tensor, Tensor> backward(Bwd launch, const Tensor& grad, const Tensor& image, const OptTensor& theta,
                                    const OptTensor& ddf, at::IntArrayRef shape, c10::string_view mode,
                                    c10::string_view padding, bool image_grad, bool position_grad) {
  check_args(image, theta, ddf, shape);
  const auto expected = output_sizes(output_batch(image, theta, ddf), image.size(1), shape);
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef(expected), "medfast warp: grad has shape ", grad.sizes(),
                    ", expected ", at::IntArrayRef(expected));
  TORCH_CHECK_TYPE(grad.scalar_type() == image.scalar_type(), "medfast warp: grad dtype must match the image");
  TORCH_CHECK_VALUE(grad.device() == image.device(), "medfast warp: grad on ", grad.device(), " but image on ",
                    image.device());
  return launch(grad, image, contiguous_theta(theta), ddf, shape, parse_mode(mode), parse_padding(padding),
                image_grad, position_grad);
}

Tensor prefilter(Tensor (*launch)(const Tensor&, int, bool), const Tensor& image, c10::string_view padding,
                 bool transpose) {
  TORCH_CHECK_VALUE(image.dim() == 4 || image.dim() == 5,
                    "medfast spline_prefilter: image must be (B, C, H, W) or (B, C, D, H, W)");
  TORCH_CHECK_TYPE(at::isFloatingType(image.scalar_type()), "medfast spline_prefilter: image must be floating, got ",
                   image.scalar_type());
  return launch(image, parse_padding(padding), transpose);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(medfast, m) {
  m.def("warp_forward(Tensor image, Tensor? theta, Tensor? ddf, SymInt[] shape, str mode, str padding) -> Tensor");
  m.def(
      "warp_backward(Tensor grad, Tensor image, Tensor? theta, Tensor? ddf, SymInt[] shape, str mode, str padding, "
      "bool image_grad, bool position_grad) -> (Tensor, Tensor)");
  m.def("spline_prefilter(Tensor image, str padding, bool transpose) -> Tensor");
}

TORCH_LIBRARY_IMPL(medfast, CPU, m) {
  m.impl("warp_forward", [](const Tensor& image, const OptTensor& theta, const OptTensor& ddf, at::IntArrayRef shape,
                            c10::string_view mode, c10::string_view padding) {
    return forward(forward_cpu, image, theta, ddf, shape, mode, padding);
  });
  m.impl("warp_backward", [](const Tensor& grad, const Tensor& image, const OptTensor& theta, const OptTensor& ddf,
                             at::IntArrayRef shape, c10::string_view mode, c10::string_view padding, bool image_grad,
                             bool position_grad) {
    return backward(backward_cpu, grad, image, theta, ddf, shape, mode, padding, image_grad, position_grad);
  });
  m.impl("spline_prefilter", [](const Tensor& image, c10::string_view padding, bool transpose) {
    return prefilter(prefilter_cpu, image, padding, transpose);
  });
}

#ifdef MEDFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(medfast, CUDA, m) {
  m.impl("warp_forward", [](const Tensor& image, const OptTensor& theta, const OptTensor& ddf, at::IntArrayRef shape,
                            c10::string_view mode, c10::string_view padding) {
    return forward(forward_cuda, image, theta, ddf, shape, mode, padding);
  });
  m.impl("warp_backward", [](const Tensor& grad, const Tensor& image, const OptTensor& theta, const OptTensor& ddf,
                             at::IntArrayRef shape, c10::string_view mode, c10::string_view padding, bool image_grad,
                             bool position_grad) {
    return backward(backward_cuda, grad, image, theta, ddf, shape, mode, padding, image_grad, position_grad);
  });
  m.impl("spline_prefilter", [](const Tensor& image, c10::string_view padding, bool transpose) {
    return prefilter(prefilter_cuda, image, padding, transpose);
  });
}
#endif

}  // namespace medfast::warp

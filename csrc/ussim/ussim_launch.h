// Host-side entry points of the ultrasound ray-march family, registered by ussim.cpp.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

#include "ussim/ussim.h"

namespace medfast::ussim {

using at::Tensor;

// props (Bv, D, H, W, K) contiguous, coords (B, R, S, 3) contiguous, noise (N, 4) float32 contiguous.
Tensor march_cpu(const Tensor& props, const Tensor& coords, const Tensor& noise, const Params& P);
std::tuple<Tensor, Tensor> march_backward_cpu(const Tensor& grad, const Tensor& props, const Tensor& coords,
                                              const Tensor& noise, const Params& P, bool props_grad,
                                              bool coords_grad);
Tensor march_cuda(const Tensor& props, const Tensor& coords, const Tensor& noise, const Params& P);
std::tuple<Tensor, Tensor> march_backward_cuda(const Tensor& grad, const Tensor& props, const Tensor& coords,
                                               const Tensor& noise, const Params& P, bool props_grad,
                                               bool coords_grad);

}  // namespace medfast::ussim

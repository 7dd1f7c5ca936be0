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
// start (B, L, E, 3), step (B, L, 3), weights (E, S, 3): the elevation-weighted sum of the E sub-rays
// of each scanline, (B, L, 3, S) (see march_line in ussim.h).
Tensor march_lines_cpu(const Tensor& props, const Tensor& start, const Tensor& step, const Tensor& weights,
                       const Tensor& noise, const Params& P);
Tensor march_lines_cuda(const Tensor& props, const Tensor& start, const Tensor& step, const Tensor& weights,
                        const Tensor& noise, const Params& P);
Tensor march_cuda(const Tensor& props, const Tensor& coords, const Tensor& noise, const Params& P);
std::tuple<Tensor, Tensor> march_backward_cuda(const Tensor& grad, const Tensor& props, const Tensor& coords,
                                               const Tensor& noise, const Params& P, bool props_grad,
                                               bool coords_grad);

}  // namespace medfast::ussim

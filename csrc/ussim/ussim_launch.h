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
// Point-spread function (psf_axial_row / psf_lateral_row in ussim.h), h (3, K), w (3, J, S).
// transpose = false: x (B, L, 3, S) -> IQ (B, 2, L, S) (real = channels 0 + 1, imaginary = channel 2);
// transpose = true: the adjoint, g (B, 2, L, S) -> (B, L, 3, S).
Tensor psf_cpu(const Tensor& x, const Tensor& h, const Tensor& w, bool transpose);
Tensor psf_cuda(const Tensor& x, const Tensor& h, const Tensor& w, bool transpose);
Tensor march_cuda(const Tensor& props, const Tensor& coords, const Tensor& noise, const Params& P);
std::tuple<Tensor, Tensor> march_backward_cuda(const Tensor& grad, const Tensor& props, const Tensor& coords,
                                               const Tensor& noise, const Params& P, bool props_grad,
                                               bool coords_grad);

}  // namespace medfast::ussim

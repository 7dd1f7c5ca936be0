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
// The AVX2 float32 line march (ussim_cpu_avx2.cpp): whether it runs (CPU support, not switched off),
// and lines [begin, end) of march_lines_cpu; w (E, S, 3) as given, wT (E, 3, S) channel-major.
bool march_lines_avx2_applies(const Params& P);
void march_lines_avx2(const float* vol, int64_t vol_stride, int64_t Bv, const float* table, const Params& P,
                      const float* st, const float* sp, const float* w, const float* wT, int64_t L, int64_t E,
                      float* o, int64_t begin, int64_t end);
// psf_axial_row (forward) of one float32 row of length S for AVX2 + FMA (ussim_cpu_avx2.cpp); callers
// check cpu_simd_available().
void psf_axial_row_avx2(const float* x, const float* h, int64_t K, int64_t S, float* out);
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

// Host-side entry points of the ultrasound ray-march family, registered by ussim.cpp.
#pragma once
#include <ATen/ATen.h>

#include <climits>
#include <functional>
#include <tuple>
#include <vector>

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
// The CPU backward's property gradient, compacted per ray before it is added into the volume: one
// record per run of consecutive samples of a ray in the same voxel cell (~10 samples per cell), with
// acc[8 c + corner] = the sum over the run of the corner's interpolation weight times dL/d property c
// (sharpened weights for the impedance c = 0). Only cells with a corner inside the volume are kept, so
// their indices fit int32. The records of consecutive rays are added into the volume in ray order
// (march_backward_cpu), so the sums do not depend on the number of threads.
template <typename A>
struct CellRecords {
  std::vector<int32_t> cell;  // 3 per record: i0, j0, k0
  std::vector<A> acc;         // 8 kProps per record, [c][corner]
  int32_t imin = INT32_MAX, imax = INT32_MIN;  // range of the records' i0

  int64_t size() const { return static_cast<int64_t>(cell.size() / 3); }
  // Appends a zeroed record of cell (i0, j0, k0) and returns its acc.
  A* open(int64_t i0, int64_t j0, int64_t k0) {
    add_cell(i0, j0, k0);
    acc.resize(acc.size() + 8 * kProps, A(0));
    return acc.data() + acc.size() - 8 * kProps;
  }
  // Appends the record of cell (i0, j0, k0) with the sums a[8 kProps].
  void append(int64_t i0, int64_t j0, int64_t k0, const A* a) {
    add_cell(i0, j0, k0);
    acc.insert(acc.end(), a, a + 8 * kProps);
  }

 private:
  void add_cell(int64_t i0, int64_t j0, int64_t k0) {
    const int32_t c[3] = {static_cast<int32_t>(i0), static_cast<int32_t>(j0), static_cast<int32_t>(k0)};
    cell.insert(cell.end(), c, c + 3);
    imin = imin < c[0] ? imin : c[0];
    imax = imax > c[0] ? imax : c[0];
  }
};

// Whether voxel cell (i0, j0, k0) has a corner inside the volume (a record of it adds something).
inline bool cell_touches_volume(const Params& P, int64_t i0, int64_t j0, int64_t k0) {
  return i0 >= -1 && j0 >= -1 && k0 >= -1 && i0 < P.D && j0 < P.H && k0 < P.W;
}

// Appends the records of one ray from its sample positions coords (S, 3) and the property gradients
// gv (S, K) of its samples (the same weights as scatter_props: corner_weights_at of ussim.h).
template <typename T, typename A>
void append_cell_records(const Params& P, const T* coords, const A* gv, CellRecords<A>& rec) {
  A* acc = nullptr;
  int64_t cur[3] = {0, 0, 0};
  for (int64_t i = 0; i < P.S; ++i) {
    const A d = static_cast<A>(coords[3 * i]), h = static_cast<A>(coords[3 * i + 1]),
            w = static_cast<A>(coords[3 * i + 2]);
    // (also false for NaN; keeps the int64 casts of corner_weights_at defined)
    if (!(d > A(-2) && d < A(P.D) && h > A(-2) && h < A(P.H) && w > A(-2) && w < A(P.W))) continue;
    int64_t cell[3];
    A wt[8], wz[8];
    corner_weights_at<A>(P, d, h, w, cell, wt, wz);
    if (!cell_touches_volume(P, cell[0], cell[1], cell[2])) continue;
    if (!acc || cell[0] != cur[0] || cell[1] != cur[1] || cell[2] != cur[2]) {
      acc = rec.open(cell[0], cell[1], cell[2]);
      cur[0] = cell[0];
      cur[1] = cell[1];
      cur[2] = cell[2];
    }
    const A* g = gv + i * kProps;
    for (int c = 0; c < kProps; ++c) {
      const A* wc = c < kSharpProps ? wz : wt;
      for (int corner = 0; corner < 8; ++corner) acc[8 * c + corner] += wc[corner] * g[c];
    }
  }
}

// The samples of ray `ray` of a backward: its positions (S, 3) and output gradients (S, 3) (rows of the
// materialised tensors, or computed into scratch that the provider owns).
using RaySamples = std::function<void(int64_t ray, const float** coords, const float** grad)>;

// The AVX2 float32 backward of rays [begin, end) (ussim_cpu_avx2.cpp): appends each ray's property
// gradient records to rec (if not null) and writes its position gradient (S, 3) to gc + ray S 3 (if gc
// is not null), both from one sweep over the ray; rays it cannot take, with huge or non-finite
// coordinates, by the generic march_ray_backward. vol: the volume of these rays. Whether it runs:
// march_backward_avx2_applies.
bool march_backward_avx2_applies(const Params& P);
void march_backward_avx2(const float* vol, const float* table, const Params& P, int64_t begin, int64_t end,
                         const RaySamples& samples, CellRecords<float>* rec, float* gc);
// The backward of march_lines (grad (B, L, 3, S), the sub-ray samples start + i step and echo weights
// of march_lines) without materialising the (B, L E, S, 3) positions and echo gradients: (gprops,
// gcoords (B, L E, S, 3) or empty). Same results as march_backward on the materialised tensors.
std::tuple<Tensor, Tensor> march_lines_backward_cpu(const Tensor& grad, const Tensor& props, const Tensor& start,
                                                    const Tensor& step, const Tensor& weights, const Tensor& noise,
                                                    const Params& P, bool props_grad, bool coords_grad);
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
// The same on CUDA: the warp-cooperative kernels (MEDFAST_USSIM_CUDA_MARCH=warp) compute the positions
// and echo gradients on the fly; the default path materialises them and calls march_backward_cuda.
std::tuple<Tensor, Tensor> march_lines_backward_cuda(const Tensor& grad, const Tensor& props, const Tensor& start,
                                                     const Tensor& step, const Tensor& weights, const Tensor& noise,
                                                     const Params& P, bool props_grad, bool coords_grad);
std::tuple<Tensor, Tensor> march_backward_cuda(const Tensor& grad, const Tensor& props, const Tensor& coords,
                                               const Tensor& noise, const Params& P, bool props_grad,
                                               bool coords_grad);

}  // namespace medfast::ussim

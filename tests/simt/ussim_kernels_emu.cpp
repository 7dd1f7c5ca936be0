// The one-thread-per-ray / line / sample ultrasound kernels (csrc/ussim/ussim_kernels.cuh: ray march
// forward and backward, the atomic scatter of the property gradients, the line march, and the PSF's
// axial, lateral and transposed lateral passes) on the CPU under the launch emulation of simt.h, as a C
// library for tests/test_simt_ussim.py (ctypes): the same kernel source as the CUDA build, launched in
// the launcher's order (ussim_cuda.cu, MEDFAST_USSIM_CUDA_MARCH=thread) with its geometry (kThreads
// per block, blocks from the multiprocessor count given here); checked against the CPU ops.
#include "simt.h"
// (simt.h first: the kernels' CUDA names must exist before the header is parsed)
#include "ussim/ussim_kernels.cuh"
#include "ussim/ussim_warp.cuh"  // scatter_merged_kernel
#include "ussim_params.h"

#include <cstdint>
#include <limits>
#include <vector>

using namespace medfast::ussim;

namespace {


void launch(int64_t work, int64_t sms, const std::function<void()>& kernel) {
  simt::launch({static_cast<unsigned>(blocks_for(work, sms)), 1, 1}, kThreads, 0, kernel);
}

template <typename T>
void march(const T* vol, int64_t Bv, int64_t D, int64_t H, int64_t W, const float* table, int64_t rows, uint64_t seed,
           const double* G, double att, const double* bg, const double* sharp, const T* coords, int64_t B, int64_t R,
           int64_t S, T* out, const int64_t* vidx, int64_t sms) {
  const Params P = emu_params(Bv, D, H, W, S, rows, seed, G, att, bg, sharp, vidx);
  const int64_t rays = B * R;
  launch(rays, sms, [&] { march_kernel<T>(vol, table, P, coords, out, rays, R); });
}

template <typename T>
void lines(const T* vol, int64_t Bv, int64_t D, int64_t H, int64_t W, const float* table, int64_t rows, uint64_t seed,
           const double* G, double att, const double* bg, const double* sharp, const T* start, const T* step,
           const T* w,
           int64_t B, int64_t L, int64_t E, int64_t S, T* out, const int64_t* vidx, int64_t sms) {
  const Params P = emu_params(Bv, D, H, W, S, rows, seed, G, att, bg, sharp, vidx);
  const int64_t n = B * L;
  launch(n, sms, [&] { lines_kernel<T>(vol, table, P, start, step, w, out, n, L, E); });
}

// march_backward_cuda: the backward kernel (per-sample property gradients and coordinate gradients),
// then the scatter kernel into gprops (zeroed by the caller): scatter_kernel, or with merged
// scatter_merged_kernel (MEDFAST_USSIM_CUDA_SCATTER=merged). gprops / gcoords null: not wanted.
template <typename T>
void backward(const T* vol, int64_t Bv, int64_t D, int64_t H, int64_t W, const float* table, int64_t rows,
              uint64_t seed, const double* G, double att, const double* bg, const double* sharp, const T* coords,
              const T* grad, int64_t B, int64_t R, int64_t S, T* gprops, T* gcoords, const int64_t* vidx,
              int64_t sms, int merged) {
  const Params P = emu_params(Bv, D, H, W, S, rows, seed, G, att, bg, sharp, vidx);
  const int64_t rays = B * R;
  std::vector<T> gvals(gprops ? static_cast<size_t>(rays * S * kProps) : 0, std::numeric_limits<T>::quiet_NaN());
  T* gv = gprops ? gvals.data() : nullptr;
  launch(rays, sms, [&] { backward_kernel<T>(vol, table, P, coords, grad, gv, gcoords, rays, R); });
  if (!gprops) return;
  const int64_t samples = rays * S;
  if (merged)
    launch(samples, sms, [&] { scatter_merged_kernel<T>(gprops, P, coords, gv, samples, R * S); });
  else
    launch(samples, sms, [&] { scatter_kernel<T>(gprops, P, coords, gv, samples, R * S); });
}

// psf_cuda: x (B, L, 3, S) to (B, 2, L, S) (axial, then lateral), or with transpose x (B, 2, L, S) to
// (B, L, 3, S) (transposed lateral, then flipped axial); h (3, K), w (3, J, S).
template <typename T>
void psf(const T* x, const T* h, const T* w, int64_t B, int64_t L, int64_t K, int64_t J, int64_t S, bool transpose,
         T* out, int64_t sms) {
  std::vector<T> tmp(static_cast<size_t>(B * L * 3 * S), std::numeric_limits<T>::quiet_NaN());
  T* t = tmp.data();
  const int64_t n3 = B * L * 3 * S, n2 = B * L * S;
  if (!transpose) {
    launch(n3, sms, [&] { psf_axial_kernel<T>(x, h, t, B * L * 3, K, S, false); });
    launch(n2, sms, [&] { psf_lateral_kernel<T>(t, w, out, B, L, J, S); });
  } else {
    launch(n3, sms, [&] { psf_lateral_t_kernel<T>(x, w, t, B, L, J, S); });
    launch(n3, sms, [&] { psf_axial_kernel<T>(t, h, out, B * L * 3, K, S, true); });
  }
}

}  // namespace

#define MEDFAST_EMU_COMMON(T)                                                                                  \
  const T *vol, int64_t Bv, int64_t D, int64_t H, int64_t W, const float *table, int64_t rows, uint64_t seed, \
      const double *G, double att, const double *bg, const double *sharp
#define MEDFAST_EMU_COMMON_ARGS vol, Bv, D, H, W, table, rows, seed, G, att, bg, sharp

extern "C" {
void emu_k_march_f32(MEDFAST_EMU_COMMON(float), const float* coords, int64_t B, int64_t R, int64_t S, float* out,
                     const int64_t* vidx, int64_t sms) {
  march<float>(MEDFAST_EMU_COMMON_ARGS, coords, B, R, S, out, vidx, sms);
}
void emu_k_march_f64(MEDFAST_EMU_COMMON(double), const double* coords, int64_t B, int64_t R, int64_t S, double* out,
                     const int64_t* vidx, int64_t sms) {
  march<double>(MEDFAST_EMU_COMMON_ARGS, coords, B, R, S, out, vidx, sms);
}
void emu_k_lines_f32(MEDFAST_EMU_COMMON(float), const float* start, const float* step, const float* w, int64_t B,
                     int64_t L, int64_t E, int64_t S, float* out, const int64_t* vidx, int64_t sms) {
  lines<float>(MEDFAST_EMU_COMMON_ARGS, start, step, w, B, L, E, S, out, vidx, sms);
}
void emu_k_lines_f64(MEDFAST_EMU_COMMON(double), const double* start, const double* step, const double* w, int64_t B,
                     int64_t L, int64_t E, int64_t S, double* out, const int64_t* vidx, int64_t sms) {
  lines<double>(MEDFAST_EMU_COMMON_ARGS, start, step, w, B, L, E, S, out, vidx, sms);
}
void emu_k_backward_f32(MEDFAST_EMU_COMMON(float), const float* coords, const float* grad, int64_t B, int64_t R,
                        int64_t S, float* gprops, float* gcoords, const int64_t* vidx, int64_t sms, int merged) {
  backward<float>(MEDFAST_EMU_COMMON_ARGS, coords, grad, B, R, S, gprops, gcoords, vidx, sms, merged);
}
void emu_k_backward_f64(MEDFAST_EMU_COMMON(double), const double* coords, const double* grad, int64_t B, int64_t R,
                        int64_t S, double* gprops, double* gcoords, const int64_t* vidx, int64_t sms, int merged) {
  backward<double>(MEDFAST_EMU_COMMON_ARGS, coords, grad, B, R, S, gprops, gcoords, vidx, sms, merged);
}
void emu_k_psf_f32(const float* x, const float* h, const float* w, int64_t B, int64_t L, int64_t K, int64_t J,
                   int64_t S, int transpose, float* out, int64_t sms) {
  psf<float>(x, h, w, B, L, K, J, S, transpose != 0, out, sms);
}
void emu_k_psf_f64(const double* x, const double* h, const double* w, int64_t B, int64_t L, int64_t K, int64_t J,
                   int64_t S, int transpose, double* out, int64_t sms) {
  psf<double>(x, h, w, B, L, K, J, S, transpose != 0, out, sms);
}
int64_t emu_k_blocks(int64_t n, int64_t sms) { return blocks_for(n, sms); }
}

// The warp-cooperative ultrasound kernels (csrc/ussim/ussim_warp.cuh) on the CPU under the warp
// emulation of simt.h, as a C library for tests/test_simt.py (ctypes): the same kernel source as the
// CUDA build, checked against the CPU op here, where no GPU runs.
#include "simt.h"
// (simt.h first: the kernels' CUDA names must exist before the header is parsed)
#include "ussim/ussim_kernels.cuh"  // the plain scatter_kernel and the launch geometry (kThreads, blocks_for)
#include "ussim/ussim_warp.cuh"
#include "ussim_params.h"

#include <cstdint>
#include <vector>

using namespace medfast::ussim;

namespace {


template <typename T>
void lines(const T* vol, int64_t Bv, int64_t D, int64_t H, int64_t W, const float* table, int64_t rows, uint64_t seed,
           const double* G, double att, const double* bg, const double* sharp, const T* start, const T* step,
           const T* w,
           int64_t B, int64_t L, int64_t E, int64_t S, T* out, const int64_t* vidx) {
  const Params P = emu_params(Bv, D, H, W, S, rows, seed, G, att, bg, sharp, vidx);
  simt::run_warp([&] { lines_warp_kernel<T>(vol, table, P, start, step, w, out, B * L, L, E); });
}

// The backward kernel, then the serial scatter of its per-sample property gradients into gprops
// (zeroed by the caller), as the CUDA launcher's scatter kernel does with atomics.
template <typename T>
void backward(const T* vol, int64_t Bv, int64_t D, int64_t H, int64_t W, const float* table, int64_t rows,
              uint64_t seed, const double* G, double att, const double* bg, const double* sharp, const T* coords,
              const T* grad, int64_t B, int64_t R, int64_t S, T* gprops, T* gcoords, const int64_t* vidx) {
  const Params P = emu_params(Bv, D, H, W, S, rows, seed, G, att, bg, sharp, vidx);
  std::vector<T> gvals(gprops ? B * R * S * kProps : 0);
  T* gv = gprops ? gvals.data() : nullptr;
  simt::run_warp([&] { backward_warp_kernel<T>(vol, table, P, coords, grad, gv, gcoords, B * R, R); });
  if (!gprops) return;
  using A = medfast::acc_t<T>;
  const int64_t vol_stride = D * H * W * kProps;
  const auto add = [](T* dst, T v) { *dst += v; };
  for (int64_t k = 0; k < B * R * S; ++k) {
    A g[kProps];
    for (int q = 0; q < kProps; ++q) g[q] = static_cast<A>(gv[k * kProps + q]);
    scatter_props<A>(gprops + frame_volume(P, k / (R * S)) * vol_stride, P, static_cast<A>(coords[3 * k]),
                     static_cast<A>(coords[3 * k + 1]), static_cast<A>(coords[3 * k + 2]), g, add);
  }
}

// The lines backward kernel, then the lines scatter kernel (both under the emulation, atomics real):
// plain (lines_scatter_kernel) or merged (lines_scatter_merged_kernel, MEDFAST_USSIM_CUDA_SCATTER=merged).
template <typename T>
void lines_backward(const T* vol, int64_t Bv, int64_t D, int64_t H, int64_t W, const float* table, int64_t rows,
                    uint64_t seed, const double* G, double att, const double* bg, const double* sharp, const T* start,
                    const T* step, const T* w, const T* grad, int64_t B, int64_t L, int64_t E, int64_t S, T* gprops,
                    T* gcoords, const int64_t* vidx, int merged) {
  const Params P = emu_params(Bv, D, H, W, S, rows, seed, G, att, bg, sharp, vidx);
  std::vector<T> gvals(gprops ? B * L * E * S * kProps : 0);
  T* gv = gprops ? gvals.data() : nullptr;
  simt::run_warp([&] { lines_backward_warp_kernel<T>(vol, table, P, start, step, w, grad, gv, gcoords, B * L * E, L, E); });
  if (!gprops) return;
  if (merged)
    simt::run_warp([&] { lines_scatter_merged_kernel<T>(gprops, P, start, step, gv, B * L * E * S, L, E); });
  else
    simt::run_warp([&] { lines_scatter_kernel<T>(gprops, P, start, step, gv, B * L * E * S, L, E); });
}

// The scatter kernels alone, launched as ussim_cuda.cu does (kThreads per block, blocks_for `sms`
// multiprocessors), on given per-sample property gradients gvals (samples, K), into gprops (zeroed by
// the caller): with start and step, the lines scatter of B x L lines of E sub-rays of S samples (plain
// lines_scatter_kernel or lines_scatter_merged_kernel); else the scatter of explicit positions coords
// (B, R, S, 3) (scatter_kernel or scatter_merged_kernel). Only the geometry of Params matters (sizes,
// sharp, volumes). Returns the number of atomic adds the kernel issued.
template <typename T>
int64_t scatter(T* gprops, int64_t Bv, int64_t D, int64_t H, int64_t W, const double* sharp, const int64_t* vidx,
                const T* start, const T* step, const T* coords, const T* gvals, int64_t B, int64_t L, int64_t E,
                int64_t S, int merged, int64_t sms) {
  const double G[12] = {}, bg[kProps] = {};
  const Params P = emu_params(Bv, D, H, W, S, 1, 0, G, 0.0, bg, sharp, vidx);
  const int64_t samples = B * L * E * S;
  simt::atomic_adds = 0;
  const simt_dim3 grid{static_cast<unsigned>(blocks_for(samples, sms)), 1, 1};
  simt::launch(grid, kThreads, 0, [&] {
    if (start != nullptr && merged)
      lines_scatter_merged_kernel<T>(gprops, P, start, step, gvals, samples, L, E);
    else if (start != nullptr)
      lines_scatter_kernel<T>(gprops, P, start, step, gvals, samples, L, E);
    else if (merged)  // coords (B, L E, S, 3): frames of L E S samples
      scatter_merged_kernel<T>(gprops, P, coords, gvals, samples, L * E * S);
    else
      scatter_kernel<T>(gprops, P, coords, gvals, samples, L * E * S);
  });
  return simt::atomic_adds;
}

}  // namespace

extern "C" {
void emu_lines_backward_f32(const float* vol, int64_t Bv, int64_t D, int64_t H, int64_t W, const float* table,
                            int64_t rows, uint64_t seed, const double* G, double att, const double* bg,
                            const double* sharp,
                            const float* start, const float* step, const float* w, const float* grad, int64_t B,
                            int64_t L, int64_t E, int64_t S, float* gprops, float* gcoords, const int64_t* vidx,
                            int merged) {
  lines_backward<float>(vol, Bv, D, H, W, table, rows, seed, G, att, bg, sharp, start, step, w, grad, B, L, E, S,
                        gprops, gcoords, vidx, merged);
}
void emu_lines_backward_f64(const double* vol, int64_t Bv, int64_t D, int64_t H, int64_t W, const float* table,
                            int64_t rows, uint64_t seed, const double* G, double att, const double* bg,
                            const double* sharp,
                            const double* start, const double* step, const double* w, const double* grad, int64_t B,
                            int64_t L, int64_t E, int64_t S, double* gprops, double* gcoords, const int64_t* vidx,
                            int merged) {
  lines_backward<double>(vol, Bv, D, H, W, table, rows, seed, G, att, bg, sharp, start, step, w, grad, B, L, E, S,
                         gprops, gcoords, vidx, merged);
}
int64_t emu_scatter_f32(float* gprops, int64_t Bv, int64_t D, int64_t H, int64_t W, const double* sharp,
                        const int64_t* vidx,
                        const float* start, const float* step, const float* coords, const float* gvals, int64_t B,
                        int64_t L, int64_t E, int64_t S, int merged, int64_t sms) {
  return scatter<float>(gprops, Bv, D, H, W, sharp, vidx, start, step, coords, gvals, B, L, E, S, merged, sms);
}
int64_t emu_scatter_f64(double* gprops, int64_t Bv, int64_t D, int64_t H, int64_t W, const double* sharp,
                        const int64_t* vidx, const double* start, const double* step, const double* coords,
                        const double* gvals, int64_t B, int64_t L, int64_t E, int64_t S, int merged, int64_t sms) {
  return scatter<double>(gprops, Bv, D, H, W, sharp, vidx, start, step, coords, gvals, B, L, E, S, merged, sms);
}
void emu_lines_f32(const float* vol, int64_t Bv, int64_t D, int64_t H, int64_t W, const float* table, int64_t rows,
                   uint64_t seed, const double* G, double att, const double* bg, const double* sharp,
                   const float* start,
                   const float* step, const float* w, int64_t B, int64_t L, int64_t E, int64_t S, float* out, const int64_t* vidx) {
  lines<float>(vol, Bv, D, H, W, table, rows, seed, G, att, bg, sharp, start, step, w, B, L, E, S, out, vidx);
}
void emu_lines_f64(const double* vol, int64_t Bv, int64_t D, int64_t H, int64_t W, const float* table, int64_t rows,
                   uint64_t seed, const double* G, double att, const double* bg, const double* sharp,
                   const double* start,
                   const double* step, const double* w, int64_t B, int64_t L, int64_t E, int64_t S, double* out, const int64_t* vidx) {
  lines<double>(vol, Bv, D, H, W, table, rows, seed, G, att, bg, sharp, start, step, w, B, L, E, S, out, vidx);
}
void emu_backward_f32(const float* vol, int64_t Bv, int64_t D, int64_t H, int64_t W, const float* table, int64_t rows,
                      uint64_t seed, const double* G, double att, const double* bg, const double* sharp,
                      const float* coords,
                      const float* grad, int64_t B, int64_t R, int64_t S, float* gprops, float* gcoords, const int64_t* vidx) {
  backward<float>(vol, Bv, D, H, W, table, rows, seed, G, att, bg, sharp, coords, grad, B, R, S, gprops, gcoords, vidx);
}
void emu_backward_f64(const double* vol, int64_t Bv, int64_t D, int64_t H, int64_t W, const float* table,
                      int64_t rows, uint64_t seed, const double* G, double att, const double* bg, const double* sharp,
                      const double* coords, const double* grad, int64_t B, int64_t R, int64_t S, double* gprops,
                      double* gcoords, const int64_t* vidx) {
  backward<double>(vol, Bv, D, H, W, table, rows, seed, G, att, bg, sharp, coords, grad, B, R, S, gprops, gcoords,
  vidx);
}
}

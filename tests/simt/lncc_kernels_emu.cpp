// The CUDA kernels of the LNCC family (csrc/lncc/lncc_kernels.cuh: the products, the box sums along
// each axis, the ncc, and the backward's adjoint and combine) on the CPU under the launch emulation of
// simt.h, as a C library for tests/test_simt_lncc.py (ctypes): the same kernel source as the CUDA build,
// launched in the launcher's order (lncc_cuda.cu, including its ping-pong of the box passes) with its
// geometry (kThreads per block, blocks from the multiprocessor count given here); checked against the
// CPU ops.
#include "simt.h"
// (simt.h first: the kernels' CUDA names must exist before the header is parsed)
#include "lncc/lncc_kernels.cuh"

#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

using namespace medfast::lncc;

namespace {

// Geometry of a (B, C, *S) pair as lncc_launch.h's Geometry: 2D padded to 3D (a leading spatial axis of
// size 1, radius 0).
struct Shape {
  int64_t bc = 1, n[3] = {1, 1, 1}, r[3] = {0, 0, 0}, volume = 1;
  double window = 1;
  Shape(int64_t B, int64_t C, int nd, const int64_t* size, const int64_t* ks) {
    bc = B * C;
    for (int a = 0; a < nd; ++a) {
      n[3 - nd + a] = size[a];
      r[3 - nd + a] = (ks[a] - 1) / 2;
      window *= static_cast<double>(ks[a]);
    }
    volume = n[0] * n[1] * n[2];
  }
  int64_t total() const { return bc * volume; }
  int64_t inner(int a) const {
    int64_t s = 1;
    for (int i = a + 1; i < 3; ++i) s *= n[i];
    return s;
  }
};

void launch(int64_t work, int64_t sms, const std::function<void()>& kernel) {
  simt::launch({static_cast<unsigned>(blocks_for(work, sms)), 1, 1}, kThreads, 0, kernel);
}

// lncc_cuda.cu box_all: the fields in a box-summed along every axis of nonzero radius, ping-pong with b.
template <typename T>
T* box_all(const Shape& g, T* a, T* b, int64_t sms) {
  const int64_t total = kFields * g.total();
  for (int ax = 0; ax < 3; ++ax) {
    if (g.r[ax] == 0) continue;
    launch(total, sms, [&] { box_kernel<T>(a, b, g.n[ax], g.inner(ax), g.r[ax], total); });
    std::swap(a, b);
  }
  return a;
}

// Forward: out (B, C, *S) and sums (kFields, B, C, *S).
template <typename T>
void forward(const T* pred, const T* target, int64_t B, int64_t C, int nd, const int64_t* size, const int64_t* ks,
             double nr, double dr, int64_t sms, T* out, T* sums) {
  const Shape g(B, C, nd, size, ks);
  const int64_t M = g.total();
  std::vector<T> scratch(static_cast<size_t>(kFields * M), std::numeric_limits<T>::quiet_NaN());
  T* a = sums;
  launch(M, sms, [&] { products_kernel<T>(target, pred, a, M); });
  T* s = box_all<T>(g, a, scratch.data(), sms);
  if (s != a) std::memcpy(a, s, sizeof(T) * kFields * M);  // the launcher's device-to-device copy
  const T N = static_cast<T>(g.window), tnr = static_cast<T>(nr), tdr = static_cast<T>(dr);
  launch(M, sms, [&] { ncc_kernel<T>(a, out, M, N, tnr, tdr); });
}

// Backward: grad_pred and grad_target (B, C, *S) from grad (B, C, *S) and the forward's sums.
template <typename T>
void backward(const T* grad, const T* pred, const T* target, const T* sums, int64_t B, int64_t C, int nd,
              const int64_t* size, const int64_t* ks, double nr, double dr, int64_t sms, T* grad_pred,
              T* grad_target) {
  const Shape g(B, C, nd, size, ks);
  const int64_t M = g.total();
  std::vector<T> bufs(static_cast<size_t>(2 * kFields * M), std::numeric_limits<T>::quiet_NaN());
  T* a = bufs.data();
  T* b = a + kFields * M;
  const T N = static_cast<T>(g.window), tnr = static_cast<T>(nr), tdr = static_cast<T>(dr);
  launch(M, sms, [&] { adjoint_kernel<T>(sums, a, grad, M, N, tnr, tdr); });
  T* adj = box_all<T>(g, a, b, sms);
  launch(M, sms, [&] { combine_kernel<T>(adj, target, pred, grad_target, grad_pred, M); });
}

}  // namespace

extern "C" {
void emu_lncc_f32(const float* pred, const float* target, int64_t B, int64_t C, int nd, const int64_t* size,
                  const int64_t* ks, double nr, double dr, int64_t sms, float* out, float* sums) {
  forward<float>(pred, target, B, C, nd, size, ks, nr, dr, sms, out, sums);
}
void emu_lncc_f64(const double* pred, const double* target, int64_t B, int64_t C, int nd, const int64_t* size,
                  const int64_t* ks, double nr, double dr, int64_t sms, double* out, double* sums) {
  forward<double>(pred, target, B, C, nd, size, ks, nr, dr, sms, out, sums);
}
void emu_lncc_backward_f32(const float* grad, const float* pred, const float* target, const float* sums, int64_t B,
                           int64_t C, int nd, const int64_t* size, const int64_t* ks, double nr, double dr,
                           int64_t sms, float* grad_pred, float* grad_target) {
  backward<float>(grad, pred, target, sums, B, C, nd, size, ks, nr, dr, sms, grad_pred, grad_target);
}
void emu_lncc_backward_f64(const double* grad, const double* pred, const double* target, const double* sums,
                           int64_t B, int64_t C, int nd, const int64_t* size, const int64_t* ks, double nr,
                           double dr, int64_t sms, double* grad_pred, double* grad_target) {
  backward<double>(grad, pred, target, sums, B, C, nd, size, ks, nr, dr, sms, grad_pred, grad_target);
}
int64_t emu_lncc_blocks(int64_t n, int64_t sms) { return blocks_for(n, sms); }
}

// Cubic B-spline prefilter: the coefficients c of the interpolating spline of f along one axis
// solve the tridiagonal system B c = f, where the interior rows are (1, 4, 1) / 6 and the first
// and last rows carry the boundary condition (see axis_taps_cubic in warp.h for the extensions):
//   reflection: (4, 2) / 6        zeros: (4 + z, 1) / 6        border: (4 + z, 1) / (5 + z)
// The system is solved by the Thomas algorithm with factors precomputed once per axis length;
// the adjoint (for the gradient) solves B^T g = h with the same routine.
#pragma once
#include "common/macros.h"
#include "warp/warp.h"

namespace medfast::warp {

// Row k of the system B (before any transposition): sub-diagonal, diagonal, super-diagonal.
MEDFAST_HOST_DEVICE void spline_row(int64_t n, int padding, int64_t k, double& sub, double& diag, double& sup) {
  const double z = kPole;
  sub = k == 0 ? 0.0 : 1.0 / 6;
  sup = k == n - 1 ? 0.0 : 1.0 / 6;
  diag = 4.0 / 6;
  const bool end = k == 0 || k == n - 1;
  if (n == 1) {
    diag = padding == kZeros ? (4.0 + 2.0 * z) / 6.0 : 1.0;
  } else if (padding == kReflection) {
    if (k == 0) sup = 2.0 / 6;
    if (k == n - 1) sub = 2.0 / 6;
  } else if (padding == kZeros) {
    if (end) diag = (4.0 + z) / 6;
  } else if (end) {  // border
    diag = (4.0 + z) / (5.0 + z);
    if (k == 0) sup = 1.0 / (5.0 + z);
    if (k == n - 1) sub = 1.0 / (5.0 + z);
  }
}

// Thomas factors of B (or B^T) of order n, 3n values: sub[n], inv_pivot[n], upper'[n], computed in
// double. A host/device function: the CUDA launcher computes them on the device in a one-thread kernel
// (no host-to-device copy, which would synchronize the stream and break CUDA-graph capture).
template <typename T>
MEDFAST_HOST_DEVICE void spline_factors_into(T* out, int64_t n, int padding, bool transpose) {
  double prev_up = 0.0;
  for (int64_t k = 0; k < n; ++k) {
    double sub, diag, sup;
    spline_row(n, padding, k, sub, diag, sup);
    if (transpose) {  // (B^T) sub[k] = B sup[k-1], (B^T) sup[k] = B sub[k+1]
      double lo, mid, hi;
      sub = sup = 0.0;
      if (k >= 1) spline_row(n, padding, k - 1, lo, mid, hi), sub = hi;
      if (k + 1 < n) spline_row(n, padding, k + 1, lo, mid, hi), sup = lo;
    }
    const double inv = 1.0 / (diag - sub * prev_up);
    prev_up = sup * inv;
    out[k] = T(sub);
    out[n + k] = T(inv);
    out[2 * n + k] = T(prev_up);
  }
}

// Solves `lines` adjacent lines in place: line j holds p[j + k * stride], k < n. Lines are
// adjacent (unit stride) so that the CPU launcher's inner loop vectorizes; a CUDA thread takes one.
template <typename T>
MEDFAST_HOST_DEVICE void spline_solve_lines(T* p, int64_t n, int64_t stride, int64_t lines, const T* factors) {
  const T* sub = factors;
  const T* inv = factors + n;
  const T* up = factors + 2 * n;
  for (int64_t j = 0; j < lines; ++j) p[j] *= inv[0];
  for (int64_t k = 1; k < n; ++k) {
    T* row = p + k * stride;
    const T* prev = row - stride;
    for (int64_t j = 0; j < lines; ++j) row[j] = (row[j] - sub[k] * prev[j]) * inv[k];
  }
  for (int64_t k = n - 2; k >= 0; --k) {
    T* row = p + k * stride;
    const T* next = row + stride;
    for (int64_t j = 0; j < lines; ++j) row[j] -= up[k] * next[j];
  }
}

}  // namespace medfast::warp

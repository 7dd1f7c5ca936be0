// Cubic B-spline prefilter: the coefficients c of the interpolating spline of f along one axis
// solve the tridiagonal system B c = f, where the interior rows are (1, 4, 1) / 6 and the first
// and last rows carry the boundary condition (see axis_taps_cubic in warp.h for the extensions):
//   reflection: (4, 2) / 6        zeros: (4 + z, 1) / 6        border: (4 + z, 1) / (5 + z)
// The system is solved by the Thomas algorithm with factors precomputed once per axis length;
// the adjoint (for the gradient) solves B^T g = h with the same routine.
#pragma once
#include <vector>

#include "common/macros.h"
#include "warp/warp.h"

namespace medfast::warp {

// Thomas factors of a tridiagonal matrix of order n, 3n values: sub[n], inv_pivot[n], upper'[n].
inline std::vector<double> spline_factors(int64_t n, int padding, bool transpose) {
  const double z = kPole;
  std::vector<double> sub(n, 1.0 / 6), diag(n, 4.0 / 6), sup(n, 1.0 / 6);
  sub[0] = 0.0;
  sup[n - 1] = 0.0;
  if (n == 1) {
    diag[0] = padding == kZeros ? (4.0 + 2.0 * z) / 6.0 : 1.0;
  } else if (padding == kReflection) {
    sup[0] = 2.0 / 6;
    sub[n - 1] = 2.0 / 6;
  } else if (padding == kZeros) {
    diag[0] = diag[n - 1] = (4.0 + z) / 6;
  } else {  // border
    diag[0] = diag[n - 1] = (4.0 + z) / (5.0 + z);
    sup[0] = sub[n - 1] = 1.0 / (5.0 + z);
  }
  if (transpose) {  // (B^T) sub[k] = B sup[k-1], (B^T) sup[k] = B sub[k+1]
    std::vector<double> tsub(n, 0.0), tsup(n, 0.0);
    for (int64_t k = 1; k < n; ++k) tsub[k] = sup[k - 1];
    for (int64_t k = 0; k + 1 < n; ++k) tsup[k] = sub[k + 1];
    sub.swap(tsub);
    sup.swap(tsup);
  }
  std::vector<double> out(3 * n);
  double prev_up = 0.0;
  for (int64_t k = 0; k < n; ++k) {
    const double inv = 1.0 / (diag[k] - sub[k] * prev_up);
    prev_up = sup[k] * inv;
    out[k] = sub[k];
    out[n + k] = inv;
    out[2 * n + k] = prev_up;
  }
  return out;
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

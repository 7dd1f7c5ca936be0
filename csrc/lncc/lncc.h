// Local normalized cross-correlation (box window): the arithmetic of one voxel, shared by the CPU
// and CUDA launchers.
//
// With a box window W(x) of k_0 x ... voxels centred on x (zero outside the image, as MONAI's
// zero-padded 'same' convolution) and N = prod k_i (constant, also at the border), five local sums
//   T = sum_W t, P = sum_W p, T2 = sum_W t^2, P2 = sum_W p^2, TP = sum_W t p
// give, per voxel,
//   cross = TP - (P / N) T,  tv = max(T2 - (T / N) T, dr),  pv = max(P2 - (P / N) P, dr),
//   ncc = (cross^2 + nr) / (tv pv),
// MONAI's LocalNormalizedCrossCorrelationLoss (rectangular kernel) before its reduction and sign.
//
// Backward. With g = dL/dncc per voxel, the adjoints of the five sums are (per voxel)
//   a_TP = 2 g cross / (tv pv),  a_T2 = -g ncc / tv [tv unclamped],  a_P2 = -g ncc / pv [pv unclamped],
//   a_T = -a_TP P / N - 2 a_T2 T / N,  a_P = -a_TP T / N - 2 a_P2 P / N,
// and, the zero-padded centred box being self-adjoint, with B[.] the same box sum:
//   dL/dt = B[a_T] + 2 t B[a_T2] + p B[a_TP],  dL/dp = B[a_P] + 2 p B[a_P2] + t B[a_TP].
// (At tv == dr exactly, the gradient is split half/half as torch.maximum does.)
#pragma once
#include <cstdint>

#include "common/macros.h"

namespace medfast::lncc {

// Field order of the five sums (and of their adjoints) in the launchers' buffers.
enum Field : int { kT = 0, kP = 1, kT2 = 2, kP2 = 3, kTP = 4, kFields = 5 };

// The five products of one voxel: t, p, t^2, p^2, t p.
template <typename T>
MEDFAST_HOST_DEVICE void products(T t, T p, T* f) {
  f[kT] = t;
  f[kP] = p;
  f[kT2] = t * t;
  f[kP2] = p * p;
  f[kTP] = t * p;
}

// Box sum along one axis at position i of a line of n values with stride `stride` (zero outside):
// the direct form used by the CUDA launcher (the CPU launcher keeps a running sum instead).
template <typename T>
MEDFAST_HOST_DEVICE T box_taps(const T* line, int64_t i, int64_t n, int64_t stride, int64_t r) {
  const int64_t lo = i - r < 0 ? 0 : i - r;
  const int64_t hi = i + r >= n ? n - 1 : i + r;
  T acc = T(0);
  for (int64_t j = lo; j <= hi; ++j) acc += line[j * stride];
  return acc;
}

// ncc of one voxel from its five local sums s[kFields]; N = window volume.
template <typename T>
MEDFAST_HOST_DEVICE T ncc_voxel(const T* s, T N, T nr, T dr) {
  const T tavg = s[kT] / N, pavg = s[kP] / N;
  const T cross = s[kTP] - pavg * s[kT];
  T tv = s[kT2] - tavg * s[kT];
  T pv = s[kP2] - pavg * s[kP];
  tv = tv > dr ? tv : dr;
  pv = pv > dr ? pv : dr;
  // cross^2 <= tv pv exactly (Cauchy-Schwarz); in float32 near-constant windows round past it (ncc 9 and a
  // loss below -1, which an optimizer exploits): clamp to the bound
  // (c2 > bound, not c2 < bound: a NaN from a NaN / inf input stays NaN, as the adjoint's test reads it)
  const T c2 = cross * cross, bound = tv * pv;
  return ((c2 > bound ? bound : c2) + nr) / bound;
}

// Overwrites the five sums s[kFields] of one voxel by their adjoints, for g = dL/dncc there.
template <typename T>
MEDFAST_HOST_DEVICE void adjoint_voxel(T* s, T g, T N, T nr, T dr) {
  const T tavg = s[kT] / N, pavg = s[kP] / N;
  const T cross = s[kTP] - pavg * s[kT];
  const T tv0 = s[kT2] - tavg * s[kT];
  const T pv0 = s[kP2] - pavg * s[kP];
  const T tv = tv0 > dr ? tv0 : dr, pv = pv0 > dr ? pv0 : dr;
  const T wt = tv0 > dr ? T(1) : (tv0 == dr ? T(0.5) : T(0));
  const T wp = pv0 > dr ? T(1) : (pv0 == dr ? T(0.5) : T(0));
  const T inv = T(1) / (tv * pv);  // one division: 1 / tv = pv inv, 1 / pv = tv inv
  // clamped (ncc_voxel): ncc = 1 + nr / (tv pv), no cross term, and only nr left in the variance terms
  const bool clamped = cross * cross > tv * pv;
  const T gncc = g * (clamped ? nr : cross * cross + nr) * inv;
  const T a_tp = clamped ? T(0) : T(2) * g * cross * inv;
  const T a_t2 = -gncc * pv * inv * wt;
  const T a_p2 = -gncc * tv * inv * wp;
  s[kT] = -a_tp * pavg - T(2) * a_t2 * tavg;
  s[kP] = -a_tp * tavg - T(2) * a_p2 * pavg;
  s[kT2] = a_t2;
  s[kP2] = a_p2;
  s[kTP] = a_tp;
}

// Input gradients of one voxel from the box-summed adjoints b[kFields].
template <typename T>
MEDFAST_HOST_DEVICE void combine_voxel(const T* b, T t, T p, T& gt, T& gp) {
  gt = b[kT] + T(2) * t * b[kT2] + p * b[kTP];
  gp = b[kP] + T(2) * p * b[kP2] + t * b[kTP];
}

}  // namespace medfast::lncc

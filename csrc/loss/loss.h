// Fused segmentation losses: the arithmetic of one voxel, shared by the CPU and CUDA launchers.
//
// The losses (Dice, cross-entropy, Dice+CE) need only per-(batch, class) sums over the voxels:
//   I[b,c] = sum_x w p_c [y = c],  P[b,c] = sum_x w p_c,  G[b,c] = sum_x w [y = c],
//   E[b,c] = sum_x w [y = c] (-log p_c),
// with p = softmax(logits) over the classes, y the label, w the voxel weight (the voxel is skipped
// where y is the ignore index). Everything else, class weights included, is O(B x C) tensor
// arithmetic in Python, where autograd sees it. The backward reads the logits once more: with
// u_c = dL/dI[b,c] [y = c] + dL/dP[b,c] and e = dL/dE[b,y],
//   d L / d z_k = w (p_k (u_k - sum_c u_c p_c) + e (p_k - [k = y])).
// No one-hot, softmax or log-softmax tensor of the logits' size is ever formed.
#pragma once
#include <cmath>
#include <cstring>

#include "common/macros.h"

namespace medfast::loss {

// Sums per (batch, class): I, P, G, E.
constexpr int kStats = 4;

// exp(x) for x <= 0 in float without a library call, branch-free so that loops over voxels
// vectorize (Cody-Waite range reduction and a degree-6 polynomial, about 2 ulp); double uses exp.
MEDFAST_HOST_DEVICE float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;  // exp(-87) ~ 1.6e-38: below it the result is 0 for our purposes
  // Nearest integer to x / ln 2 by truncation (x <= 0): no floor call, so SSE2 vectorizes it.
  const int32_t ni = static_cast<int32_t>(x * 1.44269504088896341f - 0.5f);
  const float n = static_cast<float>(ni);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (ni + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
MEDFAST_HOST_DEVICE double exp_nonpositive(double x) { return exp(x); }

// The voxels of one block: nv adjacent voxels (z[c * cs + v]) of one batch element. Scratch:
// e[c * nv + v] = exp(z - mx[v]), mx[v], den[v] = sum_c e. The same code serves the CPU launcher
// (blocks of voxels, inner loops over v vectorize) and the CUDA launcher (nv = 1 per thread).
template <typename S, typename T>
MEDFAST_HOST_DEVICE void softmax_block(const S* z, int64_t C, int64_t cs, int nv, T* e, T* mx, T* den) {
  for (int v = 0; v < nv; ++v) mx[v] = static_cast<T>(z[v]);
  for (int64_t c = 1; c < C; ++c)
    for (int v = 0; v < nv; ++v) {
      const T val = static_cast<T>(z[c * cs + v]);
      mx[v] = val > mx[v] ? val : mx[v];
    }
  for (int v = 0; v < nv; ++v) den[v] = T(0);
  for (int64_t c = 0; c < C; ++c)
    for (int v = 0; v < nv; ++v) {
      const T ev = exp_nonpositive(static_cast<T>(z[c * cs + v]) - mx[v]);
      e[c * nv + v] = ev;
      den[v] += ev;
    }
}

// Adds a block of voxels to the sums cls[c * kStats + k] (accumulated in A). label[v] outside
// [0, C) (the ignore index) or weight 0 leaves voxel v out. w: voxel weights or nullptr.
template <typename S, typename T, typename A>
MEDFAST_HOST_DEVICE void stats_block(const S* z, int64_t C, int64_t cs, const int64_t* label, const A* w, int nv,
                                     A* cls, T* e, T* mx, T* den) {
  softmax_block(z, C, cs, nv, e, mx, den);
  for (int v = 0; v < nv; ++v) {  // den becomes w / den: the weight of p = e / den
    const bool keep = label[v] >= 0 && label[v] < C;
    den[v] = keep ? static_cast<T>(w ? w[v] : A(1)) / den[v] : T(0);
  }
  for (int64_t c = 0; c < C; ++c) {
    T acc = T(0);
    for (int v = 0; v < nv; ++v) acc += e[c * nv + v] * den[v];
    cls[c * kStats + 1] += acc;
  }
  for (int v = 0; v < nv; ++v) {
    const int64_t y = label[v];
    if (y < 0 || y >= C || den[v] == T(0)) continue;
    const A wv = w ? w[v] : A(1);
    A* own = cls + y * kStats;
    own[0] += e[y * nv + v] * den[v];
    own[2] += wv;
    // -log p_y = log(sum e) + mx - z_y, with sum e = w / den
    own[3] += wv * (log(A(wv) / A(den[v])) + A(mx[v]) - A(static_cast<T>(z[y * cs + v])));
  }
}

// Gradient of a block of voxels' logits (gz[c * cs + v], same layout as z) from the gradients of
// their batch's sums, gcls[c * kStats + k]:
//   d L / d z_k = w (p_k (u_k - sum_c u_c p_c) + e_y (p_k - [k = y])),
//   u_c = dL/dI[c] [y = c] + dL/dP[c],  e_y = dL/dE[y].
// Scratch as softmax_block, plus aux (2 nv): the voxel weight and e_y.
template <typename S, typename T, typename A>
MEDFAST_HOST_DEVICE void stats_backward_block(const S* z, int64_t C, int64_t cs, const int64_t* label, const A* w,
                                              int nv, const A* gcls, S* gz, T* e, T* mx, T* den, T* aux) {
  softmax_block(z, C, cs, nv, e, mx, den);
  T* ubar = mx;  // the max is not needed any more
  T* wv = aux;
  T* ey = aux + nv;
  for (int v = 0; v < nv; ++v) {
    const int64_t y = label[v];
    const bool keep = y >= 0 && y < C;
    den[v] = T(1) / den[v];
    wv[v] = keep ? static_cast<T>(w ? w[v] : A(1)) : T(0);
    ey[v] = keep ? static_cast<T>(gcls[y * kStats + 3]) : T(0);
    ubar[v] = keep ? static_cast<T>(gcls[y * kStats + 0]) * e[y * nv + v] * den[v] : T(0);
  }
  for (int64_t c = 0; c < C; ++c) {
    const T gp = static_cast<T>(gcls[c * kStats + 1]);
    for (int v = 0; v < nv; ++v) ubar[v] += gp * e[c * nv + v] * den[v];
  }
  for (int64_t c = 0; c < C; ++c) {
    const T gi = static_cast<T>(gcls[c * kStats + 0]), gp = static_cast<T>(gcls[c * kStats + 1]);
    for (int v = 0; v < nv; ++v) {
      const bool own = label[v] == c;
      const T p = e[c * nv + v] * den[v];
      const T u = own ? gp + gi : gp;
      gz[c * cs + v] = static_cast<S>(wv[v] * (p * (u - ubar[v]) + ey[v] * (p - (own ? T(1) : T(0)))));
    }
  }
}

}  // namespace medfast::loss

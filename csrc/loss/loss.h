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

#include "common/macros.h"

namespace medfast::loss {

// Sums per (batch, class): I, P, G, E.
constexpr int kStats = 4;

// Max and sum of exp over the C logits of one voxel (z[c * cs]).
template <typename S, typename T>
MEDFAST_HOST_DEVICE void softmax_norm(const S* z, int64_t C, int64_t cs, T& mx, T& denom) {
  mx = static_cast<T>(z[0]);
  for (int64_t c = 1; c < C; ++c) {
    const T v = static_cast<T>(z[c * cs]);
    mx = v > mx ? v : mx;
  }
  denom = T(0);
  for (int64_t c = 0; c < C; ++c) denom += exp(static_cast<T>(z[c * cs]) - mx);
}

// Adds one voxel to the sums cls[c * kStats + k]. A label outside [0, C) (the ignore index) skips it.
template <typename S, typename T>
MEDFAST_HOST_DEVICE void stats_voxel(const S* z, int64_t C, int64_t cs, int64_t label, T w, T* cls) {
  if (label < 0 || label >= C || w == T(0)) return;
  T mx, denom;
  softmax_norm(z, C, cs, mx, denom);
  const T inv = T(1) / denom;
  for (int64_t c = 0; c < C; ++c) {
    const T p = exp(static_cast<T>(z[c * cs]) - mx) * inv;
    cls[c * kStats + 1] += w * p;
  }
  T* own = cls + label * kStats;
  own[0] += w * exp(static_cast<T>(z[label * cs]) - mx) * inv;
  own[2] += w;
  own[3] += w * (log(denom) + mx - static_cast<T>(z[label * cs]));  // -log p_y
}

// Gradient of one voxel's logits (gz[c * gs]) from the gradients of its batch's sums,
// gcls[c * kStats + k].
template <typename S, typename T>
MEDFAST_HOST_DEVICE void stats_backward_voxel(const S* z, int64_t C, int64_t cs, int64_t label, T w, const T* gcls,
                                              S* gz, int64_t gs) {
  if (label < 0 || label >= C || w == T(0)) {
    for (int64_t c = 0; c < C; ++c) gz[c * gs] = static_cast<S>(0);
    return;
  }
  T mx, denom;
  softmax_norm(z, C, cs, mx, denom);
  const T inv = T(1) / denom;
  T ubar = T(0);  // sum_c u_c p_c
  for (int64_t c = 0; c < C; ++c) {
    const T p = exp(static_cast<T>(z[c * cs]) - mx) * inv;
    const T u = gcls[c * kStats + 1] + (c == label ? gcls[c * kStats + 0] : T(0));
    ubar += u * p;
  }
  const T e = gcls[label * kStats + 3];
  for (int64_t c = 0; c < C; ++c) {
    const T p = exp(static_cast<T>(z[c * cs]) - mx) * inv;
    const T u = gcls[c * kStats + 1] + (c == label ? gcls[c * kStats + 0] : T(0));
    gz[c * gs] = static_cast<S>(w * (p * (u - ubar) + e * (p - (c == label ? T(1) : T(0)))));
  }
}

}  // namespace medfast::loss

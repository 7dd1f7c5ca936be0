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

// e[c] = exp(z[c * cs] - mx) for the C logits of one voxel, mx their max; returns the sum of e.
// The caller's scratch e (C entries) makes one exp per class and voxel enough.
template <typename S, typename T>
MEDFAST_HOST_DEVICE T softmax_exp(const S* z, int64_t C, int64_t cs, T* e, T& mx) {
  mx = static_cast<T>(z[0]);
  for (int64_t c = 1; c < C; ++c) {
    const T v = static_cast<T>(z[c * cs]);
    mx = v > mx ? v : mx;
  }
  T denom = T(0);
  for (int64_t c = 0; c < C; ++c) {
    e[c] = exp(static_cast<T>(z[c * cs]) - mx);
    denom += e[c];
  }
  return denom;
}

// Adds one voxel to the sums cls[c * kStats + k]. A label outside [0, C) (the ignore index) skips
// it. e: scratch of C entries.
template <typename S, typename T>
MEDFAST_HOST_DEVICE void stats_voxel(const S* z, int64_t C, int64_t cs, int64_t label, T w, T* cls, T* e) {
  if (label < 0 || label >= C || w == T(0)) return;
  T mx;
  const T denom = softmax_exp(z, C, cs, e, mx);
  const T scale = w / denom;
  for (int64_t c = 0; c < C; ++c) cls[c * kStats + 1] += scale * e[c];
  T* own = cls + label * kStats;
  own[0] += scale * e[label];
  own[2] += w;
  own[3] += w * (log(denom) + mx - static_cast<T>(z[label * cs]));  // -log p_y, no underflow
}

// Gradient of one voxel's logits (gz[c * gs]) from the gradients of its batch's sums,
// gcls[c * kStats + k]. e: scratch of C entries.
template <typename S, typename T>
MEDFAST_HOST_DEVICE void stats_backward_voxel(const S* z, int64_t C, int64_t cs, int64_t label, T w, const T* gcls,
                                              S* gz, int64_t gs, T* e) {
  if (label < 0 || label >= C || w == T(0)) {
    for (int64_t c = 0; c < C; ++c) gz[c * gs] = static_cast<S>(0);
    return;
  }
  T mx;
  const T inv = T(1) / softmax_exp(z, C, cs, e, mx);
  T ubar = gcls[label * kStats + 0] * e[label];  // sum_c u_c p_c, scaled by denom
  for (int64_t c = 0; c < C; ++c) ubar += gcls[c * kStats + 1] * e[c];
  ubar *= inv;
  const T ce = gcls[label * kStats + 3];
  for (int64_t c = 0; c < C; ++c) {
    const T p = e[c] * inv;
    const T u = gcls[c * kStats + 1] + (c == label ? gcls[c * kStats + 0] : T(0));
    gz[c * gs] = static_cast<S>(w * (p * (u - ubar) + ce * (p - (c == label ? T(1) : T(0)))));
  }
}

}  // namespace medfast::loss

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
#include <type_traits>
#include <utility>

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

// Per-voxel scratch and per-class sums are reached through `operator[]` only, so the same code runs
// on plain pointers (CPU: scratch rows of kBlock voxels, sums in a private buffer) and on strided
// views (CUDA: one voxel per thread, scratch and sums interleaved across the threads of a block in
// shared memory, so neighbouring threads touch neighbouring banks).
template <typename T>
struct Strided {
  T* p;
  int64_t s;
  MEDFAST_HOST_DEVICE T& operator[](int64_t i) const { return p[i * s]; }
  MEDFAST_HOST_DEVICE Strided operator+(int64_t k) const { return {p + k * s, s}; }
};

template <typename P>
using elem_t = std::remove_cv_t<std::remove_reference_t<decltype(std::declval<P&>()[0])>>;

// The voxels of one block: nv adjacent voxels (z[c * cs + v]) of one batch element. Scratch:
// e[c * nv + v] = exp(z - mx[v]), mx[v], den[v] = sum_c e. The same code serves the CPU launcher
// (blocks of voxels, inner loops over v vectorize) and the CUDA launcher (nv = 1 per thread).
template <typename S, typename E>
MEDFAST_HOST_DEVICE void softmax_block(const S* z, int64_t C, int64_t cs, int nv, E e, E mx, E den) {
  using T = elem_t<E>;
  if (nv == 1) {
    // One voxel (the CUDA kernels: a thread per voxel, scratch in shared memory). The logits are read
    // once, into the scratch, with several independent loads in flight (the loop below otherwise
    // waits out one global load per class, twice), and the max and the sum stay in registers. Same
    // operations in the same order as the general path: bitwise the same results.
    T m = static_cast<T>(z[0]);
    e[0] = m;
    MEDFAST_UNROLL4
    for (int64_t c = 1; c < C; ++c) {
      const T val = static_cast<T>(z[c * cs]);
      e[c] = val;
      m = val > m ? val : m;
    }
    T d = T(0);
    for (int64_t c = 0; c < C; ++c) {
      const T ev = exp_nonpositive(e[c] - m);
      e[c] = ev;
      d += ev;
    }
    mx[0] = m;
    den[0] = d;
    return;
  }
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

// A voxel's cross-entropy term w (-log p_y) = w (log(w / wd) + (max - z_y)), with wd = w / sum exp(z - max).
// max - z_y first: it is small or exact, where log(...) + max would lose the log next to a large max
// (equal logits of 1e30 gave 0 instead of log C).
template <typename A, typename T>
MEDFAST_HOST_DEVICE A ce_term(A wv, T wd, T mx, T zy) {
  return wv * (log(A(wv) / A(wd)) + (A(mx) - A(zy)));
}

// Adds a block of voxels to the sums cls[c * kStats + k] (accumulated in A). label[v] outside
// [0, C) (the ignore index) or weight 0 leaves voxel v out. w: voxel weights or nullptr.
template <typename S, typename A, typename Acc, typename E>
MEDFAST_HOST_DEVICE void stats_block(const S* z, int64_t C, int64_t cs, const int64_t* label, const A* w, int nv,
                                     Acc cls, E e, E mx, E den) {
  using T = elem_t<E>;
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
    cls[y * kStats + 0] += e[y * nv + v] * den[v];
    cls[y * kStats + 2] += wv;
    // -log p_y = log(sum e) + mx - z_y, with sum e = w / den
    cls[y * kStats + 3] += ce_term<A>(wv, den[v], mx[v], static_cast<T>(z[y * cs + v]));
  }
}

// One voxel's row for the class-transposed CUDA sums (loss_kernels.cuh label_sums_warp_kernel):
// row[0, C) = exp(z - max), row[C] = its cross-entropy term w (-log p_y), row[C + 1] = w / sum(exp)
// (the weight of p = row[c] * row[C + 1]; 0 leaves the voxel out), row[C + 2] = y (-1: left out),
// row[C + 3] = w. The same operations as stats_block for one voxel; inactive (a thread past the end):
// left out.
template <typename S, typename A, typename E>
MEDFAST_HOST_DEVICE void label_voxel_row(const S* z, int64_t C, int64_t cs, const int64_t* label, const A* w,
                                         bool active, E row) {
  using T = elem_t<E>;
  const int64_t y = active ? label[0] : -1;
  if (y < 0 || y >= C) {
    row[C] = T(0);
    row[C + 1] = T(0);
    row[C + 2] = T(-1);
    row[C + 3] = T(0);
    return;
  }
  softmax_block(z, C, cs, 1, row, row + C, row + C + 1);  // mx in row[C], sum e in row[C + 1]
  const A wv = w ? w[0] : A(1);
  const T wd = static_cast<T>(wv) / row[C + 1];
  const T mx = row[C];
  row[C] = wd == T(0) ? T(0) : static_cast<T>(ce_term<A>(wv, wd, mx, static_cast<T>(z[y * cs])));
  row[C + 1] = wd;
  row[C + 2] = static_cast<T>(y);
  row[C + 3] = static_cast<T>(wv);
}

// Gradient of a block of voxels' logits (gz[c * cs + v], same layout as z) from the gradients of
// their batch's sums, gcls[c * kStats + k]:
//   d L / d z_k = w (p_k (u_k - sum_c u_c p_c) + e_y (p_k - [k = y])),
//   u_c = dL/dI[c] [y = c] + dL/dP[c],  e_y = dL/dE[y].
// Scratch as softmax_block, plus aux (2 nv): the voxel weight and e_y.
template <typename S, typename A, typename E>
MEDFAST_HOST_DEVICE void stats_backward_block(const S* z, int64_t C, int64_t cs, const int64_t* label, const A* w,
                                              int nv, const A* gcls, S* gz, E e, E mx, E den, E aux) {
  using T = elem_t<E>;
  softmax_block(z, C, cs, nv, e, mx, den);
  E ubar = mx;  // the max is not needed any more
  E wv = aux;
  E ey = aux + nv;
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

// ---- Soft / multi-label targets: t[c * cs + v] (probabilities, or 0/1 labels per channel) ----
// Softmax over the classes (SIGMOID = false): I = sum w p_c t_c, P = sum w p_c, G = sum w t_c,
// E = sum w t_c (-log p_c). Independent sigmoids (SIGMOID = true): the same with p_c = sigmoid(z_c)
// and E = sum w BCE(z_c, t_c). Scratch as softmax_block.
template <bool SIGMOID, typename S, typename A, typename Acc, typename E>
MEDFAST_HOST_DEVICE void soft_stats_block(const S* z, const S* t, int64_t C, int64_t cs, const A* w, int nv, Acc cls,
                                          E e, E mx, E den) {
  using T = elem_t<E>;
  if constexpr (!SIGMOID) {
    softmax_block(z, C, cs, nv, e, mx, den);
    for (int v = 0; v < nv; ++v) den[v] = T(1) / den[v];
  }
  for (int64_t c = 0; c < C; ++c) {
    A acc[kStats] = {A(0), A(0), A(0), A(0)};
    for (int v = 0; v < nv; ++v) {
      const T zc = static_cast<T>(z[c * cs + v]), tc = static_cast<T>(t[c * cs + v]);
      const T wv = w ? static_cast<T>(w[v]) : T(1);
      T p, nll;
      if constexpr (SIGMOID) {
        const T ez = exp_nonpositive(-(zc < T(0) ? -zc : zc));  // exp(-|z|)
        p = zc >= T(0) ? T(1) / (T(1) + ez) : ez / (T(1) + ez);
        nll = (zc > T(0) ? zc : T(0)) - zc * tc + log1p(ez);  // BCE with logits, stable
      } else {
        p = e[c * nv + v] * den[v];
        nll = tc * (mx[v] - zc - log(den[v]));  // t_c (-log p_c), den holds 1 / sum e
      }
      acc[0] += wv * p * tc;
      acc[1] += wv * p;
      acc[2] += wv * tc;
      acc[3] += wv * nll;
    }
    for (int k = 0; k < kStats; ++k) cls[c * kStats + k] += acc[k];
  }
}

// Gradient for soft_stats_block. Sigmoid: dL/dz_c = w ((gI_c t_c + gP_c) p (1 - p) + gE_c (p - t_c)).
// Softmax: with u_c = gI_c t_c + gP_c, dL/dz_k = w (p_k (u_k - sum_c u_c p_c) + p_k sum_c gE_c t_c
// - gE_k t_k). Scratch as softmax_block plus aux (nv).
template <bool SIGMOID, typename S, typename A, typename E>
MEDFAST_HOST_DEVICE void soft_stats_backward_block(const S* z, const S* t, int64_t C, int64_t cs, const A* w, int nv,
                                                   const A* gcls, S* gz, E e, E mx, E den, E aux) {
  using T = elem_t<E>;
  if constexpr (SIGMOID) {
    for (int64_t c = 0; c < C; ++c) {
      const T gi = static_cast<T>(gcls[c * kStats + 0]), gp = static_cast<T>(gcls[c * kStats + 1]);
      const T ge = static_cast<T>(gcls[c * kStats + 3]);
      for (int v = 0; v < nv; ++v) {
        const T zc = static_cast<T>(z[c * cs + v]), tc = static_cast<T>(t[c * cs + v]);
        const T ez = exp_nonpositive(-(zc < T(0) ? -zc : zc));
        const T p = zc >= T(0) ? T(1) / (T(1) + ez) : ez / (T(1) + ez);
        const T wv = w ? static_cast<T>(w[v]) : T(1);
        gz[c * cs + v] = static_cast<S>(wv * ((gi * tc + gp) * p * (T(1) - p) + ge * (p - tc)));
      }
    }
  } else {
    softmax_block(z, C, cs, nv, e, mx, den);
    E ubar = mx;   // sum_c u_c p_c
    E tsum = aux;  // sum_c gE_c t_c
    for (int v = 0; v < nv; ++v) {
      den[v] = T(1) / den[v];
      ubar[v] = T(0);
      tsum[v] = T(0);
    }
    for (int64_t c = 0; c < C; ++c) {
      const T gi = static_cast<T>(gcls[c * kStats + 0]), gp = static_cast<T>(gcls[c * kStats + 1]);
      const T ge = static_cast<T>(gcls[c * kStats + 3]);
      for (int v = 0; v < nv; ++v) {
        const T tc = static_cast<T>(t[c * cs + v]);
        ubar[v] += (gi * tc + gp) * e[c * nv + v] * den[v];
        tsum[v] += ge * tc;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      const T gi = static_cast<T>(gcls[c * kStats + 0]), gp = static_cast<T>(gcls[c * kStats + 1]);
      const T ge = static_cast<T>(gcls[c * kStats + 3]);
      for (int v = 0; v < nv; ++v) {
        const T tc = static_cast<T>(t[c * cs + v]);
        const T p = e[c * nv + v] * den[v];
        const T wv = w ? static_cast<T>(w[v]) : T(1);
        gz[c * cs + v] = static_cast<S>(wv * (p * (gi * tc + gp - ubar[v]) + p * tsum[v] - ge * tc));
      }
    }
  }
}

}  // namespace medfast::loss

// Fused segmentation losses: the arithmetic of one voxel, shared by the CPU and CUDA launchers.
//
// The losses (Dice, cross-entropy, Dice+CE) need only per-(batch, class) sums over the voxels:
//   I[b,c] = sum_x w p_c [y = c],  P[b,c] = sum_x w p_c,  G[b,c] = sum_x w [y = c],
//   E[b,c] = sum_x w [y = c] (-log p_c),
// with p = softmax(logits) over the classes, y the label, w the voxel weight (the voxel is skipped
// where y is the ignore index or out of range; out-of-range labels are reported, LabelRange). Everything else, class weights included, is O(B x C) tensor
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

// How a label counts: a class in [0, C), the ignore index (left out), or out of range (left out too,
// and reported by LabelRange, so that the caller's range check needs no pass of its own over the labels).
// Labels come in their own integer type (uint8, int32, int64): no int64 copy of a label map.
struct LabelRule {
  int64_t C, ignore;
  bool has_ignore;
  MEDFAST_HOST_DEVICE bool ignored(int64_t y) const { return has_ignore && y == ignore; }
  // The class of label y, or -1: the voxel is left out.
  template <typename L>
  MEDFAST_HOST_DEVICE int64_t cls(L label) const {
    const int64_t y = static_cast<int64_t>(label);
    return y >= 0 && y < C && !ignored(y) ? y : int64_t(-1);
  }
};

// The labels' range, the ignored ones counted as 0: min(0, labels) and max(0, labels) (a plain min / max:
// vectorizes). Out of range: lo < 0 (the most negative label) or hi >= C (the largest); reported as
// (lo, bad_hi), both 0 with good labels, so the device buffer starts as zeros.
struct LabelRange {
  int64_t lo = 0, hi = 0;
  template <typename L>
  MEDFAST_HOST_DEVICE void add(const LabelRule& r, L label) {
    const int64_t y = r.ignored(static_cast<int64_t>(label)) ? int64_t(0) : static_cast<int64_t>(label);
    lo = y < lo ? y : lo;
    hi = y > hi ? y : hi;
  }
  MEDFAST_HOST_DEVICE void merge(const LabelRange& o) {
    lo = o.lo < lo ? o.lo : lo;
    hi = o.hi > hi ? o.hi : hi;
  }
  MEDFAST_HOST_DEVICE int64_t bad_hi(int64_t C) const { return hi >= C ? hi : int64_t(0); }
};

// A label map whose integer type is known at run time (uint8, int32 or int64), read as int64 (exact).
// The arithmetic below is compiled for int64 labels only: the launchers read each label map in its own
// type through this (the CUDA kernels one label per thread, a uniform branch; the CPU launcher a block at
// a time into int64), instead of one instantiation of every kernel per label type.
struct AnyLabels {
  enum Kind : int { kU8 = 0, kI32 = 1, kI64 = 2 };
  const void* p;
  int kind;
  MEDFAST_HOST_DEVICE int64_t operator[](int64_t i) const {
    return kind == kU8    ? static_cast<int64_t>(static_cast<const uint8_t*>(p)[i])
           : kind == kI32 ? static_cast<int64_t>(static_cast<const int32_t*>(p)[i])
                          : static_cast<const int64_t*>(p)[i];
  }
  // Labels [v0, v0 + nv) as int64: in place for int64 labels, else converted into buf (a loop per type).
  MEDFAST_HOST_DEVICE const int64_t* block(int64_t v0, int nv, int64_t* buf) const {
    if (kind == kI64) return static_cast<const int64_t*>(p) + v0;
    if (kind == kU8) {
      const uint8_t* s = static_cast<const uint8_t*>(p) + v0;
      for (int v = 0; v < nv; ++v) buf[v] = s[v];
    } else {
      const int32_t* s = static_cast<const int32_t*>(p) + v0;
      for (int v = 0; v < nv; ++v) buf[v] = s[v];
    }
    return buf;
  }
};

// exp(x) for x <= 0 in float without a library call, branch-free so that loops over voxels
// vectorize (Cody-Waite range reduction and a degree-6 polynomial, about 2 ulp); double uses exp.
MEDFAST_HOST_DEVICE float exp_nonpositive(float x_in) {
  // exp(-87) ~ 1.6e-38: below it the result is 0 for our purposes. NaN (a NaN or inf logit) is clamped
  // too, so that the int conversion below stays defined, and given back as NaN at the end.
  const float x = x_in > -87.0f ? x_in : -87.0f;  // (maxps: NaN -> -87)
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
  // NaN in, NaN out (the clamp made it -87) by an integer test and blend: a float compare-and-select here
  // stopped GCC from vectorizing the voxel loops (3x slower).
  float out = p * scale;
  uint32_t in_bits, out_bits;
  memcpy(&in_bits, &x_in, sizeof(in_bits));
  memcpy(&out_bits, &out, sizeof(out_bits));
  const uint32_t nan = 0u - static_cast<uint32_t>((in_bits & 0x7fffffffu) > 0x7f800000u);
  out_bits = (out_bits & ~nan) | (in_bits & nan);
  memcpy(&out, &out_bits, sizeof(out));
  return out;
}
MEDFAST_HOST_DEVICE double exp_nonpositive(double x) { return exp(x); }

// log(1 + f) for -0.29 <= f <= 1 in float without a library call, branch-free (vectorizes like
// exp_nonpositive): with s = f / (2 + f) (|s| <= 1/3), log(1 + f) = 2 atanh(s) = f - (f^2/2 - s (f^2/2 + R)),
// R = sum_k 2 s^2k / (2k + 1) to s^14 (fdlibm's arrangement: f is exact, the rounding is in the small
// correction; within 1.3 ulp on [0, 1]). The CUDA build keeps log1pf.
MEDFAST_HOST_DEVICE float log1p_bounded(float f) {
#ifdef __CUDA_ARCH__
  return log1pf(f);
#else
  const float s = f / (2.0f + f), s2 = s * s, hfsq = 0.5f * f * f;
  float r = 2.0f / 15.0f;
  r = r * s2 + 2.0f / 13.0f;
  r = r * s2 + 2.0f / 11.0f;
  r = r * s2 + 2.0f / 9.0f;
  r = r * s2 + 2.0f / 7.0f;
  r = r * s2 + 2.0f / 5.0f;
  r = r * s2 + 2.0f / 3.0f;
  return f - (hfsq - s * (hfsq + r * s2));
#endif
}

// log(1 + x) for 0 <= x <= 1 in float by a polynomial alone (no division: the per-element BCE term),
// x + x^2 (-1/2 + x q(x)) with q of degree 7 fitted for the least maximal relative error on [0, 1]
// (8e-9 before rounding; within 2 ulp for every float in [0, 1], checked against log1p in double).
// The CUDA build keeps log1pf.
MEDFAST_HOST_DEVICE float log1p_unit(float x) {
#ifdef __CUDA_ARCH__
  return log1pf(x);
#else
  float q = -3.677781904e-03f;
  q = q * x + 2.187668718e-02f;
  q = q * x - 6.092355028e-02f;
  q = q * x + 1.102530882e-01f;
  q = q * x - 1.556962281e-01f;
  q = q * x + 1.977434605e-01f;
  q = q * x - 2.497510165e-01f;
  q = q * x + 3.333224952e-01f;
  q = q * x - 0.5f;
  return x + x * x * q;
#endif
}
MEDFAST_HOST_DEVICE double log1p_unit(double x) { return log1p(x); }

// log(x) for positive normal x in float without a library call, branch-free: x = m 2^k with m in
// [sqrt(1/2), sqrt(2)) from the bits, then k ln 2 + log1p_bounded(m - 1) (m - 1 is exact), ln 2 split
// as in exp_nonpositive (within 1 ulp). NaN and +inf come back as they are. The CUDA build keeps logf.
MEDFAST_HOST_DEVICE float log_positive(float x) {
#ifdef __CUDA_ARCH__
  return logf(x);
#else
  int32_t bits;
  memcpy(&bits, &x, sizeof(bits));
  const int32_t k = (bits - 0x3f3504f3) >> 23;  // 0x3f3504f3: sqrt(1/2)
  const int32_t mbits = bits - k * (int32_t(1) << 23);
  float m;
  memcpy(&m, &mbits, sizeof(m));
  const float kf = static_cast<float>(k);
  const float r = kf * 0.693359375f + (log1p_bounded(m - 1.0f) - kf * 2.12194440e-4f);
  return x <= 3.40282347e38f ? r : x;
#endif
}
MEDFAST_HOST_DEVICE double log_positive(double x) { return log(x); }

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

// Lanes of a block's sums (CPU): voxel v adds into lane v % kLanes, then the lanes are added in order.
// The loop over a block's voxels then vectorizes without reassociating a sum (the compiler may not),
// and the result is the same for any vector width (plain and AVX2 builds alike). The loop over the
// lanes must stay a loop (not unrolled): unrolled, gcc vectorizes across groups of lanes instead,
// with a transposition of every load.
constexpr int kLanes = 8;
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
#define MEDFAST_LOSS_NO_UNROLL _Pragma("unroll 1")
#elif defined(__CUDACC__) || defined(__HIPCC__)
#define MEDFAST_LOSS_NO_UNROLL  // host pass of a CUDA build: the pragma would only be warned about
#else
#define MEDFAST_LOSS_NO_UNROLL _Pragma("GCC unroll 1")
#endif

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

// Adds a block of voxels to the sums cls[c * kStats + k] (accumulated in A). A label that is no class
// (rule.cls < 0: ignored or out of range) or weight 0 leaves voxel v out; out-of-range labels go into
// range. w: voxel weights or nullptr. ce = false leaves E at 0 (no logarithms: nobody reads it).
// lse (nv scratch, blocks only): log(sum exp(z - max)) of each voxel, taken by the vectorized
// log_positive before the per-voxel loop (a double log per voxel there was half of a CPU forward's time);
// one voxel (the CUDA kernels, nv = 1) leaves it alone and takes ce_term.
template <typename S, typename L, typename A, typename Acc, typename E>
MEDFAST_HOST_DEVICE void stats_block(const S* z, int64_t C, int64_t cs, const L* label, const LabelRule& rule,
                                     bool ce, const A* w, int nv, Acc cls, E e, E mx, E den, E lse,
                                     LabelRange& range) {
  using T = elem_t<E>;
  softmax_block(z, C, cs, nv, e, mx, den);
  if (ce && nv > 1)
    for (int v = 0; v < nv; ++v) lse[v] = log_positive(den[v]);  // den = sum exp(z - max) in [1, C]
  for (int v = 0; v < nv; ++v) {  // den becomes w / den: the weight of p = e / den
    const bool keep = rule.cls(label[v]) >= 0;
    den[v] = keep ? static_cast<T>(w ? w[v] : A(1)) / den[v] : T(0);
  }
  LabelRange r = range;  // a local: kept in registers (range may alias the labels)
  for (int v = 0; v < nv; ++v) r.add(rule, label[v]);
  range = r;
  for (int64_t c = 0; c < C; ++c) {  // P, in lanes (kLanes)
    if (nv == 1) {  // CUDA: a thread per voxel
      cls[c * kStats + 1] += e[c] * den[0];
      continue;
    }
    T acc[kLanes] = {};
    int v0 = 0;
    for (; v0 + kLanes <= nv; v0 += kLanes)
      MEDFAST_LOSS_NO_UNROLL
      for (int j = 0; j < kLanes; ++j) acc[j] += e[c * nv + v0 + j] * den[v0 + j];
    for (int j = 0; v0 + j < nv; ++j) acc[j] += e[c * nv + v0 + j] * den[v0 + j];
    T sum = acc[0];
    for (int j = 1; j < kLanes; ++j) sum += acc[j];
    cls[c * kStats + 1] += sum;
  }
  for (int v = 0; v < nv; ++v) {
    const int64_t y = rule.cls(label[v]);
    if (y < 0 || den[v] == T(0)) continue;
    const A wv = w ? w[v] : A(1);
    cls[y * kStats + 0] += e[y * nv + v] * den[v];
    cls[y * kStats + 2] += wv;
    // -log p_y = log(sum e) + mx - z_y, with sum e = w / den (mx - z_y first, as in ce_term)
    if (ce && nv > 1)
      cls[y * kStats + 3] += static_cast<A>(static_cast<T>(wv) * (lse[v] + (mx[v] - static_cast<T>(z[y * cs + v]))));
    else if (ce)
      cls[y * kStats + 3] += ce_term<A>(wv, den[v], mx[v], static_cast<T>(z[y * cs + v]));
  }
}

// One voxel's row for the class-transposed CUDA sums (loss_kernels.cuh label_sums_warp_kernel):
// row[0, C) = exp(z - max), row[C] = its cross-entropy term w (-log p_y), row[C + 1] = w / sum(exp)
// (the weight of p = row[c] * row[C + 1]; 0 leaves the voxel out), row[C + 2] = y (-1: left out),
// row[C + 3] = w. The same operations as stats_block for one voxel; inactive (a thread past the end):
// left out.
template <typename S, typename L, typename A, typename E>
MEDFAST_HOST_DEVICE void label_voxel_row(const S* z, int64_t C, int64_t cs, const L* label, const LabelRule& rule,
                                         bool ce, const A* w, bool active, E row, LabelRange& range) {
  using T = elem_t<E>;
  if (active) range.add(rule, label[0]);
  const int64_t y = active ? rule.cls(label[0]) : int64_t(-1);
  if (y < 0) {
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
  row[C] = wd == T(0) || !ce ? T(0) : static_cast<T>(ce_term<A>(wv, wd, mx, static_cast<T>(z[y * cs])));
  row[C + 1] = wd;
  row[C + 2] = static_cast<T>(y);
  row[C + 3] = static_cast<T>(wv);
}

// Gradient of a block of voxels' logits (gz[c * cs + v], same layout as z) from the gradients of
// their batch's sums, gcls[c * kStats + k]:
//   d L / d z_k = w (p_k (u_k - sum_c u_c p_c) + e_y (p_k - [k = y])),
//   u_c = dL/dI[c] [y = c] + dL/dP[c],  e_y = dL/dE[y].
// Scratch as softmax_block, plus aux (2 nv): the voxel weight and e_y. Voxels that are no class (ignored
// or out of range: rule.cls < 0) get weight 0, as in stats_block.
template <typename S, typename L, typename A, typename E>
MEDFAST_HOST_DEVICE void stats_backward_block(const S* z, int64_t C, int64_t cs, const L* label,
                                              const LabelRule& rule, const A* w, int nv, const A* gcls, S* gz, E e,
                                              E mx, E den, E aux) {
  using T = elem_t<E>;
  softmax_block(z, C, cs, nv, e, mx, den);
  E ubar = mx;  // the max is not needed any more
  E wv = aux;
  E ey = aux + nv;
  for (int v = 0; v < nv; ++v) {
    const int64_t y = rule.cls(label[v]);
    const bool keep = y >= 0;
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
      const bool own = static_cast<int64_t>(label[v]) == c;  // (weight 0 where the label is no class)
      const T p = e[c * nv + v] * den[v];
      const T u = own ? gp + gi : gp;
      gz[c * cs + v] = static_cast<S>(wv[v] * (p * (u - ubar[v]) + ey[v] * (p - (own ? T(1) : T(0)))));
    }
  }
}

// ---- Soft / multi-label targets: t[c * cs + v] (probabilities, or 0/1 labels per channel) ----
// Softmax over the classes (SIGMOID = false): I = sum w p_c t_c, P = sum w p_c, G = sum w t_c,
// E = sum w t_c (-log p_c). Independent sigmoids (SIGMOID = true): the same with p_c = sigmoid(z_c)
// and E = sum w BCE(z_c, t_c). Every per-voxel loop vectorizes on the CPU (no library call in it: the
// logarithm of the softmax's sum is taken once per voxel, not per class).

// Voxel weights as T, read by index: the given ones, or none (1, the multiplications fold away), so
// that the loops are compiled once for each instead of testing for weights per voxel and class.
template <typename T, typename A>
struct VoxelWeights {
  const A* w;
  MEDFAST_HOST_DEVICE T operator[](int64_t v) const { return static_cast<T>(w[v]); }
};
template <typename T>
struct UnitWeights {
  MEDFAST_HOST_DEVICE T operator[](int64_t) const { return T(1); }
};

// sigmoid(z), branch-free and stable: with ez = exp(-|z|) and r = 1 / (1 + ez), r for z >= 0 and
// ez r below; either way 1 - p or p is q = ez r = sigmoid(-|z|), and p (1 - p) = q r.
template <typename T>
MEDFAST_HOST_DEVICE T sigmoid_parts(T z, T& ez, T& r) {
  ez = exp_nonpositive(z < T(0) ? z : -z);
  r = T(1) / (T(1) + ez);
  return z >= T(0) ? r : ez * r;
}

// The terms of voxel v, class c of a block in the soft sums: w p t, w p, w t, w nll added to a0..a3.
// Softmax: e holds p (normalised), lr[v] = log(1 / sum exp(z - mx)), so -log p_c = (mx - z_c) - lr
// (mx - z_c first: small or exact, see ce_term). CE = false: no nll (a3 stays 0; the BCE's log1p per
// element was a third of the sigmoid sums' time, for a Dice loss that never reads it).
template <bool SIGMOID, bool CE, typename S, typename U, typename E, typename W>
struct SoftTerms {
  using T = elem_t<E>;
  const S* z;
  const U* t;
  int64_t cs;
  int nv;
  E e, mx, lr;
  W w;
  MEDFAST_HOST_DEVICE void operator()(int64_t c, int v, T& a0, T& a1, T& a2, T& a3) const {
    const T zc = static_cast<T>(z[c * cs + v]), tc = static_cast<T>(t[c * cs + v]), wv = w[v];
    T p, nll = T(0);
    if constexpr (SIGMOID) {
      T ez, r;
      p = sigmoid_parts(zc, ez, r);
      if constexpr (CE) nll = (zc > T(0) ? zc : T(0)) - zc * tc + log1p_unit(ez);  // BCE with logits, stable
    } else {
      p = e[c * nv + v];
      if constexpr (CE) nll = tc * ((mx[v] - zc) - lr[v]);
    }
    const T wp = wv * p;
    a0 += wp * tc;
    a1 += wp;
    a2 += wv * tc;
    if constexpr (CE) a3 += wv * nll;
  }
};

// cls[c * kStats + k] += the block's sums of terms(c, v, a0, a1, a2, a3) over its nv voxels, in T.
template <typename T, typename Terms, typename Acc>
MEDFAST_HOST_DEVICE void add_class_sums(const Terms& terms, int64_t c, int nv, Acc cls) {
  if (nv == 1) {  // CUDA: a thread per voxel
    T a0 = T(0), a1 = T(0), a2 = T(0), a3 = T(0);
    terms(c, 0, a0, a1, a2, a3);
    cls[c * kStats + 0] += a0;
    cls[c * kStats + 1] += a1;
    cls[c * kStats + 2] += a2;
    cls[c * kStats + 3] += a3;
    return;
  }
  T a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {};
  int v0 = 0;
  for (; v0 + kLanes <= nv; v0 += kLanes)
    MEDFAST_LOSS_NO_UNROLL
    for (int j = 0; j < kLanes; ++j) terms(c, v0 + j, a0[j], a1[j], a2[j], a3[j]);
  for (int j = 0; v0 + j < nv; ++j) terms(c, v0 + j, a0[j], a1[j], a2[j], a3[j]);
  T s0 = a0[0], s1 = a1[0], s2 = a2[0], s3 = a3[0];
  for (int j = 1; j < kLanes; ++j) {
    s0 += a0[j];
    s1 += a1[j];
    s2 += a2[j];
    s3 += a3[j];
  }
  cls[c * kStats + 0] += s0;
  cls[c * kStats + 1] += s1;
  cls[c * kStats + 2] += s2;
  cls[c * kStats + 3] += s3;
}

template <bool SIGMOID, bool CE, typename S, typename U, typename Acc, typename E, typename W>
MEDFAST_HOST_DEVICE void soft_stats_block_weighted(const S* z, const U* t, int64_t C, int64_t cs, W w, int nv,
                                                   Acc cls, E e, E mx, E den) {
  using T = elem_t<E>;
  if constexpr (!SIGMOID) {
    softmax_block(z, C, cs, nv, e, mx, den);
    for (int v = 0; v < nv; ++v) den[v] = T(1) / den[v];
    for (int64_t c = 0; c < C; ++c)
      for (int v = 0; v < nv; ++v) e[c * nv + v] *= den[v];  // p
    if constexpr (CE)
      for (int v = 0; v < nv; ++v) den[v] = log_positive(den[v]);  // once per voxel, in [-log C, 0]
  }
  const SoftTerms<SIGMOID, CE, S, U, E, W> terms{z, t, cs, nv, e, mx, den, w};
  for (int64_t c = 0; c < C; ++c) add_class_sums<T>(terms, c, nv, cls);
}

// Adds a block of voxels to the sums cls[c * kStats + k]. w: voxel weights or nullptr. Scratch as
// softmax_block (unused with SIGMOID). CE = false leaves E at 0. The targets t (U) are the logits' type S or
// the compute type (a float32 target of half logits, read without rounding to the logits' type).
template <bool SIGMOID, bool CE, typename S, typename U, typename A, typename Acc, typename E>
MEDFAST_HOST_DEVICE void soft_stats_block(const S* z, const U* t, int64_t C, int64_t cs, const A* w, int nv, Acc cls,
                                          E e, E mx, E den) {
  using T = elem_t<E>;
  if (w)
    soft_stats_block_weighted<SIGMOID, CE>(z, t, C, cs, VoxelWeights<T, A>{w}, nv, cls, e, mx, den);
  else
    soft_stats_block_weighted<SIGMOID, CE>(z, t, C, cs, UnitWeights<T>{}, nv, cls, e, mx, den);
}

// Gradient for soft_stats_block. Sigmoid: dL/dz_c = w ((gI_c t_c + gP_c) p (1 - p) + gE_c (p - t_c)).
// Softmax: with u_c = gI_c t_c + gP_c, dL/dz_k = w (p_k (u_k - ubar) - gE_k t_k) with
// ubar = sum_c (u_c p_c - gE_c t_c).
template <bool SIGMOID, typename S, typename U, typename A, typename E, typename W>
MEDFAST_HOST_DEVICE void soft_stats_backward_block_weighted(const S* z, const U* t, int64_t C, int64_t cs, W w, int nv,
                                                            const A* gcls, S* gz, E e, E mx, E den) {
  using T = elem_t<E>;
  if constexpr (SIGMOID) {
    for (int64_t c = 0; c < C; ++c) {
      const T gi = static_cast<T>(gcls[c * kStats + 0]), gp = static_cast<T>(gcls[c * kStats + 1]);
      const T ge = static_cast<T>(gcls[c * kStats + 3]);
      for (int v = 0; v < nv; ++v) {
        const T zc = static_cast<T>(z[c * cs + v]), tc = static_cast<T>(t[c * cs + v]);
        T ez, r;
        sigmoid_parts(zc, ez, r);
        const T q = ez * r;  // sigmoid(-|z|); p (1 - p) = q r
        const T pt = zc >= T(0) ? (T(1) - tc) - q : q - tc;  // p - t, p = 1 - q or q (no rounding of p to 1)
        gz[c * cs + v] = static_cast<S>(w[v] * ((gi * tc + gp) * (q * r) + ge * pt));
      }
    }
  } else {
    softmax_block(z, C, cs, nv, e, mx, den);
    E ubar = mx;  // the max is not needed any more
    for (int v = 0; v < nv; ++v) {
      den[v] = T(1) / den[v];
      ubar[v] = T(0);
    }
    for (int64_t c = 0; c < C; ++c) {
      const T gi = static_cast<T>(gcls[c * kStats + 0]), gp = static_cast<T>(gcls[c * kStats + 1]);
      const T ge = static_cast<T>(gcls[c * kStats + 3]);
      for (int v = 0; v < nv; ++v) {
        const T tc = static_cast<T>(t[c * cs + v]);
        ubar[v] += (gi * tc + gp) * (e[c * nv + v] * den[v]) - ge * tc;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      const T gi = static_cast<T>(gcls[c * kStats + 0]), gp = static_cast<T>(gcls[c * kStats + 1]);
      const T ge = static_cast<T>(gcls[c * kStats + 3]);
      for (int v = 0; v < nv; ++v) {
        const T tc = static_cast<T>(t[c * cs + v]);
        const T p = e[c * nv + v] * den[v];
        gz[c * cs + v] = static_cast<S>(w[v] * (p * (gi * tc + gp - ubar[v]) - ge * tc));
      }
    }
  }
}

// Scratch as softmax_block plus aux (nv; unused now, kept for the launchers' layout).
template <bool SIGMOID, typename S, typename U, typename A, typename E>
MEDFAST_HOST_DEVICE void soft_stats_backward_block(const S* z, const U* t, int64_t C, int64_t cs, const A* w, int nv,
                                                   const A* gcls, S* gz, E e, E mx, E den, E aux) {
  using T = elem_t<E>;
  (void)aux;
  if (w)
    soft_stats_backward_block_weighted<SIGMOID>(z, t, C, cs, VoxelWeights<T, A>{w}, nv, gcls, gz, e, mx, den);
  else
    soft_stats_backward_block_weighted<SIGMOID>(z, t, C, cs, UnitWeights<T>{}, nv, gcls, gz, e, mx, den);
}

}  // namespace medfast::loss

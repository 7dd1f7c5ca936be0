// The finishing arithmetic of the fused segmentation losses, shared by the CPU and CUDA launchers: from
// the per-(batch, class) sums stats[b, c] = (I, P, G, E) of loss.h to the scalar loss
//   L = lambda_dice * reduce_{k, c >= c0} cw_c (1 - (2 I + nr) / (P + G + dr))  +  lambda_ce * CE,
//   CE = sum_{b, c} cw_c E[b, c]  (/ divisor with the "mean" reduction),
// with k = b (or one row of the batch's sums with batch_dice), c0 = 0 or 1 (include_background),
// reduce = mean or sum over the Dice terms, cw the class weights (1 without), and the divisor of the CE
// mean either sum_{b, c} cw_c G[b, c] (integer labels, as F.cross_entropy with weight) or a given
// count (soft / sigmoid targets: a number times an optional 0-dim tensor). A term that is not asked
// for (dice / ce false) is never computed, so a NaN or inf in it cannot reach the loss. The gradient
// w.r.t. the sums is closed form (finalize_grad_entry).
//
// The reduction order is fixed: thread t of a block of nt (a power of 2) adds entries t, t + nt, ...
// (finalize_partial), then the block's partial sums are added by a tree (half = nt / 2, ..., 1: thread
// t < half adds thread t + half's). The CUDA kernel (loss_kernels.cuh finalize_kernel, one block) and
// the CPU launcher (loss_cpu.cpp, the same threads one after another) do exactly this, so they agree to
// rounding. This replaces ~15 small PyTorch ops (and ~20 in their backward) per loss call, each a
// kernel launch on a GPU.
#pragma once
#include <cstdint>
#include <limits>

#include "common/macros.h"
#include "loss/loss.h"

namespace medfast::loss {

constexpr int kFinalizeThreads = 256;  // one block; a power of 2 (the tree halves it)
constexpr int kFinalizeSums = 3;       // per thread: Dice terms, sum cw E, sum cw G

// The bits of loss_finalize's `flags` (medfast/ops/_loss.py _FLAGS has the same values).
enum FinalizeFlag : int64_t {
  kFinalizeDice = 1,             // the Dice term is present
  kFinalizeCE = 2,               // the cross-entropy term is present
  kFinalizeBackground = 4,       // include_background
  kFinalizeBatchDice = 8,        // batch_dice
  kFinalizeMean = 16,            // reduction "mean" (else "sum")
  kFinalizeTruthDivisor = 32,    // CE mean divisor sum cw G (integer labels)
};

// The arguments of one loss: pointers to the sums (B, C, kStats), the class weights (C) or null, the
// 0-dim divisor tensor or null; scalars in the compute type T (float, or double for double sums).
template <typename T>
struct Finalize {
  const T* stats;
  const T* cw;
  const T* divisor;
  // (2,) int64 label-range report of the sums op (loss.h LabelRange) or null: any non-zero entry (a label
  // out of range, check_labels=False) makes the loss and its gradient NaN, here rather than by separate
  // ops on the sums (four kernel launches and an autograd node per call on a GPU).
  const int64_t* bad;
  int64_t B, C;
  T divisor_scale;   // CE mean divisor: divisor_scale (* *divisor if given), unless truth_divisor
  T smooth_nr, smooth_dr, lambda_dice, lambda_ce;
  bool truth_divisor;  // CE mean divisor sum_{b, c} cw_c G[b, c] (integer labels)
  bool dice, ce;       // the terms present
  bool include_background, batch_dice, mean;

  MEDFAST_HOST_DEVICE int64_t first_class() const { return include_background ? 0 : 1; }
  MEDFAST_HOST_DEVICE int64_t dice_classes() const { return C > first_class() ? C - first_class() : 0; }
  // Number of Dice terms: (B or 1) x the classes from first_class().
  MEDFAST_HOST_DEVICE int64_t dice_terms() const { return (batch_dice ? 1 : B) * dice_classes(); }
  MEDFAST_HOST_DEVICE T weight(int64_t c) const { return cw ? cw[c] : T(1); }
  MEDFAST_HOST_DEVICE bool bad_labels() const { return bad != nullptr && (bad[0] != 0 || bad[1] != 0); }
  MEDFAST_HOST_DEVICE T ce_divisor(T truth_sum) const {
    return truth_divisor ? truth_sum : (divisor ? divisor[0] * divisor_scale : divisor_scale);
  }
  // The same loss without its Dice term: the backward's block sums (the gradient needs no Dice total).
  MEDFAST_HOST_DEVICE Finalize without_dice() const {
    Finalize f = *this;
    f.dice = false;
    return f;
  }
};

// The Finalize of the op's arguments: scalars = (divisor_scale, smooth_nr, smooth_dr, lambda_dice,
// lambda_ce), flags = FinalizeFlag bits.
template <typename T>
inline Finalize<T> finalize_args(const T* stats, const T* cw, const T* divisor, const int64_t* bad, int64_t B,
                                 int64_t C, const double* scalars, int64_t flags) {
  auto on = [flags](FinalizeFlag f) { return (flags & f) != 0; };
  return {stats,
          cw,
          divisor,
          bad,
          B,
          C,
          static_cast<T>(scalars[0]),
          static_cast<T>(scalars[1]),
          static_cast<T>(scalars[2]),
          static_cast<T>(scalars[3]),
          static_cast<T>(scalars[4]),
          on(kFinalizeTruthDivisor),
          on(kFinalizeDice),
          on(kFinalizeCE),
          on(kFinalizeBackground),
          on(kFinalizeBatchDice),
          on(kFinalizeMean)};
}

// Numerator 2 I + nr and denominator P + G + dr of the Dice ratio of batch element b, class c; with
// batch_dice (b ignored) of the batch's sums, added in batch order.
template <typename T>
MEDFAST_HOST_DEVICE void dice_ratio(const Finalize<T>& f, int64_t b, int64_t c, T& num, T& den) {
  T i = T(0), p = T(0), g = T(0);
  const int64_t b0 = f.batch_dice ? 0 : b, b1 = f.batch_dice ? f.B : b + 1;
  for (int64_t k = b0; k < b1; ++k) {
    const T* s = f.stats + (k * f.C + c) * kStats;
    i += s[0];
    p += s[1];
    g += s[2];
  }
  num = T(2) * i + f.smooth_nr;
  den = p + g + f.smooth_dr;
}

// Thread t of nt: acc[0] = its Dice terms cw_c (1 - num / den), acc[1] = sum cw_c E, acc[2] = sum cw_c G
// (the last only for truth_divisor with the mean), over entries t, t + nt, ...
template <typename T, typename Acc>
MEDFAST_HOST_DEVICE void finalize_partial(const Finalize<T>& f, int t, int nt, Acc acc) {
  T d = T(0), e = T(0), g = T(0);
  if (f.dice) {
    const int64_t per = f.dice_classes(), n = f.dice_terms();
    for (int64_t j = t; j < n; j += nt) {
      const int64_t b = j / per, c = f.first_class() + (j - b * per);
      T num, den;
      dice_ratio(f, b, c, num, den);
      d += (T(1) - num / den) * f.weight(c);
    }
  }
  if (f.ce) {
    const bool truth = f.truth_divisor && f.mean;
    for (int64_t j = t; j < f.B * f.C; j += nt) {
      const T w = f.weight(j % f.C);
      e += f.stats[j * kStats + 3] * w;
      if (truth) g += f.stats[j * kStats + 2] * w;
    }
  }
  acc[0] = d;
  acc[1] = e;
  acc[2] = g;
}

// One step of the tree: a (thread t < half) adds b (thread t + half).
template <typename Acc>
MEDFAST_HOST_DEVICE void finalize_combine(Acc a, Acc b) {
  for (int k = 0; k < kFinalizeSums; ++k) a[k] += b[k];
}

// The loss from the block's sums (Dice terms, sum cw E, sum cw G).
template <typename T>
MEDFAST_HOST_DEVICE T finalize_value(const Finalize<T>& f, T dice_sum, T nll_sum, T truth_sum) {
  if (f.bad_labels()) return std::numeric_limits<T>::quiet_NaN();
  const T dice = f.dice ? f.lambda_dice * (f.mean ? dice_sum / static_cast<T>(f.dice_terms()) : dice_sum) : T(0);
  const T ce = f.ce ? f.lambda_ce * (f.mean ? nll_sum / f.ce_divisor(truth_sum) : nll_sum) : T(0);
  return f.dice && f.ce ? dice + ce : (f.dice ? dice : ce);
}

// out[0..kStats) = dL/d(I, P, G, E)[b, c] for the upstream gradient g, from the block's sums nll_sum
// and truth_sum (as finalize_value had them):
//   Dice (c >= c0): with gd = g lambda_dice cw_c (/ terms for the mean), f = 1 - num / den:
//     dI = -2 gd / den, dP = dG = gd num / den^2 (with batch_dice the same for every b);
//   CE: with gc = g lambda_ce (/ divisor for the mean): dE = gc cw_c; with truth_divisor and the
//     mean also dG += -gc cw_c nll_sum / divisor.
template <typename T>
MEDFAST_HOST_DEVICE void finalize_grad_entry(const Finalize<T>& f, T g, T nll_sum, T truth_sum, int64_t b,
                                             int64_t c, T* out) {
  T gi = T(0), gp = T(0), gg = T(0), ge = T(0);
  const T w = f.weight(c);
  if (f.dice && c >= f.first_class()) {
    T gd = g * f.lambda_dice;
    if (f.mean) gd = gd / static_cast<T>(f.dice_terms());
    gd = gd * w;
    T num, den;
    dice_ratio(f, b, c, num, den);
    gi = T(-2) * gd / den;
    gp = gd * num / (den * den);
    gg = gp;
  }
  if (f.ce) {
    T gc = g * f.lambda_ce;
    if (f.mean) {
      const T div = f.ce_divisor(truth_sum);
      gc = gc / div;
      if (f.truth_divisor) gg += -gc * w * (nll_sum / div);
    }
    ge = gc * w;
  }
  if (f.bad_labels()) gi = gp = gg = ge = std::numeric_limits<T>::quiet_NaN();
  out[0] = gi;
  out[1] = gp;
  out[2] = gg;
  out[3] = ge;
}

}  // namespace medfast::loss

// Host-side glue of the loss family: launcher entry points registered by loss.cpp.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "loss/finalize.h"
#include "loss/loss.h"

namespace medfast::loss {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Sums are returned in float64 for float64 logits, else float32 (accumulated in double on CPU).
inline at::ScalarType stats_dtype(at::ScalarType logits) { return logits == at::kDouble ? at::kDouble : at::kFloat; }

// Labels as the kernels read them: uint8, int32 and int64 as they are (the usual label maps, read through
// AnyLabels: no copy), any other integer type as an int64 copy.
inline Tensor label_tensor(const Tensor& labels) {
  const auto t = labels.scalar_type();
  return t == at::kByte || t == at::kInt || t == at::kLong ? labels.contiguous() : labels.contiguous().to(at::kLong);
}

// The labels' data (after label_tensor) with their type.
inline AnyLabels any_labels(const Tensor& labels) {
  const auto t = labels.scalar_type();
  return {labels.const_data_ptr(), t == at::kByte ? AnyLabels::kU8 : t == at::kInt ? AnyLabels::kI32 : AnyLabels::kI64};
}

inline LabelRule label_rule(int64_t C, std::optional<int64_t> ignore_index) {
  return {C, ignore_index.value_or(0), ignore_index.has_value()};
}

// The logits (B, C, *S) as the kernels read them: z[b C N + c cs + x vs]. Contiguous (cs = N, vs = 1) and
// channels-last (channels_last / channels_last_3d, common under AMP: cs = 1, vs = C) logits are read in
// place; any other layout is copied to contiguous first. Soft targets follow the logits (target_like). The gradient is written in the
// layout read (grad_like; the fake kernel in medfast/ops/_loss.py follows the same rule).
struct LogitsLayout {
  Tensor t;
  int64_t cs, vs;
  bool channels_last;
};

inline at::MemoryFormat channels_last_format(const Tensor& t) {
  return t.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
}

// Channels-last and not contiguous (a tensor that is both, e.g. one class, counts as contiguous).
inline bool is_channels_last(const Tensor& t) {
  return (t.dim() == 4 || t.dim() == 5) && !t.is_contiguous() && t.is_contiguous(channels_last_format(t));
}

inline LogitsLayout logits_layout(const Tensor& logits) {
  const int64_t C = logits.size(1);
  if (is_channels_last(logits)) return {logits, 1, C, true};
  const int64_t N = logits.numel() / std::max<int64_t>(1, logits.size(0) * C);
  return {logits.contiguous(), N, 1, false};
}

// The dtype soft targets are read in: the logits' own, or else the compute type (float32; float64 for float64
// logits), so that a float32 target of float16 / bfloat16 logits (autocast's usual pair) is read as it is,
// never rounded to the logits' 8 or 11 bits.
inline at::ScalarType target_dtype(at::ScalarType logits, at::ScalarType target) {
  return target == logits ? logits : stats_dtype(logits);
}

// Soft targets (B, C, *S) in the logits' layout and in target_dtype: read in place when they already are,
// else copied (the target only; the logits are never copied for it).
inline Tensor target_like(const Tensor& target, const LogitsLayout& l) {
  return target.to(target_dtype(l.t.scalar_type(), target.scalar_type()))
      .contiguous(l.channels_last ? channels_last_format(l.t) : at::MemoryFormat::Contiguous);
}

inline Tensor grad_like(const LogitsLayout& l) {
  return at::empty_like(l.t, l.channels_last ? channels_last_format(l.t) : at::MemoryFormat::Contiguous);
}

// (2,) int64 from a LabelRange: the most negative out-of-range label and the largest one >= C (0: none).
inline Tensor range_tensor(const LabelRange& r, int64_t C, const Tensor& like) {
  Tensor out = at::empty({2}, like.options().dtype(at::kLong).device(at::kCPU));
  out.mutable_data_ptr<int64_t>()[0] = r.lo;
  out.mutable_data_ptr<int64_t>()[1] = r.bad_hi(C);
  return out;
}

// logits (B, C, *S), contiguous or channels-last (LogitsLayout); labels (B, *S) of an integer type
// (label_tensor); weight (B, *S) or none. Returns the (B, C, kStats) sums and the (2,) int64 out-of-range
// labels (LabelRange). ce = false leaves E at 0.
std::tuple<Tensor, Tensor> softmax_stats_cpu(const Tensor& logits, const Tensor& labels, const OptTensor& weight,
                                             std::optional<int64_t> ignore_index, bool ce);
Tensor softmax_stats_backward_cpu(const Tensor& grad_stats, const Tensor& logits, const Tensor& labels,
                                  const OptTensor& weight, std::optional<int64_t> ignore_index);

// Soft / multi-label targets (B, C, *S) of the logits' dtype or the compute type (target_dtype; any other
// floating dtype is converted to it), read in the logits' layout (LogitsLayout; target_like). ce = false
// leaves E at 0.
Tensor soft_stats_cpu(const Tensor& logits, const Tensor& target, const OptTensor& weight, bool sigmoid, bool ce);
Tensor soft_stats_backward_cpu(const Tensor& grad_stats, const Tensor& logits, const Tensor& target,
                               const OptTensor& weight, bool sigmoid);

// The arguments of loss_finalize besides the tensors (finalize.h finalize_args): scalars = (divisor_scale,
// smooth_nr, smooth_dr, lambda_dice, lambda_ce) and the FinalizeFlag bits.
struct FinalizeOptions {
  double scalars[5];
  int64_t flags;
};

// The inputs of loss_finalize in the layout the arithmetic reads: stats (B, C, kStats) contiguous, the
// class weights (C) and the divisor (one value) in the stats' dtype, on its device; the (2,) int64 label-range
// report of the sums op or none.
struct FinalizeInputs {
  Tensor stats, cw, divisor, bad;
  FinalizeInputs(const Tensor& s, const OptTensor& class_weight, const OptTensor& div, const OptTensor& bad_labels)
      : stats(s.contiguous()),
        cw(class_weight ? class_weight->to(s.scalar_type()).contiguous() : Tensor()),
        divisor(div ? div->to(s.scalar_type()).contiguous() : Tensor()),
        bad(bad_labels ? bad_labels->contiguous() : Tensor()) {}
  template <typename T>
  Finalize<T> args(const FinalizeOptions& o) const {
    return finalize_args<T>(stats.const_data_ptr<T>(), cw.defined() ? cw.const_data_ptr<T>() : nullptr,
                            divisor.defined() ? divisor.const_data_ptr<T>() : nullptr,
                            bad.defined() ? bad.const_data_ptr<int64_t>() : nullptr, stats.size(0), stats.size(1),
                            o.scalars, o.flags);
  }
};

// The scalar loss (0-dim, the stats' dtype) and its gradient w.r.t. stats (B, C, kStats), from the
// 0-dim upstream gradient.
Tensor loss_finalize_cpu(const Tensor& stats, const OptTensor& class_weight, const OptTensor& divisor,
                         const OptTensor& bad_labels, const FinalizeOptions& o);
Tensor loss_finalize_backward_cpu(const Tensor& grad, const Tensor& stats, const OptTensor& class_weight,
                                  const OptTensor& divisor, const OptTensor& bad_labels, const FinalizeOptions& o);

#ifdef MEDFAST_WITH_CUDA
Tensor loss_finalize_cuda(const Tensor& stats, const OptTensor& class_weight, const OptTensor& divisor,
                          const OptTensor& bad_labels, const FinalizeOptions& o);
Tensor loss_finalize_backward_cuda(const Tensor& grad, const Tensor& stats, const OptTensor& class_weight,
                                   const OptTensor& divisor, const OptTensor& bad_labels, const FinalizeOptions& o);
std::tuple<Tensor, Tensor> softmax_stats_cuda(const Tensor& logits, const Tensor& labels, const OptTensor& weight,
                                              std::optional<int64_t> ignore_index, bool ce);
Tensor softmax_stats_backward_cuda(const Tensor& grad_stats, const Tensor& logits, const Tensor& labels,
                                   const OptTensor& weight, std::optional<int64_t> ignore_index);
Tensor soft_stats_cuda(const Tensor& logits, const Tensor& target, const OptTensor& weight, bool sigmoid, bool ce);
Tensor soft_stats_backward_cuda(const Tensor& grad_stats, const Tensor& logits, const Tensor& target,
                                const OptTensor& weight, bool sigmoid);
#endif

}  // namespace medfast::loss

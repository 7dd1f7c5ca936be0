// Host-side glue of the loss family: launcher entry points registered by loss.cpp.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <optional>

#include "loss/finalize.h"
#include "loss/loss.h"

namespace medfast::loss {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Sums are returned in float64 for float64 logits, else float32 (accumulated in double on CPU).
inline at::ScalarType stats_dtype(at::ScalarType logits) { return logits == at::kDouble ? at::kDouble : at::kFloat; }

// logits (B, C, *S); labels (B, *S) int64 with the ignore index mapped to -1; weight (B, *S) or none.
Tensor softmax_stats_cpu(const Tensor& logits, const Tensor& labels, const OptTensor& weight);
Tensor softmax_stats_backward_cpu(const Tensor& grad_stats, const Tensor& logits, const Tensor& labels,
                                  const OptTensor& weight);

// Soft / multi-label targets (B, C, *S) of the logits' dtype.
Tensor soft_stats_cpu(const Tensor& logits, const Tensor& target, const OptTensor& weight, bool sigmoid);
Tensor soft_stats_backward_cpu(const Tensor& grad_stats, const Tensor& logits, const Tensor& target,
                               const OptTensor& weight, bool sigmoid);

// The arguments of loss_finalize besides the tensors (finalize.h finalize_args): scalars = (divisor_scale,
// smooth_nr, smooth_dr, lambda_dice, lambda_ce) and the FinalizeFlag bits.
struct FinalizeOptions {
  double scalars[5];
  int64_t flags;
};

// The inputs of loss_finalize in the layout the arithmetic reads: stats (B, C, kStats) contiguous, the
// class weights (C) and the divisor (one value) in the stats' dtype, on its device.
struct FinalizeInputs {
  Tensor stats, cw, divisor;
  FinalizeInputs(const Tensor& s, const OptTensor& class_weight, const OptTensor& div)
      : stats(s.contiguous()),
        cw(class_weight ? class_weight->to(s.scalar_type()).contiguous() : Tensor()),
        divisor(div ? div->to(s.scalar_type()).contiguous() : Tensor()) {}
  template <typename T>
  Finalize<T> args(const FinalizeOptions& o) const {
    return finalize_args<T>(stats.const_data_ptr<T>(), cw.defined() ? cw.const_data_ptr<T>() : nullptr,
                            divisor.defined() ? divisor.const_data_ptr<T>() : nullptr, stats.size(0), stats.size(1),
                            o.scalars, o.flags);
  }
};

// The scalar loss (0-dim, the stats' dtype) and its gradient w.r.t. stats (B, C, kStats), from the
// 0-dim upstream gradient.
Tensor loss_finalize_cpu(const Tensor& stats, const OptTensor& class_weight, const OptTensor& divisor,
                         const FinalizeOptions& o);
Tensor loss_finalize_backward_cpu(const Tensor& grad, const Tensor& stats, const OptTensor& class_weight,
                                  const OptTensor& divisor, const FinalizeOptions& o);

#ifdef MEDFAST_WITH_CUDA
Tensor loss_finalize_cuda(const Tensor& stats, const OptTensor& class_weight, const OptTensor& divisor,
                          const FinalizeOptions& o);
Tensor loss_finalize_backward_cuda(const Tensor& grad, const Tensor& stats, const OptTensor& class_weight,
                                   const OptTensor& divisor, const FinalizeOptions& o);
Tensor softmax_stats_cuda(const Tensor& logits, const Tensor& labels, const OptTensor& weight);
Tensor softmax_stats_backward_cuda(const Tensor& grad_stats, const Tensor& logits, const Tensor& labels,
                                   const OptTensor& weight);
Tensor soft_stats_cuda(const Tensor& logits, const Tensor& target, const OptTensor& weight, bool sigmoid);
Tensor soft_stats_backward_cuda(const Tensor& grad_stats, const Tensor& logits, const Tensor& target,
                                const OptTensor& weight, bool sigmoid);
#endif

}  // namespace medfast::loss

// Host-side glue of the loss family: launcher entry points registered by loss.cpp.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <optional>

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

#ifdef MEDFAST_WITH_CUDA
Tensor softmax_stats_cuda(const Tensor& logits, const Tensor& labels, const OptTensor& weight);
Tensor softmax_stats_backward_cuda(const Tensor& grad_stats, const Tensor& logits, const Tensor& labels,
                                   const OptTensor& weight);
Tensor soft_stats_cuda(const Tensor& logits, const Tensor& target, const OptTensor& weight, bool sigmoid);
Tensor soft_stats_backward_cuda(const Tensor& grad_stats, const Tensor& logits, const Tensor& target,
                                const OptTensor& weight, bool sigmoid);
#endif

}  // namespace medfast::loss

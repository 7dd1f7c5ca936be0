// Schemas of the loss family and their dispatch. Friendly validation is in medfast/ops/_loss.py.
#include <torch/library.h>

#include "loss/loss_launch.h"

namespace medfast::loss {
namespace {

// The dispatcher sends a mixed CPU / CUDA call to the CUDA kernel, where a host pointer is an illegal access.
void same_device(const Tensor& logits, const Tensor& other, const OptTensor& weight, const char* op) {
  TORCH_CHECK_VALUE(other.device() == logits.device(), op, ": target / labels on ", other.device(), " but logits on ",
                    logits.device());
  if (weight)
    TORCH_CHECK_VALUE(weight->device() == logits.device(), op, ": voxel_weight on ", weight->device(),
                      " but logits on ", logits.device());
}

void check(const Tensor& logits, const Tensor& labels, const OptTensor& weight) {
  TORCH_CHECK_VALUE(logits.dim() >= 3, "medfast softmax_stats: logits must be (B, C, *spatial)");
  TORCH_CHECK_VALUE(labels.dim() == logits.dim() - 1 && labels.size(0) == logits.size(0),
                    "medfast softmax_stats: labels must be (B, *spatial) like the logits");
  for (int64_t i = 1; i < labels.dim(); ++i)
    TORCH_CHECK_VALUE(labels.size(i) == logits.size(i + 1), "medfast softmax_stats: labels shape mismatch");
  TORCH_CHECK_TYPE(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false),
                   "medfast softmax_stats: labels must be integers, got ", labels.scalar_type());
  if (weight) TORCH_CHECK_VALUE(weight->sizes() == labels.sizes(), "medfast softmax_stats: voxel_weight shape");
  same_device(logits, labels, weight, "medfast softmax_stats");
}

void check_soft(const Tensor& logits, const Tensor& target, const OptTensor& weight) {
  TORCH_CHECK_VALUE(logits.dim() >= 3 && target.sizes() == logits.sizes(),
                    "medfast soft_stats: target must have the logits' shape (B, C, *spatial)");
  TORCH_CHECK_TYPE(at::isFloatingType(target.scalar_type()), "medfast soft_stats: target must be floating");
  if (weight) {
    TORCH_CHECK_VALUE(weight->dim() == logits.dim() - 1 && weight->size(0) == logits.size(0) &&
                          weight->numel() * logits.size(1) == logits.numel(),
                      "medfast soft_stats: voxel_weight must be (B, *spatial)");
  }
  same_device(logits, target, weight, "medfast soft_stats");
}

void check_finalize(const Tensor& stats, const OptTensor& class_weight, const OptTensor& divisor,
                    const OptTensor& bad_labels) {
  TORCH_CHECK_VALUE(stats.dim() == 3 && stats.size(2) == kStats,
                    "medfast loss_finalize: stats must be (B, C, 4), got ", stats.sizes());
  TORCH_CHECK_TYPE(stats.scalar_type() == at::kFloat || stats.scalar_type() == at::kDouble,
                   "medfast loss_finalize: stats must be float32 or float64, got ", stats.scalar_type());
  if (class_weight) {
    TORCH_CHECK_VALUE(class_weight->numel() == stats.size(1), "medfast loss_finalize: class_weight must have C = ",
                      stats.size(1), " entries, got ", class_weight->numel());
    TORCH_CHECK_VALUE(class_weight->device() == stats.device(), "medfast loss_finalize: class_weight is on ",
                      class_weight->device(), " but stats is on ", stats.device());
  }
  if (divisor) {
    TORCH_CHECK_VALUE(divisor->numel() == 1, "medfast loss_finalize: divisor must hold one value");
    TORCH_CHECK_VALUE(divisor->device() == stats.device(), "medfast loss_finalize: divisor is on ",
                      divisor->device(), " but stats is on ", stats.device());
  }
  if (bad_labels) {
    TORCH_CHECK_VALUE(bad_labels->numel() == 2 && bad_labels->scalar_type() == at::kLong,
                      "medfast loss_finalize: bad_labels must be the sums op's (2,) int64 label-range report, got ",
                      bad_labels->scalar_type(), " of shape ", bad_labels->sizes());
    TORCH_CHECK_VALUE(bad_labels->device() == stats.device(), "medfast loss_finalize: bad_labels is on ",
                      bad_labels->device(), " but stats is on ", stats.device());
  }
}

// The sums' gradient of a backward op: (B, C, kStats) in the sums' dtype, as the forward returned them. The
// launchers read B * C * kStats values of it (converted to their accumulation type and made contiguous there, so
// any strides do); a smaller tensor was read past its end.
void check_stats_grad(const Tensor& grad, const Tensor& logits, const char* op) {
  TORCH_CHECK_VALUE(grad.dim() == 3 && grad.size(0) == logits.size(0) && grad.size(1) == logits.size(1) &&
                        grad.size(2) == kStats,
                    op, ": grad must be (B, C, ", kStats, ") = (", logits.size(0), ", ", logits.size(1), ", ", kStats,
                    ") like the sums, got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == stats_dtype(logits.scalar_type()), op, ": grad must have the sums' dtype ",
                   stats_dtype(logits.scalar_type()), ", got ", grad.scalar_type());
  TORCH_CHECK_VALUE(grad.device() == logits.device(), op, ": grad on ", grad.device(), " but logits on ",
                    logits.device());
}

FinalizeOptions finalize_options(at::ArrayRef<double> scalars, int64_t flags) {
  TORCH_CHECK_VALUE(scalars.size() == 5,
                    "medfast loss_finalize: scalars must be (divisor_scale, smooth_nr, smooth_dr, lambda_dice, "
                    "lambda_ce), got ", scalars.size(), " values");
  TORCH_CHECK_VALUE(flags >= 0 && flags < 2 * kFinalizeTruthDivisor, "medfast loss_finalize: bad flags ", flags);
  return {{scalars[0], scalars[1], scalars[2], scalars[3], scalars[4]}, flags};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(medfast, m) {
  // Label sums: labels of any integer dtype (uint8, int32, int64 read as they are), ignore_index left out of
  // every sum; the second output (2,) int64 holds the out-of-range labels seen (loss.h LabelRange: the most
  // negative and the largest >= C, 0 for none), for the caller's range check. ce = False leaves the
  // cross-entropy sums at 0 (no logarithms). Logits contiguous or channels-last are read in place.
  m.def(
      "softmax_stats(Tensor logits, Tensor labels, Tensor? voxel_weight, int? ignore_index=None, bool ce=True) -> "
      "(Tensor, Tensor)");
  m.def(
      "softmax_stats_backward(Tensor grad, Tensor logits, Tensor labels, Tensor? voxel_weight, "
      "int? ignore_index=None) -> Tensor");
  m.def("soft_stats(Tensor logits, Tensor target, Tensor? voxel_weight, bool sigmoid, bool ce=True) -> Tensor");
  m.def("soft_stats_backward(Tensor grad, Tensor logits, Tensor target, Tensor? voxel_weight, bool sigmoid) -> Tensor");
  // The scalar loss from the sums (csrc/loss/finalize.h): lambda_dice * Dice term + lambda_ce * CE term,
  // the terms present and the options as the bits of `flags` (FinalizeFlag), scalars = (divisor_scale,
  // smooth_nr, smooth_dr, lambda_dice, lambda_ce). Few arguments on purpose: the Python autograd wrapper
  // of an op costs host time per argument (torch.library's fill_defaults, quadratic in their number).
  // bad_labels: softmax_stats' label-range report; a bad label makes the loss and its gradient NaN
  // (check_labels=False: no host check).
  m.def(
      "loss_finalize(Tensor stats, Tensor? class_weight, Tensor? divisor, float[] scalars, int flags, "
      "Tensor? bad_labels=None) -> Tensor");
  m.def(
      "loss_finalize_backward(Tensor grad, Tensor stats, Tensor? class_weight, Tensor? divisor, float[] scalars, "
      "int flags, Tensor? bad_labels=None) -> Tensor");
}

// The same checks in front of either backend's launchers.
struct Launchers {
  decltype(&softmax_stats_cpu) stats;
  decltype(&softmax_stats_backward_cpu) stats_backward;
  decltype(&soft_stats_cpu) soft;
  decltype(&soft_stats_backward_cpu) soft_backward;
  decltype(&loss_finalize_cpu) finalize;
  decltype(&loss_finalize_backward_cpu) finalize_backward;
};

template <const Launchers& L>
void register_impls(torch::Library& m) {
  m.impl("softmax_stats", [](const Tensor& logits, const Tensor& labels, const OptTensor& weight,
                             std::optional<int64_t> ignore_index, bool ce) {
    check(logits, labels, weight);
    return L.stats(logits, labels, weight, ignore_index, ce);
  });
  m.impl("softmax_stats_backward", [](const Tensor& grad, const Tensor& logits, const Tensor& labels,
                                      const OptTensor& weight, std::optional<int64_t> ignore_index) {
    check(logits, labels, weight);
    check_stats_grad(grad, logits, "medfast softmax_stats_backward");
    return L.stats_backward(grad, logits, labels, weight, ignore_index);
  });
  m.impl("soft_stats",
         [](const Tensor& logits, const Tensor& target, const OptTensor& weight, bool sigmoid, bool ce) {
           check_soft(logits, target, weight);
           return L.soft(logits, target, weight, sigmoid, ce);
         });
  m.impl("soft_stats_backward", [](const Tensor& grad, const Tensor& logits, const Tensor& target,
                                   const OptTensor& weight, bool sigmoid) {
    check_soft(logits, target, weight);
    check_stats_grad(grad, logits, "medfast soft_stats_backward");
    return L.soft_backward(grad, logits, target, weight, sigmoid);
  });
  m.impl("loss_finalize", [](const Tensor& stats, const OptTensor& class_weight, const OptTensor& divisor,
                             at::ArrayRef<double> scalars, int64_t flags, const OptTensor& bad_labels) {
    check_finalize(stats, class_weight, divisor, bad_labels);
    return L.finalize(stats, class_weight, divisor, bad_labels, finalize_options(scalars, flags));
  });
  m.impl("loss_finalize_backward", [](const Tensor& grad, const Tensor& stats, const OptTensor& class_weight,
                                      const OptTensor& divisor, at::ArrayRef<double> scalars, int64_t flags,
                                      const OptTensor& bad_labels) {
    check_finalize(stats, class_weight, divisor, bad_labels);
    TORCH_CHECK_VALUE(grad.numel() == 1 && grad.device() == stats.device(),
                      "medfast loss_finalize_backward: grad must be one value on the stats' device");
    TORCH_CHECK_TYPE(at::isFloatingType(grad.scalar_type()),
                     "medfast loss_finalize_backward: grad must be floating, got ", grad.scalar_type());
    return L.finalize_backward(grad, stats, class_weight, divisor, bad_labels, finalize_options(scalars, flags));
  });
}

constexpr Launchers kCpu{softmax_stats_cpu, softmax_stats_backward_cpu, soft_stats_cpu,
                         soft_stats_backward_cpu, loss_finalize_cpu, loss_finalize_backward_cpu};
TORCH_LIBRARY_IMPL(medfast, CPU, m) { register_impls<kCpu>(m); }

#ifdef MEDFAST_WITH_CUDA
constexpr Launchers kCuda{softmax_stats_cuda, softmax_stats_backward_cuda, soft_stats_cuda,
                          soft_stats_backward_cuda, loss_finalize_cuda, loss_finalize_backward_cuda};
TORCH_LIBRARY_IMPL(medfast, CUDA, m) { register_impls<kCuda>(m); }
#endif

}  // namespace medfast::loss

// Schemas of the loss family and their dispatch. Friendly validation is in medfast/ops/_loss.py.
#include <torch/library.h>

#include "loss/loss_launch.h"

namespace medfast::loss {
namespace {

void check(const Tensor& logits, const Tensor& labels, const OptTensor& weight) {
  TORCH_CHECK_VALUE(logits.dim() >= 3, "medfast softmax_stats: logits must be (B, C, *spatial)");
  TORCH_CHECK_VALUE(labels.dim() == logits.dim() - 1 && labels.size(0) == logits.size(0),
                    "medfast softmax_stats: labels must be (B, *spatial) like the logits");
  for (int64_t i = 1; i < labels.dim(); ++i)
    TORCH_CHECK_VALUE(labels.size(i) == logits.size(i + 1), "medfast softmax_stats: labels shape mismatch");
  TORCH_CHECK_TYPE(!at::isFloatingType(labels.scalar_type()), "medfast softmax_stats: labels must be integers");
  if (weight) TORCH_CHECK_VALUE(weight->sizes() == labels.sizes(), "medfast softmax_stats: voxel_weight shape");
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
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(medfast, m) {
  m.def("softmax_stats(Tensor logits, Tensor labels, Tensor? voxel_weight) -> Tensor");
  m.def("softmax_stats_backward(Tensor grad, Tensor logits, Tensor labels, Tensor? voxel_weight) -> Tensor");
  m.def("soft_stats(Tensor logits, Tensor target, Tensor? voxel_weight, bool sigmoid) -> Tensor");
  m.def("soft_stats_backward(Tensor grad, Tensor logits, Tensor target, Tensor? voxel_weight, bool sigmoid) -> Tensor");
}

// The same checks in front of either backend's launchers.
struct Launchers {
  decltype(&softmax_stats_cpu) stats;
  decltype(&softmax_stats_backward_cpu) stats_backward;
  decltype(&soft_stats_cpu) soft;
  decltype(&soft_stats_backward_cpu) soft_backward;
};

template <const Launchers& L>
void register_impls(torch::Library& m) {
  m.impl("softmax_stats", [](const Tensor& logits, const Tensor& labels, const OptTensor& weight) {
    check(logits, labels, weight);
    return L.stats(logits, labels, weight);
  });
  m.impl("softmax_stats_backward",
         [](const Tensor& grad, const Tensor& logits, const Tensor& labels, const OptTensor& weight) {
           check(logits, labels, weight);
           return L.stats_backward(grad, logits, labels, weight);
         });
  m.impl("soft_stats", [](const Tensor& logits, const Tensor& target, const OptTensor& weight, bool sigmoid) {
    check_soft(logits, target, weight);
    return L.soft(logits, target, weight, sigmoid);
  });
  m.impl("soft_stats_backward", [](const Tensor& grad, const Tensor& logits, const Tensor& target,
                                   const OptTensor& weight, bool sigmoid) {
    check_soft(logits, target, weight);
    return L.soft_backward(grad, logits, target, weight, sigmoid);
  });
}

constexpr Launchers kCpu{softmax_stats_cpu, softmax_stats_backward_cpu, soft_stats_cpu, soft_stats_backward_cpu};
TORCH_LIBRARY_IMPL(medfast, CPU, m) { register_impls<kCpu>(m); }

#ifdef MEDFAST_WITH_CUDA
constexpr Launchers kCuda{softmax_stats_cuda, softmax_stats_backward_cuda, soft_stats_cuda, soft_stats_backward_cuda};
TORCH_LIBRARY_IMPL(medfast, CUDA, m) { register_impls<kCuda>(m); }
#endif

}  // namespace medfast::loss

// Schemas of the LNCC family and their dispatch. Friendly validation is in medfast/ops/_lncc.py;
// these checks only keep a direct torch.ops call from reading out of bounds.
#include <torch/library.h>

#include "lncc/lncc_launch.h"

namespace medfast::lncc {
namespace {

void check(const Tensor& pred, const Tensor& target, at::IntArrayRef kernel_size) {
  TORCH_CHECK_VALUE(pred.dim() == 4 || pred.dim() == 5, "medfast lncc: pred must be (B, C, *spatial), 2 or 3 spatial");
  TORCH_CHECK_VALUE(target.sizes() == pred.sizes(), "medfast lncc: target must have pred's shape");
  TORCH_CHECK_TYPE(target.scalar_type() == pred.scalar_type(), "medfast lncc: target must have pred's dtype");
  // (the dispatcher sends a mixed CPU / CUDA call to the CUDA kernel: a host pointer there is an illegal access)
  TORCH_CHECK_VALUE(target.device() == pred.device(), "medfast lncc: target is on ", target.device(), " but pred on ",
                    pred.device());
  TORCH_CHECK_TYPE(pred.scalar_type() == at::kFloat || pred.scalar_type() == at::kDouble,
                   "medfast lncc: pred must be float32 or float64");
  TORCH_CHECK_VALUE(static_cast<int64_t>(kernel_size.size()) == pred.dim() - 2,
                    "medfast lncc: kernel_size needs one size per spatial dim");
  for (auto k : kernel_size) TORCH_CHECK_VALUE(k > 0 && k % 2 == 1, "medfast lncc: kernel sizes must be odd");
}

void check_grad(const Tensor& grad, const Tensor& pred, const Tensor& sums) {
  TORCH_CHECK_VALUE(grad.sizes() == pred.sizes() && grad.scalar_type() == pred.scalar_type(),
                    "medfast lncc_backward: grad must have pred's shape and dtype");
  TORCH_CHECK_VALUE(sums.numel() == kFields * pred.numel() && sums.scalar_type() == pred.scalar_type(),
                    "medfast lncc_backward: sums must be the (5, *pred.shape) sums returned by lncc");
  TORCH_CHECK_VALUE(grad.device() == pred.device() && sums.device() == pred.device(),
                    "medfast lncc_backward: grad, sums and pred must be on one device, got ", grad.device(), ", ",
                    sums.device(), " and ", pred.device());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(medfast, m) {
  // lncc returns the ncc map and the five local sums (kFields, B, C, *S) the backward reuses.
  m.def("lncc(Tensor pred, Tensor target, int[] kernel_size, float smooth_nr, float smooth_dr) -> (Tensor, Tensor)");
  m.def("lncc_backward(Tensor grad, Tensor pred, Tensor target, Tensor sums, int[] kernel_size, float smooth_nr, "
        "float smooth_dr) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(medfast, CPU, m) {
  m.impl("lncc", [](const Tensor& pred, const Tensor& target, at::IntArrayRef ks, double nr, double dr) {
    check(pred, target, ks);
    return lncc_cpu(pred, target, ks, nr, dr);
  });
  m.impl("lncc_backward", [](const Tensor& grad, const Tensor& pred, const Tensor& target, const Tensor& sums,
                             at::IntArrayRef ks, double nr, double dr) {
    check(pred, target, ks);
    check_grad(grad, pred, sums);
    return lncc_backward_cpu(grad, pred, target, sums, ks, nr, dr);
  });
}

#ifdef MEDFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(medfast, CUDA, m) {
  m.impl("lncc", [](const Tensor& pred, const Tensor& target, at::IntArrayRef ks, double nr, double dr) {
    check(pred, target, ks);
    return lncc_cuda(pred, target, ks, nr, dr);
  });
  m.impl("lncc_backward", [](const Tensor& grad, const Tensor& pred, const Tensor& target, const Tensor& sums,
                             at::IntArrayRef ks, double nr, double dr) {
    check(pred, target, ks);
    check_grad(grad, pred, sums);
    return lncc_backward_cuda(grad, pred, target, sums, ks, nr, dr);
  });
}
#endif

}  // namespace medfast::lncc

// Host-side glue of the LNCC family: launcher entry points registered by lncc.cpp.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <tuple>
#include <vector>

#include "lncc/lncc.h"

namespace medfast::lncc {

using at::Tensor;

// Geometry of a (B, C, *S) pair, 2D padded to 3D (a leading spatial axis of size 1, radius 0).
struct Geometry {
  int64_t bc = 1;                  // B * C volumes
  std::array<int64_t, 3> n{1, 1, 1};  // spatial sizes
  std::array<int64_t, 3> r{0, 0, 0};  // window radii (k - 1) / 2
  int64_t volume = 1;              // voxels per volume
  double window = 1;               // N = prod k
  Geometry(const Tensor& x, at::IntArrayRef kernel_size) {
    const int64_t nd = x.dim() - 2;
    bc = x.size(0) * x.size(1);
    for (int64_t a = 0; a < nd; ++a) {
      n[3 - nd + a] = x.size(2 + a);
      r[3 - nd + a] = (kernel_size[a] - 1) / 2;
      window *= static_cast<double>(kernel_size[a]);
    }
    volume = n[0] * n[1] * n[2];
  }
  int64_t total() const { return bc * volume; }
  // Layout [outer][n[a]][inner] of the field-major buffer [kFields][bc][volume] along axis a.
  int64_t outer(int a) const {
    int64_t o = kFields * bc;
    for (int i = 0; i < a; ++i) o *= n[i];
    return o;
  }
  int64_t inner(int a) const {
    int64_t s = 1;
    for (int i = a + 1; i < 3; ++i) s *= n[i];
    return s;
  }
};

// Forward: the ncc map (B, C, *S) of pred and target (same shape and dtype, contiguous) and the five
// complete local sums (kFields, B, C, *S) that the backward reuses.
std::tuple<Tensor, Tensor> lncc_cpu(const Tensor& pred, const Tensor& target, at::IntArrayRef kernel_size,
                                    double nr, double dr);
std::tuple<Tensor, Tensor> lncc_backward_cpu(const Tensor& grad, const Tensor& pred, const Tensor& target,
                                             const Tensor& sums, at::IntArrayRef kernel_size, double nr, double dr);
#ifdef MEDFAST_WITH_CUDA
std::tuple<Tensor, Tensor> lncc_cuda(const Tensor& pred, const Tensor& target, at::IntArrayRef kernel_size,
                                     double nr, double dr);
std::tuple<Tensor, Tensor> lncc_backward_cuda(const Tensor& grad, const Tensor& pred, const Tensor& target,
                                              const Tensor& sums, at::IntArrayRef kernel_size, double nr, double dr);
#endif

// Shape (kFields, B, C, *S) of the sums tensor.
inline std::vector<int64_t> sums_shape(const Tensor& x) {
  std::vector<int64_t> s{kFields};
  for (auto v : x.sizes()) s.push_back(v);
  return s;
}

}  // namespace medfast::lncc

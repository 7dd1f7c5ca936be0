// CPU launcher of the fused segmentation-loss sums (arithmetic in loss.h). The voxels of all
// batches are split into a fixed number of contiguous chunks, each summed in double into its own
// buffer, and the buffers are added in order: bitwise reproducible for a given thread count.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "loss/loss_launch.h"

namespace medfast::loss {

Tensor softmax_stats_cpu(const Tensor& logits_in, const Tensor& labels_in, const OptTensor& weight_in) {
  const Tensor logits = logits_in.contiguous();
  const Tensor labels = labels_in.contiguous().to(at::kLong);
  const Tensor weight = weight_in ? weight_in->contiguous().to(at::kDouble) : Tensor();
  const int64_t B = logits.size(0), C = logits.size(1), N = logits.numel() / std::max<int64_t>(1, B * C);
  const int64_t total = B * N;
  const int64_t chunks = std::clamp<int64_t>(std::min<int64_t>(at::get_num_threads(), total / 4096), 1, 64);
  std::vector<double> part(static_cast<size_t>(chunks * B * C * kStats), 0.0);
  const int64_t* y = labels.const_data_ptr<int64_t>();
  const double* w = weight.defined() ? weight.const_data_ptr<double>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "medfast_softmax_stats", [&] {
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        double* acc = part.data() + k * B * C * kStats;
        std::vector<double> scratch(static_cast<size_t>(C));
        for (int64_t i = total * k / chunks; i < total * (k + 1) / chunks; ++i) {
          const int64_t b = i / N, x = i - b * N;
          stats_voxel(z + b * C * N + x, C, N, y[i], w ? w[i] : 1.0, acc + b * C * kStats, scratch.data());
        }
      }
    });
  });
  Tensor out = at::zeros({B, C, kStats}, logits.options().dtype(at::kDouble));
  double* o = out.mutable_data_ptr<double>();
  for (int64_t k = 0; k < chunks; ++k)
    for (int64_t j = 0; j < B * C * kStats; ++j) o[j] += part[k * B * C * kStats + j];
  return out.to(stats_dtype(logits.scalar_type()));
}

Tensor softmax_stats_backward_cpu(const Tensor& grad_stats, const Tensor& logits_in, const Tensor& labels_in,
                                  const OptTensor& weight_in) {
  const Tensor logits = logits_in.contiguous();
  const Tensor labels = labels_in.contiguous().to(at::kLong);
  const Tensor weight = weight_in ? weight_in->contiguous().to(at::kDouble) : Tensor();
  const Tensor g = grad_stats.to(at::kDouble).contiguous();
  const int64_t B = logits.size(0), C = logits.size(1), N = logits.numel() / std::max<int64_t>(1, B * C);
  Tensor grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
  const int64_t* y = labels.const_data_ptr<int64_t>();
  const double* w = weight.defined() ? weight.const_data_ptr<double>() : nullptr;
  const double* gs = g.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "medfast_softmax_stats_bwd", [&] {
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    scalar_t* gz = grad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * N, 2048, [&](int64_t begin, int64_t end) {
      std::vector<double> scratch(static_cast<size_t>(C));
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / N, x = i - b * N;
        stats_backward_voxel(z + b * C * N + x, C, N, y[i], w ? w[i] : 1.0, gs + b * C * kStats,
                             gz + b * C * N + x, N, scratch.data());
      }
    });
  });
  return grad;
}

}  // namespace medfast::loss

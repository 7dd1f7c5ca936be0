// CPU launcher of the fused segmentation-loss sums (arithmetic in loss.h). Voxels go in blocks of
// kBlock adjacent ones (the per-voxel loops of loss.h vectorize over a block); the blocks of all
// batches are split into a fixed number of contiguous chunks, each summed in double into its own
// buffer, and the buffers are added in order: bitwise reproducible for a given thread count.
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "loss/loss_launch.h"

namespace medfast::loss {
namespace {

constexpr int kBlock = 64;  // voxels per block: the inner loops of loss.h run over them

// Blocks never straddle two batch elements: block j of batch b covers voxels [j * kBlock, ...).
struct Blocks {
  int64_t per_batch, total, N;
  Blocks(int64_t B, int64_t N_) : per_batch((N_ + kBlock - 1) / kBlock), total(B * per_batch), N(N_) {}
  void locate(int64_t i, int64_t& b, int64_t& x0, int& nv) const {
    b = i / per_batch;
    x0 = (i - b * per_batch) * kBlock;
    nv = static_cast<int>(std::min<int64_t>(kBlock, N - x0));
  }
};

}  // namespace

Tensor softmax_stats_cpu(const Tensor& logits_in, const Tensor& labels_in, const OptTensor& weight_in) {
  const Tensor logits = logits_in.contiguous();
  const Tensor labels = labels_in.contiguous().to(at::kLong);
  const Tensor weight = weight_in ? weight_in->contiguous().to(at::kDouble) : Tensor();
  const int64_t B = logits.size(0), C = logits.size(1), N = logits.numel() / std::max<int64_t>(1, B * C);
  const Blocks blocks(B, N);
  const int64_t chunks = std::clamp<int64_t>(std::min<int64_t>(at::get_num_threads(), blocks.total / 16), 1, 64);
  std::vector<double> part(static_cast<size_t>(chunks * B * C * kStats), 0.0);
  const int64_t* y = labels.const_data_ptr<int64_t>();
  const double* w = weight.defined() ? weight.const_data_ptr<double>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "medfast_softmax_stats", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
      std::vector<T> scratch(static_cast<size_t>((C + 2) * kBlock));
      for (int64_t k = k0; k < k1; ++k) {
        double* acc = part.data() + k * B * C * kStats;
        for (int64_t i = blocks.total * k / chunks; i < blocks.total * (k + 1) / chunks; ++i) {
          int64_t b, x0;
          int nv;
          blocks.locate(i, b, x0, nv);
          const int64_t v0 = b * N + x0;
          stats_block(z + b * C * N + x0, C, N, y + v0, w ? w + v0 : nullptr, nv, acc + b * C * kStats,
                      scratch.data(), scratch.data() + C * kBlock, scratch.data() + (C + 1) * kBlock);
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
  const Blocks blocks(B, N);
  Tensor grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
  const int64_t* y = labels.const_data_ptr<int64_t>();
  const double* w = weight.defined() ? weight.const_data_ptr<double>() : nullptr;
  const double* gs = g.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "medfast_softmax_stats_bwd", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    scalar_t* gz = grad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, blocks.total, 16, [&](int64_t begin, int64_t end) {
      std::vector<T> scratch(static_cast<size_t>((C + 4) * kBlock));
      T* e = scratch.data();
      for (int64_t i = begin; i < end; ++i) {
        int64_t b, x0;
        int nv;
        blocks.locate(i, b, x0, nv);
        const int64_t v0 = b * N + x0;
        stats_backward_block(z + b * C * N + x0, C, N, y + v0, w ? w + v0 : nullptr, nv, gs + b * C * kStats,
                             gz + b * C * N + x0, e, e + C * kBlock, e + (C + 1) * kBlock, e + (C + 2) * kBlock);
      }
    });
  });
  return grad;
}

Tensor soft_stats_cpu(const Tensor& logits_in, const Tensor& target_in, const OptTensor& weight_in, bool sigmoid) {
  const Tensor logits = logits_in.contiguous();
  const Tensor target = target_in.contiguous().to(logits.scalar_type());
  const Tensor weight = weight_in ? weight_in->contiguous().to(at::kDouble) : Tensor();
  const int64_t B = logits.size(0), C = logits.size(1), N = logits.numel() / std::max<int64_t>(1, B * C);
  const Blocks blocks(B, N);
  const int64_t chunks = std::clamp<int64_t>(std::min<int64_t>(at::get_num_threads(), blocks.total / 16), 1, 64);
  std::vector<double> part(static_cast<size_t>(chunks * B * C * kStats), 0.0);
  const double* w = weight.defined() ? weight.const_data_ptr<double>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "medfast_soft_stats", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const scalar_t* t = target.const_data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
      std::vector<T> scratch(static_cast<size_t>((C + 2) * kBlock));
      T* e = scratch.data();
      for (int64_t k = k0; k < k1; ++k) {
        double* acc = part.data() + k * B * C * kStats;
        for (int64_t i = blocks.total * k / chunks; i < blocks.total * (k + 1) / chunks; ++i) {
          int64_t b, x0;
          int nv;
          blocks.locate(i, b, x0, nv);
          const int64_t off = b * C * N + x0;
          const double* wv = w ? w + b * N + x0 : nullptr;
          if (sigmoid)
            soft_stats_block<true>(z + off, t + off, C, N, wv, nv, acc + b * C * kStats, e, e + C * kBlock,
                                   e + (C + 1) * kBlock);
          else
            soft_stats_block<false>(z + off, t + off, C, N, wv, nv, acc + b * C * kStats, e, e + C * kBlock,
                                    e + (C + 1) * kBlock);
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

Tensor soft_stats_backward_cpu(const Tensor& grad_stats, const Tensor& logits_in, const Tensor& target_in,
                               const OptTensor& weight_in, bool sigmoid) {
  const Tensor logits = logits_in.contiguous();
  const Tensor target = target_in.contiguous().to(logits.scalar_type());
  const Tensor weight = weight_in ? weight_in->contiguous().to(at::kDouble) : Tensor();
  const Tensor g = grad_stats.to(at::kDouble).contiguous();
  const int64_t B = logits.size(0), C = logits.size(1), N = logits.numel() / std::max<int64_t>(1, B * C);
  const Blocks blocks(B, N);
  Tensor grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
  const double* w = weight.defined() ? weight.const_data_ptr<double>() : nullptr;
  const double* gs = g.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "medfast_soft_stats_bwd", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const scalar_t* t = target.const_data_ptr<scalar_t>();
    scalar_t* gz = grad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, blocks.total, 16, [&](int64_t begin, int64_t end) {
      std::vector<T> scratch(static_cast<size_t>((C + 4) * kBlock));
      T* e = scratch.data();
      for (int64_t i = begin; i < end; ++i) {
        int64_t b, x0;
        int nv;
        blocks.locate(i, b, x0, nv);
        const int64_t off = b * C * N + x0;
        const double* wv = w ? w + b * N + x0 : nullptr;
        T* sc[4] = {e, e + C * kBlock, e + (C + 1) * kBlock, e + (C + 2) * kBlock};
        if (sigmoid)
          soft_stats_backward_block<true>(z + off, t + off, C, N, wv, nv, gs + b * C * kStats, gz + off, sc[0], sc[1],
                                          sc[2], sc[3]);
        else
          soft_stats_backward_block<false>(z + off, t + off, C, N, wv, nv, gs + b * C * kStats, gz + off, sc[0],
                                           sc[1], sc[2], sc[3]);
      }
    });
  });
  return grad;
}

}  // namespace medfast::loss

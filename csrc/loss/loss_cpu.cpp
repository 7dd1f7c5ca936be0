// CPU launcher of the fused segmentation-loss sums (arithmetic in loss.h). Voxels go in blocks of
// kBlock adjacent ones (the per-voxel loops of loss.h vectorize over a block); the blocks of all
// batches are split into a fixed number of contiguous chunks, each summed in double into its own
// buffer, and the buffers are added in order: bitwise reproducible for a given thread count.
// The loops over a chunk's blocks are compiled twice, plain and for AVX2 + FMA (the per-voxel loops of
// loss.h, inlined into them, then run eight floats wide); the CPU picks one at run time.
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/cpu_simd.h"
#include "loss/loss_launch.h"

namespace medfast::loss {
namespace {

// The per-block bodies below are lambdas; they must inline into run_avx2 to be compiled for AVX2.
#define MEDFAST_INLINE_LAMBDA __attribute__((always_inline))

constexpr int kBlock = 64;  // voxels per block: the inner loops of loss.h run over them
// Voxels per block of the sigmoid rows (one class, no scratch): longer blocks spread the per-block work
// (the lanes' sums, the block's place) over more voxels; 64 terms per lane of a float sum, as kBlock
// terms in one float sum elsewhere.
constexpr int kRowBlock = kBlock * kLanes;

// Blocks never straddle two batch elements: block j of batch b covers voxels [j * len, ...), len = kBlock
// unless the per-voxel work needs no scratch (kRowBlock).
struct Blocks {
  int64_t B, C, N, len, per_batch, total;
  explicit Blocks(const Tensor& logits, int64_t block_len = kBlock)
      : B(logits.size(0)),
        C(logits.size(1)),
        N(logits.numel() / std::max<int64_t>(1, logits.size(0) * logits.size(1))),
        len(block_len),
        per_batch((N + len - 1) / len),
        total(B * per_batch) {}
  // Batch, first voxel and length of block i.
  void locate(int64_t i, int64_t& b, int64_t& x0, int& nv) const {
    b = i / per_batch;
    x0 = (i - b * per_batch) * len;
    nv = static_cast<int>(std::min<int64_t>(len, N - x0));
  }
};

// Per-voxel compute type: float, or double for double logits.
template <typename S>
using compute_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

// body(b, x0, nv, scratch) for the blocks [i0, i1); run() and run_avx2() are the same loop compiled
// for the baseline ISA and for AVX2 + FMA (the body, always inlined, is compiled with it).
template <typename T, typename Body>
struct BlockRange {
  const Blocks& bl;
  Body& body;
  T* scratch;
  MEDFAST_HOST_DEVICE void loop(int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      int64_t b, x0;
      int nv;
      bl.locate(i, b, x0, nv);
      body(b, x0, nv, scratch);
    }
  }
  void run(int64_t i0, int64_t i1) { loop(i0, i1); }
  MEDFAST_AVX2 void run_avx2(int64_t i0, int64_t i1) { loop(i0, i1); }
  void run(bool avx2, int64_t i0, int64_t i1) { avx2 ? run_avx2(i0, i1) : run(i0, i1); }
};

// (B, C, kStats) sums: body(b, x0, nv, acc, range, scratch) adds block (b, x0, nv) into acc, the
// (C, kStats) sums of batch b of the caller's chunk, and its out-of-range labels into range (the chunk's;
// merged into *range_out). scratch holds `scratch_per_voxel` x kBlock.
template <typename T, typename Body>
Tensor sum_blocks(const Tensor& logits, const Blocks& bl, int64_t scratch_per_voxel, Body body,
                  LabelRange* range_out = nullptr) {
  const int64_t chunks = std::clamp<int64_t>(std::min<int64_t>(at::get_num_threads(), bl.total / 16), 1, 64);
  const int64_t stride = bl.B * bl.C * kStats;
  std::vector<double> part(static_cast<size_t>(chunks * stride), 0.0);
  std::vector<LabelRange> ranges(static_cast<size_t>(chunks));
  const bool avx2 = cpu_simd_available();
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    std::vector<T> scratch(static_cast<size_t>(scratch_per_voxel * kBlock));
    for (int64_t k = k0; k < k1; ++k) {
      double* acc = part.data() + k * stride;
      LabelRange range;  // on this thread's stack (the chunks' entries share cache lines)
      auto chunk_body = [&body, &bl, acc, &range](int64_t b, int64_t x0, int nv, T* e) MEDFAST_INLINE_LAMBDA {
        body(b, x0, nv, acc + b * bl.C * kStats, range, e);
      };
      BlockRange<T, decltype(chunk_body)>{bl, chunk_body, scratch.data()}.run(
          avx2, bl.total * k / chunks, bl.total * (k + 1) / chunks);
      ranges[k] = range;
    }
  });
  if (range_out != nullptr)
    for (const LabelRange& r : ranges) range_out->merge(r);
  Tensor out = at::zeros({bl.B, bl.C, kStats}, logits.options().dtype(at::kDouble));
  double* o = out.mutable_data_ptr<double>();
  for (int64_t k = 0; k < chunks; ++k)
    for (int64_t j = 0; j < stride; ++j) o[j] += part[k * stride + j];
  return out.to(stats_dtype(logits.scalar_type()));
}

// body(b, x0, nv, scratch) for every block, in parallel (the gradient: no reduction).
template <typename T, typename Body>
void for_blocks(const Blocks& bl, int64_t scratch_per_voxel, Body body) {
  const bool avx2 = cpu_simd_available();
  at::parallel_for(0, bl.total, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(static_cast<size_t>(scratch_per_voxel * kBlock));
    BlockRange<T, Body>{bl, body, scratch.data()}.run(avx2, begin, end);
  });
}

const double* weights(const Tensor& weight) { return weight.defined() ? weight.const_data_ptr<double>() : nullptr; }

Tensor as_double(const OptTensor& weight) {
  return weight ? weight->contiguous().to(at::kDouble) : Tensor();
}

// The block of finalize_kernel (loss_kernels.cuh) on one CPU thread: the kFinalizeThreads threads'
// partial sums one after another, then the same tree. sums[k * kFinalizeThreads]: the block's sum k.
template <typename T>
void finalize_block_sums(const Finalize<T>& f, T* sums) {
  constexpr int nt = kFinalizeThreads;
  for (int t = 0; t < nt; ++t) finalize_partial(f, t, nt, Strided<T>{sums + t, nt});
  for (int half = nt / 2; half > 0; half /= 2)
    for (int t = 0; t < half; ++t) finalize_combine(Strided<T>{sums + t, nt}, Strided<T>{sums + t + half, nt});
}

}  // namespace

// Channels-last logits (cs = 1, vs = C): the block's nv voxels are gathered into buf[c * kBlock + v],
// the layout the arithmetic reads (a block at a time: no copy of the logits; the same values, so the same
// results bitwise). Returns the block's logits and sets cs; contiguous logits are read in place.
template <typename S>
MEDFAST_HOST_DEVICE const S* block_logits(const S* z, const LogitsLayout& l, int64_t C, int64_t N, int64_t b,
                                          int64_t x0, int nv, S* buf, int64_t& cs) {
  if (!l.channels_last) {
    cs = N;
    return z + b * C * N + x0;
  }
  const S* src = z + (b * N + x0) * C;
  for (int v = 0; v < nv; ++v)
    for (int64_t c = 0; c < C; ++c) buf[c * kBlock + v] = src[v * C + c];
  cs = kBlock;
  return buf;
}

std::tuple<Tensor, Tensor> softmax_stats_cpu(const Tensor& logits_in, const Tensor& labels_in,
                                             const OptTensor& weight_in, std::optional<int64_t> ignore_index,
                                             bool ce) {
  const LogitsLayout l = logits_layout(logits_in);
  const Tensor& logits = l.t;
  const Tensor labels = label_tensor(labels_in);
  const Tensor weight = as_double(weight_in);
  const Blocks bl(logits);
  const int64_t C = bl.C, N = bl.N;
  const LabelRule rule = label_rule(C, ignore_index);
  const double* w = weights(weight);
  Tensor out;
  LabelRange range;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "medfast_softmax_stats", [&] {
    using T = compute_t<scalar_t>;
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    with_labels(labels, [&](const auto* y) {
      out = sum_blocks<T>(
          logits, bl, C + 2 + (l.channels_last ? C : 0),  // + the gathered block (S is never wider than T)
          [&](int64_t b, int64_t x0, int nv, double* acc, LabelRange& r, T* e) MEDFAST_INLINE_LAMBDA {
            const int64_t v0 = b * N + x0;
            int64_t cs;
            const scalar_t* zb = block_logits(z, l, C, N, b, x0, nv, reinterpret_cast<scalar_t*>(e + (C + 2) * kBlock),
                                              cs);
            stats_block(zb, C, cs, y + v0, rule, ce, w ? w + v0 : nullptr, nv, acc, e, e + C * kBlock,
                        e + (C + 1) * kBlock, r);
          },
          &range);
    });
  });
  return {out, range_tensor(range, C, logits)};
}

Tensor softmax_stats_backward_cpu(const Tensor& grad_stats, const Tensor& logits_in, const Tensor& labels_in,
                                  const OptTensor& weight_in, std::optional<int64_t> ignore_index) {
  const LogitsLayout l = logits_layout(logits_in);
  const Tensor& logits = l.t;
  const Tensor labels = label_tensor(labels_in);
  const Tensor weight = as_double(weight_in), g = grad_stats.to(at::kDouble).contiguous();
  const Blocks bl(logits);
  const int64_t C = bl.C, N = bl.N;
  const LabelRule rule = label_rule(C, ignore_index);
  Tensor grad = grad_like(l);
  const double* w = weights(weight);
  const double* gs = g.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "medfast_softmax_stats_bwd", [&] {
    using T = compute_t<scalar_t>;
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    scalar_t* gz = grad.mutable_data_ptr<scalar_t>();
    with_labels(labels, [&](const auto* y) {
      for_blocks<T>(bl, C + 4 + (l.channels_last ? 2 * C : 0),  // + the gathered block and its gradient
                    [&](int64_t b, int64_t x0, int nv, T* e) MEDFAST_INLINE_LAMBDA {
        const int64_t v0 = b * N + x0;
        scalar_t* buf = reinterpret_cast<scalar_t*>(e + (C + 4) * kBlock);
        int64_t cs;
        const scalar_t* zb = block_logits(z, l, C, N, b, x0, nv, buf, cs);
        // channels-last: the block's gradient in buf's second half, then scattered to the logits' layout
        scalar_t* gb = l.channels_last ? buf + C * kBlock : gz + b * C * N + x0;
        stats_backward_block(zb, C, cs, y + v0, rule, w ? w + v0 : nullptr, nv, gs + b * C * kStats, gb, e,
                             e + C * kBlock, e + (C + 1) * kBlock, e + (C + 2) * kBlock);
        if (l.channels_last) {
          scalar_t* dst = gz + (b * N + x0) * C;
          for (int v = 0; v < nv; ++v)
            for (int64_t c = 0; c < C; ++c) dst[v * C + c] = gb[c * kBlock + v];
        }
      });
    });
  });
  return grad;
}

// Sigmoid targets: the classes are independent, so each (batch, class) row of the logits is a batch
// element of its own with one class (blocks of one row stream through two arrays, the logits and the
// target, not 2 C rows at a time), in blocks of kRowBlock voxels (the sigmoid loops use no scratch).
// Voxel weights stay per batch element: row r takes those of r / C.
static Blocks soft_blocks(const Tensor& logits, bool sigmoid) {
  if (!sigmoid) return Blocks(logits);
  const int64_t rows = logits.size(0) * logits.size(1);
  return Blocks(logits.view({rows, 1, rows > 0 ? logits.numel() / rows : 0}), kRowBlock);
}

Tensor soft_stats_cpu(const Tensor& logits_in, const Tensor& target_in, const OptTensor& weight_in, bool sigmoid,
                      bool ce) {
  const Tensor logits = logits_in.contiguous(), target = target_in.contiguous().to(logits.scalar_type());
  const Tensor weight = as_double(weight_in);
  const int64_t C = logits.size(1);
  const Blocks bl = soft_blocks(logits, sigmoid);
  const int64_t N = bl.N, rows = bl.C;  // rows: the classes of a block
  const double* w = weights(weight);
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "medfast_soft_stats", [&] {
    using T = compute_t<scalar_t>;
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const scalar_t* t = target.const_data_ptr<scalar_t>();
    // Four loops, each compiled for its case (sigmoid or softmax, with or without the CE term).
    auto sums = [&](auto sig, auto with_ce) {
      constexpr bool kSigmoid = decltype(sig)::value, kCe = decltype(with_ce)::value;
      return sum_blocks<T>(logits, bl, rows + 2,
                           [&](int64_t b, int64_t x0, int nv, double* acc, LabelRange&, T* e) MEDFAST_INLINE_LAMBDA {
        const int64_t off = b * rows * N + x0;
        if constexpr (kSigmoid) {
          const double* wv = w ? w + b / C * N + x0 : nullptr;
          soft_stats_block<true, kCe>(z + off, t + off, 1, N, wv, nv, acc, e, e + kBlock, e + 2 * kBlock);
        } else {
          const double* wv = w ? w + b * N + x0 : nullptr;
          soft_stats_block<false, kCe>(z + off, t + off, C, N, wv, nv, acc, e, e + C * kBlock, e + (C + 1) * kBlock);
        }
      });
    };
    using Yes = std::true_type;
    using No = std::false_type;
    out = sigmoid ? (ce ? sums(Yes{}, Yes{}) : sums(Yes{}, No{})) : (ce ? sums(No{}, Yes{}) : sums(No{}, No{}));
  });
  return out.view({logits.size(0), C, kStats});
}

Tensor soft_stats_backward_cpu(const Tensor& grad_stats, const Tensor& logits_in, const Tensor& target_in,
                               const OptTensor& weight_in, bool sigmoid) {
  const Tensor logits = logits_in.contiguous(), target = target_in.contiguous().to(logits.scalar_type());
  const Tensor weight = as_double(weight_in), g = grad_stats.to(at::kDouble).contiguous();
  const int64_t C = logits.size(1);
  const Blocks bl = soft_blocks(logits, sigmoid);
  const int64_t N = bl.N, rows = bl.C;
  Tensor grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
  const double* w = weights(weight);
  const double* gs = g.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "medfast_soft_stats_bwd", [&] {
    using T = compute_t<scalar_t>;
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const scalar_t* t = target.const_data_ptr<scalar_t>();
    scalar_t* gz = grad.mutable_data_ptr<scalar_t>();
    for_blocks<T>(bl, rows + 3, [&](int64_t b, int64_t x0, int nv, T* e) MEDFAST_INLINE_LAMBDA {
      const int64_t off = b * rows * N + x0;
      if (sigmoid) {
        const double* wv = w ? w + b / C * N + x0 : nullptr;
        soft_stats_backward_block<true>(z + off, t + off, 1, N, wv, nv, gs + b * kStats, gz + off, e, e + kBlock,
                                        e + 2 * kBlock, e + 3 * kBlock);
      } else {
        const double* wv = w ? w + b * N + x0 : nullptr;
        soft_stats_backward_block<false>(z + off, t + off, C, N, wv, nv, gs + b * C * kStats, gz + off, e,
                                         e + C * kBlock, e + (C + 1) * kBlock, e + (C + 2) * kBlock);
      }
    });
  });
  return grad;
}

Tensor loss_finalize_cpu(const Tensor& stats, const OptTensor& class_weight, const OptTensor& divisor,
                         const FinalizeOptions& o) {
  const FinalizeInputs in(stats, class_weight, divisor);
  Tensor out = at::empty({}, in.stats.options());
  AT_DISPATCH_FLOATING_TYPES(in.stats.scalar_type(), "medfast_loss_finalize", [&] {
    const Finalize<scalar_t> f = in.args<scalar_t>(o);
    scalar_t sums[kFinalizeSums * kFinalizeThreads];
    finalize_block_sums(f, sums);
    *out.mutable_data_ptr<scalar_t>() = finalize_value(f, sums[0], sums[kFinalizeThreads], sums[2 * kFinalizeThreads]);
  });
  return out;
}

Tensor loss_finalize_backward_cpu(const Tensor& grad, const Tensor& stats, const OptTensor& class_weight,
                                  const OptTensor& divisor, const FinalizeOptions& o) {
  const FinalizeInputs in(stats, class_weight, divisor);
  Tensor out = at::empty_like(in.stats, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(in.stats.scalar_type(), "medfast_loss_finalize_backward", [&] {
    const Finalize<scalar_t> f = in.args<scalar_t>(o);
    const scalar_t g = grad.item<scalar_t>();
    scalar_t sums[kFinalizeSums * kFinalizeThreads];
    finalize_block_sums(f.without_dice(), sums);
    scalar_t* gs = out.mutable_data_ptr<scalar_t>();
    for (int64_t j = 0; j < f.B * f.C; ++j)
      finalize_grad_entry(f, g, sums[kFinalizeThreads], sums[2 * kFinalizeThreads], j / f.C, j % f.C,
                          gs + j * kStats);
  });
  return out;
}

}  // namespace medfast::loss

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
// results bitwise). Returns the block's logits and sets cs; contiguous logits are read in place. Soft
// targets, in the logits' layout (target_like), are read the same way.
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

// The gradient of a block (gb, from block_grad) into the logits' layout: scattered back for channels-last.
template <typename S>
MEDFAST_HOST_DEVICE S* block_grad(S* gz, const LogitsLayout& l, int64_t C, int64_t N, int64_t b, int64_t x0, S* buf) {
  return l.channels_last ? buf : gz + b * C * N + x0;
}
template <typename S>
MEDFAST_HOST_DEVICE void store_block_grad(S* gz, const LogitsLayout& l, int64_t C, int64_t N, int64_t b, int64_t x0,
                                          int nv, const S* gb) {
  if (!l.channels_last) return;  // written in place
  S* dst = gz + (b * N + x0) * C;
  for (int v = 0; v < nv; ++v)
    for (int64_t c = 0; c < C; ++c) dst[v * C + c] = gb[c * kBlock + v];
}

std::tuple<Tensor, Tensor> softmax_stats_cpu(const Tensor& logits_in, const Tensor& labels_in,
                                             const OptTensor& weight_in, std::optional<int64_t> ignore_index,
                                             bool ce) {
  const LogitsLayout l = logits_layout(logits_in);
  const Tensor& logits = l.t;
  const Tensor labels = label_tensor(labels_in);
  const AnyLabels y = any_labels(labels);
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
    out = sum_blocks<T>(
        logits, bl, C + 3 + (l.channels_last ? C : 0),  // + the gathered block (S is never wider than T)
        [&](int64_t b, int64_t x0, int nv, double* acc, LabelRange& r, T* e) MEDFAST_INLINE_LAMBDA {
          const int64_t v0 = b * N + x0;
          int64_t yb[kBlock];  // the block's labels as int64 (AnyLabels::block; int64 ones in place)
          int64_t cs;
          const scalar_t* zb = block_logits(z, l, C, N, b, x0, nv, reinterpret_cast<scalar_t*>(e + (C + 3) * kBlock),
                                            cs);
          stats_block(zb, C, cs, y.block(v0, nv, yb), rule, ce, w ? w + v0 : nullptr, nv, acc, e, e + C * kBlock,
                      e + (C + 1) * kBlock, e + (C + 2) * kBlock, r);
        },
        &range);
  });
  return {out, range_tensor(range, C, logits)};
}

Tensor softmax_stats_backward_cpu(const Tensor& grad_stats, const Tensor& logits_in, const Tensor& labels_in,
                                  const OptTensor& weight_in, std::optional<int64_t> ignore_index) {
  const LogitsLayout l = logits_layout(logits_in);
  const Tensor& logits = l.t;
  const Tensor labels = label_tensor(labels_in);
  const AnyLabels y = any_labels(labels);
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
    for_blocks<T>(bl, C + 4 + (l.channels_last ? 2 * C : 0),  // + the gathered block and its gradient
                  [&](int64_t b, int64_t x0, int nv, T* e) MEDFAST_INLINE_LAMBDA {
      const int64_t v0 = b * N + x0;
      int64_t yb[kBlock];
      scalar_t* buf = reinterpret_cast<scalar_t*>(e + (C + 4) * kBlock);
      int64_t cs;
      const scalar_t* zb = block_logits(z, l, C, N, b, x0, nv, buf, cs);
      // channels-last: the block's gradient in buf's second half, then scattered to the logits' layout
      scalar_t* gb = block_grad(gz, l, C, N, b, x0, buf + C * kBlock);
      stats_backward_block(zb, C, cs, y.block(v0, nv, yb), rule, w ? w + v0 : nullptr, nv, gs + b * C * kStats, gb,
                           e, e + C * kBlock, e + (C + 1) * kBlock, e + (C + 2) * kBlock);
      store_block_grad(gz, l, C, N, b, x0, nv, gb);
    });
  });
  return grad;
}

// Sigmoid targets, contiguous: the classes are independent, so each (batch, class) row of the logits is a
// batch element of its own with one class (blocks of one row stream through two arrays, the logits and
// the target, not 2 C rows at a time), in blocks of kRowBlock voxels (the sigmoid loops use no scratch).
// Voxel weights stay per batch element: row r takes those of r / C. Channels-last logits (and targets)
// go in blocks of all classes, gathered (SoftIo): kBlock voxels for softmax, as contiguous ones; kRowBlock
// for sigmoid, so that each class's block sums are the rows' (the contiguous results bitwise, on one
// thread; the chunks of several threads split the blocks elsewhere).
static Blocks soft_blocks(const Tensor& logits, bool sigmoid, bool channels_last) {
  if (!sigmoid) return Blocks(logits);
  if (channels_last) return Blocks(logits, kRowBlock);
  const int64_t rows = logits.size(0) * logits.size(1);
  return Blocks(logits.view({rows, 1, rows > 0 ? logits.numel() / rows : 0}), kRowBlock);
}

// The soft-target loops are compiled for R = float and double only (each is four loops, times two ISAs,
// times weighted or not: most of this file's code): float16 / bfloat16 logits and targets are converted to
// float a block at a time (the values the loops converted on every read: the same results bitwise), and
// their gradient converted back. SoftIo reads a block of `rows` rows of nv voxels (row r at p[r * cs],
// or channels-last at p[v * C + r]) as R: float32 / double contiguous in place, else into buf[r * len + v].
// The target has its own type (target_dtype: the logits' or R, so a float32 target of half logits is read
// as it is, never rounded to their 8 or 11 bits).
// (always inlined, as the block bodies: compiled into their AVX2 copies too)
#define MEDFAST_INLINE inline __attribute__((always_inline))
template <typename R>
struct SoftIo {
  const void* z;
  const void* t;
  void* gz;
  at::ScalarType type, ttype;  // of the logits (and their gradient), of the target
  bool cl;
  int64_t C, N, rows, len;
  template <typename S>
  MEDFAST_INLINE static const R* gather(const S* src, bool cl, int64_t C, int64_t rows, int64_t cs, int nv, int64_t len, R* buf) {
    if (cl) {  // (a row at a time: contiguous stores; over the classes of a voxel, few classes ran slowly)
      for (int64_t r = 0; r < rows; ++r)
        for (int v = 0; v < nv; ++v) buf[r * len + v] = static_cast<R>(src[v * C + r]);
    } else {
      for (int64_t r = 0; r < rows; ++r)
        for (int v = 0; v < nv; ++v) buf[r * len + v] = static_cast<R>(src[r * cs + v]);
    }
    return buf;
  }
  // Offset of block (b, x0): b is a batch element (cl) or a row of the contiguous (B C, 1, N) view.
  MEDFAST_INLINE int64_t offset(int64_t b, int64_t x0) const { return cl ? (b * N + x0) * C : b * rows * N + x0; }
  // The block of p (the logits, or the targets: of type ptype) as R; cs is set to its class stride, one for
  // both (the loops read them with one stride): in place where the logits are (contiguous float32 / double
  // logits, whose targets are of their type: target_dtype), else gathered (and converted) into buf.
  MEDFAST_INLINE const R* read(const void* p, at::ScalarType ptype, int64_t b, int64_t x0, int nv, R* buf,
                               int64_t& cs) const {
    const int64_t off = offset(b, x0);
    if (in_place()) {
      cs = N;
      return static_cast<const R*>(p) + off;
    }
    cs = len;
    if constexpr (!std::is_same_v<R, double>) {
      if (ptype == at::kHalf) return gather(static_cast<const at::Half*>(p) + off, cl, C, rows, N, nv, len, buf);
      if (ptype == at::kBFloat16)
        return gather(static_cast<const at::BFloat16*>(p) + off, cl, C, rows, N, nv, len, buf);
    }
    return gather(static_cast<const R*>(p) + off, cl, C, rows, N, nv, len, buf);
  }
  MEDFAST_INLINE bool in_place() const { return !cl && (std::is_same_v<R, double> || type == at::kFloat); }
  // Where the block's gradient goes (class stride: the one read() gave): in place, or buf.
  MEDFAST_INLINE R* grad_block(int64_t b, int64_t x0, R* buf) const {
    return in_place() ? static_cast<R*>(gz) + offset(b, x0) : buf;
  }
  template <typename S>
  MEDFAST_INLINE void scatter(const R* g, int64_t b, int64_t x0, int nv) const {
    S* dst = static_cast<S*>(gz) + offset(b, x0);
    if (cl) {
      for (int64_t r = 0; r < rows; ++r)
        for (int v = 0; v < nv; ++v) dst[v * C + r] = static_cast<S>(g[r * len + v]);
    } else {
      for (int64_t r = 0; r < rows; ++r)
        for (int v = 0; v < nv; ++v) dst[r * N + v] = static_cast<S>(g[r * len + v]);
    }
  }
  // The block's gradient from grad_block into the logits' gradient (converted, and scattered for channels-last).
  MEDFAST_INLINE void store_grad(const R* g, int64_t b, int64_t x0, int nv) const {
    if (in_place()) return;
    if constexpr (std::is_same_v<R, double>) {
      scatter<double>(g, b, x0, nv);
    } else {
      if (type == at::kHalf) scatter<at::Half>(g, b, x0, nv);
      else if (type == at::kBFloat16) scatter<at::BFloat16>(g, b, x0, nv);
      else scatter<float>(g, b, x0, nv);
    }
  }
};

// f(R{}) with R = double for double logits, else float (SoftIo converts float16 / bfloat16).
template <typename F>
void dispatch_soft(at::ScalarType type, F&& f) {
  TORCH_CHECK_TYPE(type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16,
                   "medfast soft_stats: logits must be floating, got ", type);
  if (type == at::kDouble)
    f(double{});
  else
    f(float{});
}

Tensor soft_stats_cpu(const Tensor& logits_in, const Tensor& target_in, const OptTensor& weight_in, bool sigmoid,
                      bool ce) {
  const LogitsLayout l = logits_layout(logits_in);
  const Tensor& logits = l.t;
  const Tensor target = target_like(target_in, l);
  const Tensor weight = as_double(weight_in);
  const int64_t C = logits.size(1);
  const bool cl = l.channels_last;
  const Blocks bl = soft_blocks(logits, sigmoid, cl);
  const int64_t N = bl.N, rows = bl.C;  // rows: the classes of a block
  const bool row_view = sigmoid && !cl;  // blocks of one (batch, class) row
  const double* w = weights(weight);
  Tensor out;
  dispatch_soft(logits.scalar_type(), [&](auto zero) {
    using T = decltype(zero);  // (R of SoftIo: the compute type)
    const SoftIo<T> io{logits.const_data_ptr(), target.const_data_ptr(), nullptr, logits.scalar_type(),
                       target.scalar_type(), cl, C, N, rows, bl.len};
    // scratch: the softmax's (rows + 2) x kBlock, then the logits' and targets' blocks (rows x len each)
    const int64_t buf0 = (rows + 2) * kBlock, buf_len = rows * bl.len;
    // Four loops, each compiled for its case (sigmoid or softmax, with or without the CE term).
    auto sums = [&](auto sig, auto with_ce) {
      constexpr bool kSigmoid = decltype(sig)::value, kCe = decltype(with_ce)::value;
      return sum_blocks<T>(logits, bl, (buf0 + 2 * buf_len) / kBlock,
                           [&](int64_t b, int64_t x0, int nv, double* acc, LabelRange&, T* e) MEDFAST_INLINE_LAMBDA {
        int64_t cs;
        const T* zb = io.read(io.z, io.type, b, x0, nv, e + buf0, cs);
        const T* tb = io.read(io.t, io.ttype, b, x0, nv, e + buf0 + buf_len, cs);
        // voxel weights per batch element (a row of the contiguous sigmoid's view is one class of one)
        const double* wv = w ? w + (row_view ? b / C : b) * N + x0 : nullptr;
        soft_stats_block<kSigmoid, kCe>(zb, tb, rows, cs, wv, nv, acc, e, e + rows * kBlock, e + (rows + 1) * kBlock);
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
  const LogitsLayout l = logits_layout(logits_in);
  const Tensor& logits = l.t;
  const Tensor target = target_like(target_in, l);
  const Tensor weight = as_double(weight_in), g = grad_stats.to(at::kDouble).contiguous();
  const int64_t C = logits.size(1);
  const bool cl = l.channels_last;
  const Blocks bl = soft_blocks(logits, sigmoid, cl);
  const int64_t N = bl.N, rows = bl.C;
  const bool row_view = sigmoid && !cl;
  Tensor grad = grad_like(l);
  const double* w = weights(weight);
  const double* gs = g.const_data_ptr<double>();
  dispatch_soft(logits.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    const SoftIo<T> io{logits.const_data_ptr(), target.const_data_ptr(), grad.mutable_data_ptr(), logits.scalar_type(),
                       target.scalar_type(), cl, C, N, rows, bl.len};
    // scratch: the softmax's (rows + 3) x kBlock, then the blocks of the logits, targets and gradient
    const int64_t buf0 = (rows + 3) * kBlock, buf_len = rows * bl.len;
    for_blocks<T>(bl, (buf0 + 3 * buf_len) / kBlock, [&](int64_t b, int64_t x0, int nv, T* e) MEDFAST_INLINE_LAMBDA {
      int64_t cs;
      const T* zb = io.read(io.z, io.type, b, x0, nv, e + buf0, cs);
      const T* tb = io.read(io.t, io.ttype, b, x0, nv, e + buf0 + buf_len, cs);
      T* gb = io.grad_block(b, x0, e + buf0 + 2 * buf_len);
      const double* wv = w ? w + (row_view ? b / C : b) * N + x0 : nullptr;
      const double* gsb = gs + b * rows * kStats;
      if (sigmoid)
        soft_stats_backward_block<true>(zb, tb, rows, cs, wv, nv, gsb, gb, e, e + rows * kBlock,
                                        e + (rows + 1) * kBlock, e + (rows + 2) * kBlock);
      else
        soft_stats_backward_block<false>(zb, tb, rows, cs, wv, nv, gsb, gb, e, e + rows * kBlock,
                                         e + (rows + 1) * kBlock, e + (rows + 2) * kBlock);
      io.store_grad(gb, b, x0, nv);
    });
  });
  return grad;
}

Tensor loss_finalize_cpu(const Tensor& stats, const OptTensor& class_weight, const OptTensor& divisor,
                         const OptTensor& bad_labels, const FinalizeOptions& o) {
  const FinalizeInputs in(stats, class_weight, divisor, bad_labels);
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
                                  const OptTensor& divisor, const OptTensor& bad_labels, const FinalizeOptions& o) {
  const FinalizeInputs in(stats, class_weight, divisor, bad_labels);
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

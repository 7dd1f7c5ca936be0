// The CUDA kernels of the fused segmentation losses (csrc/loss/loss_kernels.cuh: the class sums and
// their gradient, for label, soft-softmax and soft-sigmoid targets; the finishing op finalize_kernel and
// its backward) on the CPU under the launch emulation of simt.h, as a C library for
// tests/test_simt_loss.py (ctypes): the same kernel source as the CUDA build, instantiated as
// loss_cuda.cu instantiates it (logits float32 / float64 / float16 / bfloat16 with a float or double
// compute type, labels uint8 / int32 / int64, the ignore index, ce, contiguous or channels-last logits)
// and launched with the launcher's geometry (threads from the shared-memory plan, blocks and chunks from
// the multiprocessor count given here), the blocks' partial sums added on the host in double as the
// launcher's at::sum does; checked against the CPU op.
#include "simt.h"
// (simt.h first: the kernels' CUDA names must exist before the header is parsed)
#include "loss/loss_kernels.cuh"

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

using namespace medfast::loss;

namespace {

enum Kind { kLabels = 0, kSoftmax = 1, kSigmoid = 2 };

// geometry: threads, blocks (per batch element for the sums, in all for the gradient), chunk (sums;
// 0 for the gradient), shared-memory bytes per block.
template <typename T>
bool fits(int64_t values_per_thread, int64_t optin, int& threads, size_t& smem) {
  const int64_t per_thread = values_per_thread * int64_t(sizeof(T));
  threads = plan_threads(per_thread);
  smem = static_cast<size_t>(threads * per_thread);
  return threads * per_thread <= std::max(kDefaultSharedBytes, optin);
}

// The blocks' partial sums (B, blocks, n) added on the host in double, as the launcher's at::sum does.
template <typename T>
void finish_sums(const std::vector<T>& partial, int64_t B, int64_t blocks, int64_t n, T* out) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0.0;
      for (int64_t x = 0; x < blocks; ++x) s += static_cast<double>(partial[(b * blocks + x) * n + j]);
      out[b * n + j] = static_cast<T>(s);
    }
}

template <typename T, typename Voxel>
int sums(const Voxel& voxel, int64_t B, int64_t sms, int64_t optin, T* out, int64_t* geometry) {
  const int64_t C = voxel.C, N = voxel.N, n = C * kStats;
  int threads;
  size_t smem;
  if (!fits<T>(sums_values_per_thread(C), optin, threads, smem)) return 1;
  const int64_t blocks = sum_blocks_per_batch(B, N, threads, sms), chunk = sum_chunk(N, blocks);
  std::vector<T> partial(static_cast<size_t>(B * blocks * n), std::numeric_limits<T>::quiet_NaN());
  simt::launch({static_cast<unsigned>(blocks), static_cast<unsigned>(B), 1}, threads, smem,
               [&] { sums_kernel<T, Voxel>(voxel, chunk, partial.data()); });
  finish_sums(partial, B, blocks, n, out);
  const int64_t geo[4] = {threads, blocks, chunk, static_cast<int64_t>(smem)};
  for (int k = 0; k < 4; ++k) geometry[k] = geo[k];
  return 0;
}

// The class-transposed label sums (MEDFAST_LOSS_CUDA_SUMS=warp), with the launcher's geometry.
template <typename S, typename T>
int sums_warp(const LabelVoxel<S, T>& voxel, int64_t B, int64_t sms, int64_t optin, T* out, int64_t* geometry) {
  const int64_t C = voxel.C, N = voxel.N, n = C * kStats;
  const int threads = plan_label_threads(C, sizeof(T));
  const int64_t bytes = label_warp_values(threads, C) * int64_t(sizeof(T));
  if (bytes > std::max(kDefaultSharedBytes, optin)) return 1;
  const int64_t blocks = sum_blocks_per_batch(B, N, threads, sms), chunk = sum_chunk(N, blocks);
  std::vector<T> partial(static_cast<size_t>(B * blocks * n), std::numeric_limits<T>::quiet_NaN());
  simt::launch({static_cast<unsigned>(blocks), static_cast<unsigned>(B), 1}, threads, static_cast<size_t>(bytes),
               [&] { label_sums_warp_kernel<S, T>(voxel, chunk, partial.data()); });
  finish_sums(partial, B, blocks, n, out);
  const int64_t geo[4] = {threads, blocks, chunk, bytes};
  for (int k = 0; k < 4; ++k) geometry[k] = geo[k];
  return 0;
}

template <typename T, typename Voxel>
int grad(const Voxel& voxel, int64_t B, int64_t sms, int64_t optin, int64_t* geometry) {
  int threads;
  size_t smem;
  if (!fits<T>(grad_values_per_thread(voxel.C), optin, threads, smem)) return 1;
  const int64_t total = B * voxel.N, blocks = grad_blocks(total, threads, sms);
  simt::launch({static_cast<unsigned>(blocks), 1, 1}, threads, smem, [&] { grad_kernel<T, Voxel>(voxel, total); });
  const int64_t geo[4] = {threads, blocks, 0, static_cast<int64_t>(smem)};
  for (int k = 0; k < 4; ++k) geometry[k] = geo[k];
  return 0;
}

// bfloat16 as c10::BFloat16 stores it (the upper half of a float) and converts it (round to nearest even;
// NaN stays NaN), for the launcher's kBFloat16 instantiations. at::Half is _Float16 here (IEEE binary16,
// conversions rounded to nearest even, as c10::Half's and __float2half's), where the compiler has it
// (GCC 12+, Clang on x86-64; emu_loss answers 3 otherwise).
struct BFloat16 {
  uint16_t bits;
  BFloat16() = default;
  BFloat16(float f) {  // NOLINT: implicit, as c10::BFloat16's
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    bits = f != f ? uint16_t(0x7fc0) : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  operator float() const {
    const uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
};
static_assert(sizeof(BFloat16) == 2);
#ifdef __FLT16_MAX__
static_assert(sizeof(_Float16) == 2);
#endif

// The launcher's per-voxel compute type (loss_cuda.cu compute_t): double for double logits, else float.
template <typename S>
using compute_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

// One emulated launch, as loss_cuda.cu makes it. The fields are int64 (a ctypes array from the test):
// what: 0 the sums (sums_kernel), 1 the gradient (grad_kernel), 2 the class-transposed label sums
// (label_sums_warp_kernel, MEDFAST_LOSS_CUDA_SUMS=warp); kind: Kind; dtype of the logits: 0 float32,
// 1 float64, 2 float16, 3 bfloat16; labels: 0 uint8, 1 int32, 2 int64 (AnyLabels); channels_last: the logits
// (soft targets, the gradient) at z[b C N + x C + c];
// ignore index (has_ignore, ignore); ce: the cross-entropy sums (the gradient kernels take ce = true, as the
// launcher's); B, C, N; sms, optin: the device's multiprocessors and opt-in shared memory; target_dtype: the
// soft targets' dtype (codes as dtype): the logits' or their compute type (loss_launch.h target_dtype).
struct Config {
  int64_t what, kind, dtype, labels, channels_last, has_ignore, ignore, ce, B, C, N, sms, optin, target_dtype;
};
enum What { kSumsKernel = 0, kGradKernel = 1, kWarpSumsKernel = 2 };

// The pointers of a launch: logits z (S), labels (L) or soft targets (S), voxel weights and the gradients of
// the sums (T, as the launcher converts them; null for none), out: sums (B, C, kStats) of T or the
// gradient in the logits' layout (S); range (2,): the LabelRange buffer, zeros to start.
struct Buffers {
  const void *z, *target, *w, *g;
  void* out;
  long long* range;
};

template <typename S, typename T>
int run_labels(const Config& c, const Buffers& p, int64_t* geometry) {
  if (c.labels < 0 || c.labels > 2) return 2;
  const int64_t cs = c.channels_last ? 1 : c.N, vs = c.channels_last ? c.C : 1;
  const LabelRule rule{c.C, c.has_ignore ? c.ignore : 0, c.has_ignore != 0};
  const S* z = static_cast<const S*>(p.z);
  const AnyLabels y{p.target, static_cast<int>(c.labels)};  // (Config's label codes are AnyLabels::Kind's)
  const T* w = static_cast<const T*>(p.w);
  if (c.what == kGradKernel)
    return grad<T>(LabelVoxel<S, T>{z, y, w, static_cast<const T*>(p.g), static_cast<S*>(p.out), c.C, c.N, cs, vs,
                                    rule, true, nullptr},
                   c.B, c.sms, c.optin, geometry);
  const LabelVoxel<S, T> voxel{z, y, w, nullptr, nullptr, c.C, c.N, cs, vs, rule, c.ce != 0, p.range};
  T* out = static_cast<T*>(p.out);
  return c.what == kWarpSumsKernel ? sums_warp<S, T>(voxel, c.B, c.sms, c.optin, out, geometry)
                                   : sums<T>(voxel, c.B, c.sms, c.optin, out, geometry);
}

template <typename S, typename T, bool SIGMOID, typename U>
int run_soft(const Config& c, const Buffers& p, int64_t* geometry) {
  if (c.what == kWarpSumsKernel) return 2;  // no such launch
  const int64_t cs = c.channels_last ? 1 : c.N, vs = c.channels_last ? c.C : 1;  // targets in the logits' layout
  const S* z = static_cast<const S*>(p.z);
  const U* t = static_cast<const U*>(p.target);
  const T* w = static_cast<const T*>(p.w);
  if (c.what == kGradKernel)  // (the gradient does not depend on CE: one instantiation, as the launcher's)
    return grad<T>(SoftVoxel<SIGMOID, true, S, T, U>{z, t, w, static_cast<const T*>(p.g), static_cast<S*>(p.out),
                                                    c.C, c.N, cs, vs},
                   c.B, c.sms, c.optin, geometry);
  T* out = static_cast<T*>(p.out);
  return c.ce ? sums<T>(SoftVoxel<SIGMOID, true, S, T, U>{z, t, w, nullptr, nullptr, c.C, c.N, cs, vs}, c.B, c.sms,
                        c.optin, out, geometry)
              : sums<T>(SoftVoxel<SIGMOID, false, S, T, U>{z, t, w, nullptr, nullptr, c.C, c.N, cs, vs}, c.B, c.sms,
                        c.optin, out, geometry);
}

// The soft targets' type as the launcher picks it (loss_cuda.cu dispatch_target): the logits' S, or the
// compute type T (dtype codes 0 float32, 1 float64) when it differs from S.
template <typename S, typename T, bool SIGMOID>
int run_soft(const Config& c, const Buffers& p, int64_t* geometry) {
  if (c.target_dtype == c.dtype) return run_soft<S, T, SIGMOID, S>(c, p, geometry);
  if (!std::is_same_v<S, T> && c.target_dtype == (std::is_same_v<T, double> ? 1 : 0))
    return run_soft<S, T, SIGMOID, T>(c, p, geometry);
  return 2;
}

template <typename S>
int run(const Config& c, const Buffers& p, int64_t* geometry) {
  using T = compute_t<S>;
  if (c.kind == kLabels) return run_labels<S, T>(c, p, geometry);
  if (c.kind == kSoftmax) return run_soft<S, T, false>(c, p, geometry);
  if (c.kind == kSigmoid) return run_soft<S, T, true>(c, p, geometry);
  return 2;
}

// The finishing op as loss_cuda.cu launches it: one block of kFinalizeThreads threads with
// kFinalizeSums values of T each in shared memory; the loss into out[0] and, given the upstream gradient
// g (one value), the gradient w.r.t. stats (B, C, kStats) into grad. bad: the (2,) label-range report or null.
template <typename T>
void finalize(const T* stats, const T* cw, const T* divisor, const int64_t* bad, int64_t B, int64_t C,
              const double* scalars, int64_t flags, const T* g, T* out, T* grad) {
  const Finalize<T> f = finalize_args<T>(stats, cw, divisor, bad, B, C, scalars, flags);
  const size_t smem = size_t(kFinalizeSums) * kFinalizeThreads * sizeof(T);
  simt::launch({1, 1, 1}, kFinalizeThreads, smem, [&] { finalize_kernel<T>(f, out); });
  if (g != nullptr)
    simt::launch({1, 1, 1}, kFinalizeThreads, smem, [&] { finalize_backward_kernel<T>(f, g, grad); });
}

// A check of the emulation itself, not of medfast: block sums of in (gridDim.y, gridDim.x, n) through
// warp shuffles, dynamic shared memory (one value per warp) and __syncthreads, as a two-level
// reduction; out (gridDim.y, gridDim.x).
__global__ void block_sum_kernel(const double* in, int64_t n, double* out) {
  MEDFAST_DYNAMIC_SHARED(smem_raw);
  double* per_warp = reinterpret_cast<double*>(smem_raw);
  const int64_t blk = int64_t(blockIdx.y) * gridDim.x + blockIdx.x;
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += in[blk * n + i];
  for (int d = 16; d > 0; d /= 2) s += __shfl_down_sync(0xffffffffu, s, d);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) per_warp[warp] = s;
  __syncthreads();
  if (warp == 0) {
    double v = lane < warps ? per_warp[lane] : 0.0;
    for (int d = 16; d > 0; d /= 2) v += __shfl_xor_sync(0xffffffffu, v, d);
    if (lane == 0) out[blk] = v;
  }
}

// Misuses the emulation must stop at (abort with a message), as a GPU would hang or misbehave: 0 a
// lane of the second warp returns before a shuffle, 1 a thread returns before __syncthreads, 2 half a
// warp waits at __syncthreads while the other half shuffles, 3 a write one byte past the dynamic shared
// memory; anything else runs correctly.
__global__ void misuse_kernel(int mode) {
  MEDFAST_DYNAMIC_SHARED(smem);
  if (mode == 0 && threadIdx.x == 40) return;
  if (mode == 1 && threadIdx.x == 63 && blockIdx.x == 1) return;
  if (mode == 2 && threadIdx.x < 16) {
    __syncthreads();
    return;
  }
  if (mode == 3 && threadIdx.x == 5) smem[64] = 1;
  if (mode != 1) (void)__shfl_down_sync(0xffffffffu, 1.0, 1);
  __syncthreads();
}

}  // namespace

extern "C" {
// cfg: the 14 fields of Config; geometry (6,): threads, blocks, chunk (0 for the gradient), shared-memory
// bytes, then the label range the sums kernels reported (LabelRange: lo, bad hi). Returns 0, 1 where the
// launcher would refuse (shared memory past max(48 KiB, optin)), 2 for a launch the launcher never makes,
// 3 for float16 with a compiler without _Float16.
int emu_loss(const int64_t* cfg, const void* z, const void* target, const void* w, const void* g, void* out,
             int64_t* geometry) {
  Config c;
  std::memcpy(&c, cfg, sizeof(c));
  long long range[2] = {0, 0};
  const Buffers p{z, target, w, g, out, c.what == kGradKernel ? nullptr : range};
  int rc = 2;
  if (c.dtype == 0) rc = run<float>(c, p, geometry);
  if (c.dtype == 1) rc = run<double>(c, p, geometry);
#ifdef __FLT16_MAX__
  if (c.dtype == 2) rc = run<_Float16>(c, p, geometry);
#else
  if (c.dtype == 2) rc = 3;
#endif
  if (c.dtype == 3) rc = run<BFloat16>(c, p, geometry);
  geometry[4] = range[0];
  geometry[5] = range[1];
  return rc;
}
void emu_loss_finalize_f32(const float* stats, const float* cw, const float* divisor, const int64_t* bad, int64_t B,
                           int64_t C, const double* scalars, int64_t flags, const float* g, float* out, float* grad) {
  finalize<float>(stats, cw, divisor, bad, B, C, scalars, flags, g, out, grad);
}
void emu_loss_finalize_f64(const double* stats, const double* cw, const double* divisor, const int64_t* bad,
                           int64_t B, int64_t C, const double* scalars, int64_t flags, const double* g, double* out,
                           double* grad) {
  finalize<double>(stats, cw, divisor, bad, B, C, scalars, flags, g, out, grad);
}
void emu_simt_block_sum(int threads, int gx, int gy, const double* in, int64_t n, double* out) {
  simt::launch({static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1}, threads, (threads / 32) * sizeof(double),
               [&] { block_sum_kernel(in, n, out); });
}
void emu_simt_misuse(int mode) {
  simt::launch({2, 1, 1}, 64, 64, [&] { misuse_kernel(mode); });
}
// What a block reads from dynamic shared memory it has not written (the emulation's fill: NaN).
double emu_simt_unwritten_shared() {
  double out = 0.0;
  simt::launch({1, 1, 1}, 32, 64, [&] {
    MEDFAST_DYNAMIC_SHARED(smem);
    if (threadIdx.x == 3) std::memcpy(&out, smem + 8, sizeof(double));
  });
  return out;
}
}

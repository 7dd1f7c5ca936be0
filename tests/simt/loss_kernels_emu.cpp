// The CUDA kernels of the fused segmentation losses (csrc/loss/loss_kernels.cuh: the class sums and
// their gradient, for label, soft-softmax and soft-sigmoid targets; the finishing op finalize_kernel and
// its backward) on the CPU under the launch
// emulation of simt.h, as a C library for tests/test_simt_loss.py (ctypes): the same kernel source as
// the CUDA build, launched with the launcher's geometry (threads from the shared-memory plan, blocks and
// chunks from the multiprocessor count given here), the blocks' partial sums added on the host in
// double as the launcher's at::sum does; checked against the CPU op.
#include "simt.h"
// (simt.h first: the kernels' CUDA names must exist before the header is parsed)
#include "loss/loss_kernels.cuh"

#include <cstdint>
#include <limits>
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
template <typename T>
int sums_warp(const LabelVoxel<T, T, int64_t>& voxel, int64_t B, int64_t sms, int64_t optin, T* out, int64_t* geometry) {
  const int64_t C = voxel.C, N = voxel.N, n = C * kStats;
  const int threads = plan_label_threads(C, sizeof(T));
  const int64_t bytes = label_warp_values(threads, C) * int64_t(sizeof(T));
  if (bytes > std::max(kDefaultSharedBytes, optin)) return 1;
  const int64_t blocks = sum_blocks_per_batch(B, N, threads, sms), chunk = sum_chunk(N, blocks);
  std::vector<T> partial(static_cast<size_t>(B * blocks * n), std::numeric_limits<T>::quiet_NaN());
  simt::launch({static_cast<unsigned>(blocks), static_cast<unsigned>(B), 1}, threads, static_cast<size_t>(bytes),
               [&] { label_sums_warp_kernel<T, T, int64_t>(voxel, chunk, partial.data()); });
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

// z (B, C, N); target: labels (B, N) int64 (-1 or >= C: left out; no ignore index) for kLabels, else
// (B, C, N) of T; w (B, N) or null; g (B, C, kStats) gradients of the sums (backward) or null; gz (B, C, N)
// or null. range (2,): the labels' LabelRange (kLabels sums), zeros to start, as the launcher's.
template <typename T>
int run(bool backward, int kind, const T* z, const void* target, const T* w, const T* g, int64_t B, int64_t C,
        int64_t N, int64_t sms, int64_t optin, T* out, int64_t* geometry, long long* range) {
  auto go = [&](const auto& voxel) {
    using Voxel = std::remove_cv_t<std::remove_reference_t<decltype(voxel)>>;
    return backward ? grad<T, Voxel>(voxel, B, sms, optin, geometry)
                    : sums<T, Voxel>(voxel, B, sms, optin, out, geometry);
  };
  T* gz = backward ? out : nullptr;
  const T* t = static_cast<const T*>(target);
  if (kind == kLabels)
    return go(LabelVoxel<T, T, int64_t>{z, static_cast<const int64_t*>(target), w, g, gz, C, N, N, 1,
                                        LabelRule{C, 0, false}, true, range});
  if (kind == kSoftmax) return go(SoftVoxel<false, true, T, T>{z, t, w, g, gz, C, N});
  if (kind == kSigmoid) return go(SoftVoxel<true, true, T, T>{z, t, w, g, gz, C, N});
  return 2;
}

// The finishing op as loss_cuda.cu launches it: one block of kFinalizeThreads threads with
// kFinalizeSums values of T each in shared memory; the loss into out[0] and, given the upstream gradient
// g (one value), the gradient w.r.t. stats (B, C, kStats) into grad.
template <typename T>
void finalize(const T* stats, const T* cw, const T* divisor, int64_t B, int64_t C, const double* scalars,
              int64_t flags, const T* g, T* out, T* grad) {
  const Finalize<T> f = finalize_args<T>(stats, cw, divisor, B, C, scalars, flags);
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
// The label range goes to the last slot of geometry (geometry[4], geometry[5]).
int emu_loss_sums_f32(int kind, const float* z, const void* target, const float* w, int64_t B, int64_t C, int64_t N,
                      int64_t sms, int64_t optin, float* stats, int64_t* geometry) {
  long long range[2] = {0, 0};
  const int rc = run<float>(false, kind, z, target, w, nullptr, B, C, N, sms, optin, stats, geometry, range);
  geometry[4] = range[0];
  geometry[5] = range[1];
  return rc;
}
int emu_loss_sums_f64(int kind, const double* z, const void* target, const double* w, int64_t B, int64_t C, int64_t N,
                      int64_t sms, int64_t optin, double* stats, int64_t* geometry) {
  long long range[2] = {0, 0};
  const int rc = run<double>(false, kind, z, target, w, nullptr, B, C, N, sms, optin, stats, geometry, range);
  geometry[4] = range[0];
  geometry[5] = range[1];
  return rc;
}
int emu_loss_grad_f32(int kind, const float* z, const void* target, const float* w, const float* g, int64_t B,
                      int64_t C, int64_t N, int64_t sms, int64_t optin, float* gz, int64_t* geometry) {
  return run<float>(true, kind, z, target, w, g, B, C, N, sms, optin, gz, geometry, nullptr);
}
int emu_loss_grad_f64(int kind, const double* z, const void* target, const double* w, const double* g, int64_t B,
                      int64_t C, int64_t N, int64_t sms, int64_t optin, double* gz, int64_t* geometry) {
  return run<double>(true, kind, z, target, w, g, B, C, N, sms, optin, gz, geometry, nullptr);
}
int emu_loss_sums_warp_f32(const float* z, const int64_t* y, const float* w, int64_t B, int64_t C, int64_t N,
                           int64_t sms, int64_t optin, float* stats, int64_t* geometry) {
  long long range[2] = {0, 0};
  const int rc = sums_warp<float>(
      LabelVoxel<float, float, int64_t>{z, y, w, nullptr, nullptr, C, N, N, 1, LabelRule{C, 0, false}, true, range}, B,
      sms, optin, stats, geometry);
  geometry[4] = range[0];
  geometry[5] = range[1];
  return rc;
}
int emu_loss_sums_warp_f64(const double* z, const int64_t* y, const double* w, int64_t B, int64_t C, int64_t N,
                           int64_t sms, int64_t optin, double* stats, int64_t* geometry) {
  long long range[2] = {0, 0};
  const int rc = sums_warp<double>(
      LabelVoxel<double, double, int64_t>{z, y, w, nullptr, nullptr, C, N, N, 1, LabelRule{C, 0, false}, true, range},
      B, sms, optin, stats, geometry);
  geometry[4] = range[0];
  geometry[5] = range[1];
  return rc;
}
void emu_loss_finalize_f32(const float* stats, const float* cw, const float* divisor, int64_t B, int64_t C,
                           const double* scalars, int64_t flags, const float* g, float* out, float* grad) {
  finalize<float>(stats, cw, divisor, B, C, scalars, flags, g, out, grad);
}
void emu_loss_finalize_f64(const double* stats, const double* cw, const double* divisor, int64_t B, int64_t C,
                           const double* scalars, int64_t flags, const double* g, double* out, double* grad) {
  finalize<double>(stats, cw, divisor, B, C, scalars, flags, g, out, grad);
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

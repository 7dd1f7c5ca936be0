// The CUDA kernels of the fused segmentation-loss sums and their gradient (arithmetic in loss.h), kept
// apart from the launcher (loss_cuda.cu) so that tests/simt can run the same code on the CPU (blocks,
// threads, __syncthreads and shared memory emulated by fibers on one host thread) against the CPU op.
// Needs: __global__ / __device__, threadIdx / blockIdx / blockDim / gridDim, __syncthreads and
// MEDFAST_DYNAMIC_SHARED (CUDA, or tests/simt/simt.h). The launch geometry (threads per block, blocks
// and chunks of the sums) is host arithmetic here too, so that the emulation launches as the GPU does.
//
// One voxel per thread. Per-thread scratch (softmax of the voxel) and per-thread class sums live in
// shared memory, interleaved across the block's threads (loss.h's Strided view). Each sums block adds
// a fixed range of one batch element's voxels, reduces its threads' sums in a fixed order and writes
// them to its own slot; the launcher adds the slots. No atomics: bitwise reproducible run to run.
#pragma once
#include <algorithm>
#include <cstdint>

#include "common/launch_geometry.h"
#include "common/macros.h"
#include "loss/finalize.h"
#include "loss/loss.h"

namespace medfast::loss {

// ---- Launch geometry (host) ----

constexpr int64_t kDefaultSharedBytes = 48 * 1024;  // dynamic shared memory without the opt-in
constexpr int kMaxThreads = 256;

// Values of the compute type each thread keeps in shared memory: the sums kernel C x kStats sums and
// C + 2 scratch (exp per class, max, denominator); the gradient kernel C + 4 scratch.
constexpr int64_t sums_values_per_thread(int64_t C) { return C * kStats + C + 2; }
constexpr int64_t grad_values_per_thread(int64_t C) { return C + 4; }

// The largest block (<= 256 threads, >= 32) whose shared memory fits in the default 48 KiB; past that,
// 32 threads (the launcher then asks for the device's opt-in maximum, or refuses).
inline int plan_threads(int64_t per_thread_bytes) {
  int threads = kMaxThreads;
  while (threads > 32 && threads * per_thread_bytes > kDefaultSharedBytes) threads /= 2;
  return threads;
}

// Blocks per batch element for the sums (grid (blocks, B)): enough to fill the GPU's `sms`
// multiprocessors, each block at least one voxel per thread.
inline int64_t sum_blocks_per_batch(int64_t B, int64_t N, int threads, int64_t sms) {
  const int64_t want = std::max<int64_t>(1, sms * 8 / std::max<int64_t>(1, B));
  return std::clamp<int64_t>((N + threads - 1) / threads, 1, want);
}

// Voxels per sums block: block x of a batch element sums voxels [x chunk, min(N, (x + 1) chunk)).
inline int64_t sum_chunk(int64_t N, int64_t blocks) { return (N + blocks - 1) / blocks; }

// Blocks of the gradient kernel (grid-stride over all B N voxels).
inline int64_t grad_blocks(int64_t total, int threads, int64_t sms) { return grid_blocks_for(total, threads, sms); }

// ---- Kernels ----

// Reduces the block's per-thread sums (smem[j * nt + i]: value j of thread i) in a fixed order and
// writes them to the block's slot of partial (gridDim.y, gridDim.x, n).
template <typename T>
__device__ void store_block_sums(const T* smem, int64_t n, T* partial) {
  __syncthreads();
  const int nt = blockDim.x;
  T* out = partial + (int64_t(blockIdx.y) * gridDim.x + blockIdx.x) * n;
  for (int64_t j = threadIdx.x; j < n; j += nt) {
    T s = T(0);
    for (int i = 0; i < nt; ++i) s += smem[j * nt + i];  // fixed order: deterministic
    out[j] = s;
  }
}

// The per-voxel work of each target kind, as device functors over one voxel x of batch element b:
// sum(b, x, acc, e, range) adds the voxel to the thread's class sums (and its label, if out of range, to
// the thread's range); report(range) adds a thread's range to the call's, once at the end; grad(b, x, i, e)
// writes its gradient (i = b N + x). Scratch e: C + 2 (sums) or C + 4 (gradients) entries.
//
// Labels uint8, int32 or int64, their type known at run time (AnyLabels: one instantiation of each kernel for
// all label types; a thread reads its voxel's label once, as int64). Logits (and their gradient) at
// z[b C N + c cs + x vs]: contiguous (cs = N, vs = 1) or channels-last (cs = 1, vs = C; a thread reads its
// voxel's C adjacent values).
template <typename S, typename T>
struct LabelVoxel {
  const S* z;
  AnyLabels y;
  const T* w;
  const T* g;  // gradients of the sums (backward only)
  S* gz;
  int64_t C, N, cs, vs;
  LabelRule rule;
  bool ce;             // the cross-entropy sums (else E stays 0)
  long long* range;    // (2,) the call's LabelRange, zeros at the start (sums only)
  __device__ void sum(int64_t b, int64_t x, Strided<T> acc, Strided<T> e, LabelRange& r) const {
    const int64_t v = b * N + x, label = y[v];
    // (lse: not read for one voxel)
    stats_block(z + b * C * N + x * vs, C, cs, &label, rule, ce, w ? w + v : nullptr, 1, acc, e, e + C, e + C + 1,
                e + C + 1, r);
  }
  // Integer atomics, and only for bad labels (none in a good call): deterministic, and no contention.
  __device__ void report(const LabelRange& r) const {
    if (r.lo < 0) atomicMin(range, static_cast<long long>(r.lo));
    if (r.hi >= C) atomicMax(range + 1, static_cast<long long>(r.hi));
  }
  __device__ void grad(int64_t b, int64_t x, int64_t i, Strided<T> e) const {
    const int64_t off = b * C * N + x * vs, label = y[i];
    stats_backward_block(z + off, C, cs, &label, rule, w ? w + i : nullptr, 1, g + b * C * kStats, gz + off, e, e + C,
                         e + C + 1, e + C + 2);
  }
};

// CE = false: E stays 0 (no logarithms). Logits, targets (the same layout) and the gradient at
// z[b C N + c cs + x vs], as LabelVoxel's. Targets of type U: the logits' S, or the compute type T (a float32
// target of half logits: loss_launch.h target_dtype).
template <bool SIGMOID, bool CE, typename S, typename T, typename U = S>
struct SoftVoxel {
  const S* z;
  const U* tg;
  const T* w;
  const T* g;
  S* gz;
  int64_t C, N, cs, vs;
  __device__ void sum(int64_t b, int64_t x, Strided<T> acc, Strided<T> e, LabelRange&) const {
    const int64_t off = b * C * N + x * vs;
    soft_stats_block<SIGMOID, CE>(z + off, tg + off, C, cs, w ? w + b * N + x : nullptr, 1, acc, e, e + C, e + C + 1);
  }
  __device__ void report(const LabelRange&) const {}
  __device__ void grad(int64_t b, int64_t x, int64_t i, Strided<T> e) const {
    const int64_t off = b * C * N + x * vs;
    soft_stats_backward_block<SIGMOID>(z + off, tg + off, C, cs, w ? w + i : nullptr, 1, g + b * C * kStats, gz + off,
                                       e, e + C, e + C + 1, e + C + 2);
  }
};

// Sums: grid (blocks per batch element, B); block x of batch b sums voxels [x chunk, (x+1) chunk).
// Shared memory: sums_values_per_thread(C) values of T per thread.
template <typename T, typename Voxel>
__global__ void sums_kernel(const Voxel voxel, int64_t chunk, T* partial) {
  MEDFAST_DYNAMIC_SHARED(smem_raw);
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int64_t C = voxel.C, N = voxel.N;
  const int nt = blockDim.x, t = threadIdx.x;
  const Strided<T> acc{smem + t, nt}, e{smem + C * kStats * nt + t, nt};
  for (int64_t j = 0; j < C * kStats; ++j) acc[j] = T(0);
  const int64_t b = blockIdx.y, x1 = std::min<int64_t>(N, (blockIdx.x + 1) * chunk);
  LabelRange range;
  for (int64_t x = blockIdx.x * chunk + t; x < x1; x += nt) voxel.sum(b, x, acc, e, range);
  voxel.report(range);
  store_block_sums(smem, C * kStats, partial);
}

// ---- Class-transposed label sums (the default; MEDFAST_LOSS_CUDA_SUMS=thread selects sums_kernel) ----
// sums_kernel keeps 4 C sums per thread in shared memory (5 C + 2 values a thread): at C = 16 a block
// has 128 threads, at C = 64 only 32, and few blocks fit a multiprocessor. Here a thread keeps one
// voxel's row (C + 4 values, label_voxel_row), and the sums are per warp: each round every thread
// writes its voxel's row, then lane j of each warp adds the warp's 32 rows, in lane order, for its
// classes j, j + 32, ... Rows have an odd pitch, so both the row writes (32 threads, one class) and
// the class reads (32 lanes, one row) touch 32 different banks. No atomics: deterministic.
constexpr int64_t label_row_pitch(int64_t C) { return (C + 4) | 1; }
constexpr int64_t label_warp_values(int64_t threads, int64_t C) {
  return threads * label_row_pitch(C) + threads / 32 * C * kStats;
}

// The largest block (<= 256 threads, >= 32) whose shared memory fits in the default 48 KiB.
inline int plan_label_threads(int64_t C, int64_t itemsize) {
  int threads = kMaxThreads;
  while (threads > 32 && label_warp_values(threads, C) * itemsize > kDefaultSharedBytes) threads /= 2;
  return threads;
}

// Grid (blocks per batch element, B) as sums_kernel; block x of batch b sums voxels [x chunk,
// (x+1) chunk) in rounds of blockDim.x voxels. Shared memory: label_warp_values(blockDim.x, C).
template <typename S, typename T>
__global__ void label_sums_warp_kernel(const LabelVoxel<S, T> v, int64_t chunk, T* partial) {
  MEDFAST_DYNAMIC_SHARED(smem_raw);
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int64_t C = v.C, N = v.N, pitch = label_row_pitch(C);
  const int nt = blockDim.x, t = threadIdx.x, lane = t % 32, warp = t / 32, warps = nt / 32;
  T* wsum = smem + nt * pitch;  // (warps, C, kStats)
  for (int64_t j = t; j < warps * C * kStats; j += nt) wsum[j] = T(0);
  const int64_t b = blockIdx.y, x0 = blockIdx.x * chunk, x1 = std::min<int64_t>(N, x0 + chunk);
  const int64_t rounds = x1 > x0 ? (x1 - x0 + nt - 1) / nt : 0;  // the same for every thread
  const Strided<T> row{smem + t * pitch, 1};
  LabelRange range;
  for (int64_t r = 0; r < rounds; ++r) {
    const int64_t x = x0 + r * nt + t;
    const bool active = x < x1;
    const int64_t xi = active ? x : x0;  // an in-range address for the pointers of an inactive thread
    const int64_t label = v.y[b * N + xi];
    label_voxel_row(v.z + b * C * N + xi * v.vs, C, v.cs, &label, v.rule, v.ce, v.w ? v.w + b * N + xi : nullptr,
                    active, row, range);
    __syncthreads();
    const T* rows = smem + int64_t(warp) * 32 * pitch;
    for (int64_t c = lane; c < C; c += 32) {
      T si = T(0), sp = T(0), sg = T(0), se = T(0);
      for (int i = 0; i < 32; ++i) {
        const T* ri = rows + i * pitch;
        const T wd = ri[C + 1];
        if (wd == T(0)) continue;  // left out (or weight 0: adds nothing)
        const T p = ri[c] * wd;
        sp += p;
        if (ri[C + 2] == static_cast<T>(c)) {
          si += p;
          sg += ri[C + 3];
          se += ri[C];
        }
      }
      T* ws = wsum + (int64_t(warp) * C + c) * kStats;
      ws[0] += si;
      ws[1] += sp;
      ws[2] += sg;
      ws[3] += se;
    }
    __syncthreads();  // the rows are rewritten next round
  }
  v.report(range);
  __syncthreads();
  T* out = partial + (int64_t(blockIdx.y) * gridDim.x + blockIdx.x) * C * kStats;
  for (int64_t j = t; j < C * kStats; j += nt) {
    T s = T(0);
    for (int k = 0; k < warps; ++k) s += wsum[int64_t(k) * C * kStats + j];  // fixed order
    out[j] = s;
  }
}

// Gradients: one voxel per thread, grid-stride over all B x N voxels. Shared memory:
// grad_values_per_thread(C) values of T per thread.
template <typename T, typename Voxel>
__global__ void grad_kernel(const Voxel voxel, int64_t total) {
  MEDFAST_DYNAMIC_SHARED(smem_raw);
  const Strided<T> e{reinterpret_cast<T*>(smem_raw) + threadIdx.x, blockDim.x};
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / voxel.N;
    voxel.grad(b, i - b * voxel.N, i, e);
  }
}

// ---- The finishing arithmetic (finalize.h): one block of kFinalizeThreads ----
// Shared memory: kFinalizeSums values of T per thread (sums[k * nt + t]). Thread t adds entries t, t + nt,
// ... (finalize_partial), the tree adds the threads' sums (thread t < half takes thread t + half's), in
// the order the CPU launcher (loss_cpu.cpp finalize_block_sums) follows. No atomics: deterministic.
template <typename T>
__device__ void finalize_block_sums(const Finalize<T>& f, T* sums) {
  const int nt = blockDim.x, t = threadIdx.x;
  finalize_partial(f, t, nt, Strided<T>{sums + t, nt});
  for (int half = nt / 2; half > 0; half /= 2) {
    __syncthreads();
    if (t < half) finalize_combine(Strided<T>{sums + t, nt}, Strided<T>{sums + t + half, nt});
  }
  __syncthreads();
}

// The scalar loss into out[0]. One block of kFinalizeThreads threads.
template <typename T>
__global__ void finalize_kernel(const Finalize<T> f, T* out) {
  MEDFAST_DYNAMIC_SHARED(smem_raw);
  T* sums = reinterpret_cast<T*>(smem_raw);
  finalize_block_sums(f, sums);
  if (threadIdx.x == 0) out[0] = finalize_value(f, sums[0], sums[blockDim.x], sums[2 * blockDim.x]);
}

// The gradient w.r.t. the sums, grad_stats (B, C, kStats), from the upstream gradient g[0]. One block of
// kFinalizeThreads threads: the CE sums as finalize_kernel has them, then a thread per (b, c) entry.
template <typename T>
__global__ void finalize_backward_kernel(const Finalize<T> f, const T* g, T* grad_stats) {
  MEDFAST_DYNAMIC_SHARED(smem_raw);
  T* sums = reinterpret_cast<T*>(smem_raw);
  finalize_block_sums(f.without_dice(), sums);
  const T nll_sum = sums[blockDim.x], truth_sum = sums[2 * blockDim.x], gv = g[0];
  for (int64_t j = threadIdx.x; j < f.B * f.C; j += blockDim.x)
    finalize_grad_entry(f, gv, nll_sum, truth_sum, j / f.C, j % f.C, grad_stats + j * kStats);
}

}  // namespace medfast::loss

// CUDA launcher of the fused segmentation-loss sums (arithmetic in loss.h): one voxel per thread.
// Per-thread scratch (softmax of the voxel) and per-thread class sums live in shared memory,
// interleaved across the block's threads (loss.h's Strided view). Each block sums a fixed range of
// one batch element's voxels, reduces its threads' sums in a fixed order and writes them to its own
// slot; the slots are added by at::sum. No atomics: bitwise reproducible run to run.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <type_traits>

#include "common/cuda_launch.h"
#include "loss/loss_launch.h"

namespace medfast::loss {
namespace {

// Per-voxel compute and accumulation type: float, or double for double logits.
template <typename S>
using compute_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

struct Plan {
  int threads;
  size_t smem;
};

// The largest block (<= 256 threads, >= 32) whose shared memory fits in the default 48 KiB; past
// that, 32 threads with the device's opt-in maximum. Too many classes for even that: a clear error.
Plan plan(int64_t per_thread_bytes, int64_t C, const char* op) {
  constexpr int64_t kDefault = 48 * 1024;
  int threads = 256;
  while (threads > 32 && threads * per_thread_bytes > kDefault) threads /= 2;
  const int64_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK_VALUE(threads * per_thread_bytes <= std::max(kDefault, optin), "medfast ", op, ": C = ", C,
                    " classes need ", threads * per_thread_bytes,
                    " bytes of shared memory per block on the GPU, more than this device's ", optin,
                    "; use fewer classes per call or the CPU");
  return {threads, static_cast<size_t>(threads * per_thread_bytes)};
}

template <typename Kernel>
void allow_smem(Kernel kernel, size_t smem) {
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
}

// Sum kernels: grid (blocks per batch element, B); block x of batch b sums voxels [x chunk, (x+1) chunk).
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

template <typename S, typename T>
__global__ void softmax_stats_kernel(const S* z, const int64_t* y, const T* w, int64_t C, int64_t N, int64_t chunk,
                                     T* partial) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int nt = blockDim.x, t = threadIdx.x;
  const Strided<T> acc{smem + t, nt}, e{smem + C * kStats * nt + t, nt};
  for (int64_t j = 0; j < C * kStats; ++j) acc[j] = T(0);
  const int64_t b = blockIdx.y, x1 = std::min<int64_t>(N, (blockIdx.x + 1) * chunk);
  for (int64_t x = blockIdx.x * chunk + t; x < x1; x += nt) {
    const int64_t v = b * N + x;
    stats_block(z + b * C * N + x, C, N, y + v, w ? w + v : nullptr, 1, acc, e, e + C, e + C + 1);
  }
  store_block_sums(smem, C * kStats, partial);
}

template <bool SIGMOID, typename S, typename T>
__global__ void soft_stats_kernel(const S* z, const S* tg, const T* w, int64_t C, int64_t N, int64_t chunk,
                                  T* partial) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int nt = blockDim.x, t = threadIdx.x;
  const Strided<T> acc{smem + t, nt}, e{smem + C * kStats * nt + t, nt};
  for (int64_t j = 0; j < C * kStats; ++j) acc[j] = T(0);
  const int64_t b = blockIdx.y, x1 = std::min<int64_t>(N, (blockIdx.x + 1) * chunk);
  for (int64_t x = blockIdx.x * chunk + t; x < x1; x += nt) {
    const int64_t off = b * C * N + x;
    soft_stats_block<SIGMOID>(z + off, tg + off, C, N, w ? w + b * N + x : nullptr, 1, acc, e, e + C, e + C + 1);
  }
  store_block_sums(smem, C * kStats, partial);
}

// Gradient kernels: one voxel per thread, grid-stride over all B x N voxels; scratch C + 4 per thread.
template <typename S, typename T>
__global__ void softmax_stats_backward_kernel(const S* z, const int64_t* y, const T* w, const T* g, int64_t C,
                                              int64_t N, int64_t total, S* gz) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Strided<T> e{reinterpret_cast<T*>(smem_raw) + threadIdx.x, blockDim.x};
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / N, off = b * C * N + (i - b * N);
    stats_backward_block(z + off, C, N, y + i, w ? w + i : nullptr, 1, g + b * C * kStats, gz + off, e, e + C,
                         e + C + 1, e + C + 2);
  }
}

template <bool SIGMOID, typename S, typename T>
__global__ void soft_stats_backward_kernel(const S* z, const S* tg, const T* w, const T* g, int64_t C, int64_t N,
                                           int64_t total, S* gz) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Strided<T> e{reinterpret_cast<T*>(smem_raw) + threadIdx.x, blockDim.x};
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / N, off = b * C * N + (i - b * N);
    soft_stats_backward_block<SIGMOID>(z + off, tg + off, C, N, w ? w + i : nullptr, 1, g + b * C * kStats, gz + off,
                                       e, e + C, e + C + 1, e + C + 2);
  }
}

struct Shape {
  int64_t B, C, N;
  explicit Shape(const Tensor& logits)
      : B(logits.size(0)), C(logits.size(1)), N(logits.numel() / std::max<int64_t>(1, B * C)) {}
};

// Blocks per batch element for the sums: enough to fill the GPU, each at least one voxel per thread.
int64_t sum_blocks(const Shape& s, int threads) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = std::max<int64_t>(1, sms * 8 / std::max<int64_t>(1, s.B));
  return std::clamp<int64_t>((s.N + threads - 1) / threads, 1, want);
}

Tensor weight_as(const OptTensor& weight, at::ScalarType dtype) {
  return weight ? weight->contiguous().to(dtype) : Tensor();
}

template <typename T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Adds the blocks' partial sums (B, blocks, C, kStats) in double, in a fixed order.
Tensor finish_sums(const Tensor& partial, at::ScalarType logits_dtype) {
  return partial.to(at::kDouble).sum(1).to(stats_dtype(logits_dtype));
}

}  // namespace

Tensor softmax_stats_cuda(const Tensor& logits_in, const Tensor& labels_in, const OptTensor& weight_in) {
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const Tensor logits = logits_in.contiguous(), labels = labels_in.contiguous().to(at::kLong);
  const Shape s(logits);
  TORCH_CHECK_VALUE(s.B <= 65535, "medfast softmax_stats: batch size ", s.B, " exceeds the CUDA grid limit 65535");
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "medfast_softmax_stats_cuda", [&] {
    using T = compute_t<scalar_t>;
    const Tensor weight = weight_as(weight_in, c10::CppTypeToScalarType<T>::value);
    const Plan p = plan((5 * s.C + 2) * int64_t(sizeof(T)), s.C, "softmax_stats");
    const int64_t blocks = sum_blocks(s, p.threads), chunk = (s.N + blocks - 1) / blocks;
    Tensor partial = at::empty({s.B, blocks, s.C, kStats}, logits.options().dtype(c10::CppTypeToScalarType<T>::value));
    auto kernel = softmax_stats_kernel<scalar_t, T>;
    allow_smem(kernel, p.smem);
    kernel<<<dim3(blocks, s.B), p.threads, p.smem, at::cuda::getCurrentCUDAStream()>>>(
        logits.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(), ptr_or_null<T>(weight), s.C, s.N, chunk,
        partial.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    out = finish_sums(partial, logits.scalar_type());
  });
  return out;
}

Tensor softmax_stats_backward_cuda(const Tensor& grad_stats, const Tensor& logits_in, const Tensor& labels_in,
                                   const OptTensor& weight_in) {
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const Tensor logits = logits_in.contiguous(), labels = labels_in.contiguous().to(at::kLong);
  const Shape s(logits);
  Tensor grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "medfast_softmax_stats_bwd_cuda",
                                  [&] {
    using T = compute_t<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<T>::value;
    const Tensor weight = weight_as(weight_in, acc), g = grad_stats.to(acc).contiguous();
    const Plan p = plan((s.C + 4) * int64_t(sizeof(T)), s.C, "softmax_stats_backward");
    auto kernel = softmax_stats_backward_kernel<scalar_t, T>;
    allow_smem(kernel, p.smem);
    const int64_t total = s.B * s.N;
    kernel<<<grid_blocks(total, p.threads), p.threads, p.smem, at::cuda::getCurrentCUDAStream()>>>(
        logits.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(), ptr_or_null<T>(weight),
        g.const_data_ptr<T>(), s.C, s.N, total, grad.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

Tensor soft_stats_cuda(const Tensor& logits_in, const Tensor& target_in, const OptTensor& weight_in, bool sigmoid) {
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const Tensor logits = logits_in.contiguous(), target = target_in.contiguous().to(logits.scalar_type());
  const Shape s(logits);
  TORCH_CHECK_VALUE(s.B <= 65535, "medfast soft_stats: batch size ", s.B, " exceeds the CUDA grid limit 65535");
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "medfast_soft_stats_cuda", [&] {
    using T = compute_t<scalar_t>;
    const Tensor weight = weight_as(weight_in, c10::CppTypeToScalarType<T>::value);
    const Plan p = plan((5 * s.C + 2) * int64_t(sizeof(T)), s.C, "soft_stats");
    const int64_t blocks = sum_blocks(s, p.threads), chunk = (s.N + blocks - 1) / blocks;
    Tensor partial = at::empty({s.B, blocks, s.C, kStats}, logits.options().dtype(c10::CppTypeToScalarType<T>::value));
    auto kernel = sigmoid ? soft_stats_kernel<true, scalar_t, T> : soft_stats_kernel<false, scalar_t, T>;
    allow_smem(kernel, p.smem);
    kernel<<<dim3(blocks, s.B), p.threads, p.smem, at::cuda::getCurrentCUDAStream()>>>(
        logits.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(), ptr_or_null<T>(weight), s.C, s.N,
        chunk, partial.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    out = finish_sums(partial, logits.scalar_type());
  });
  return out;
}

Tensor soft_stats_backward_cuda(const Tensor& grad_stats, const Tensor& logits_in, const Tensor& target_in,
                                const OptTensor& weight_in, bool sigmoid) {
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const Tensor logits = logits_in.contiguous(), target = target_in.contiguous().to(logits.scalar_type());
  const Shape s(logits);
  Tensor grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "medfast_soft_stats_bwd_cuda", [&] {
    using T = compute_t<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<T>::value;
    const Tensor weight = weight_as(weight_in, acc), g = grad_stats.to(acc).contiguous();
    const Plan p = plan((s.C + 4) * int64_t(sizeof(T)), s.C, "soft_stats_backward");
    auto kernel = sigmoid ? soft_stats_backward_kernel<true, scalar_t, T> : soft_stats_backward_kernel<false, scalar_t, T>;
    allow_smem(kernel, p.smem);
    const int64_t total = s.B * s.N;
    kernel<<<grid_blocks(total, p.threads), p.threads, p.smem, at::cuda::getCurrentCUDAStream()>>>(
        logits.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(), ptr_or_null<T>(weight),
        g.const_data_ptr<T>(), s.C, s.N, total, grad.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace medfast::loss

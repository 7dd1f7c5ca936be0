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

// The per-voxel work of each target kind, as device functors over one voxel x of batch element b:
// sum(b, x, acc, e) adds the voxel to the thread's class sums; grad(b, x, i, e) writes its gradient
// (i = b N + x). Scratch e: C + 2 (sums) or C + 4 (gradients) entries.
template <typename S, typename T>
struct LabelVoxel {
  const S* z;
  const int64_t* y;
  const T* w;
  const T* g;  // gradients of the sums (backward only)
  S* gz;
  int64_t C, N;
  __device__ void sum(int64_t b, int64_t x, Strided<T> acc, Strided<T> e) const {
    const int64_t v = b * N + x;
    stats_block(z + b * C * N + x, C, N, y + v, w ? w + v : nullptr, 1, acc, e, e + C, e + C + 1);
  }
  __device__ void grad(int64_t b, int64_t x, int64_t i, Strided<T> e) const {
    const int64_t off = b * C * N + x;
    stats_backward_block(z + off, C, N, y + i, w ? w + i : nullptr, 1, g + b * C * kStats, gz + off, e, e + C,
                         e + C + 1, e + C + 2);
  }
};

template <bool SIGMOID, typename S, typename T>
struct SoftVoxel {
  const S* z;
  const S* tg;
  const T* w;
  const T* g;
  S* gz;
  int64_t C, N;
  __device__ void sum(int64_t b, int64_t x, Strided<T> acc, Strided<T> e) const {
    const int64_t off = b * C * N + x;
    soft_stats_block<SIGMOID>(z + off, tg + off, C, N, w ? w + b * N + x : nullptr, 1, acc, e, e + C, e + C + 1);
  }
  __device__ void grad(int64_t b, int64_t x, int64_t i, Strided<T> e) const {
    const int64_t off = b * C * N + x;
    soft_stats_backward_block<SIGMOID>(z + off, tg + off, C, N, w ? w + i : nullptr, 1, g + b * C * kStats, gz + off,
                                       e, e + C, e + C + 1, e + C + 2);
  }
};

// Sums: grid (blocks per batch element, B); block x of batch b sums voxels [x chunk, (x+1) chunk).
template <typename T, typename Voxel>
__global__ void sums_kernel(const Voxel voxel, int64_t chunk, T* partial) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int64_t C = voxel.C, N = voxel.N;
  const int nt = blockDim.x, t = threadIdx.x;
  const Strided<T> acc{smem + t, nt}, e{smem + C * kStats * nt + t, nt};
  for (int64_t j = 0; j < C * kStats; ++j) acc[j] = T(0);
  const int64_t b = blockIdx.y, x1 = std::min<int64_t>(N, (blockIdx.x + 1) * chunk);
  for (int64_t x = blockIdx.x * chunk + t; x < x1; x += nt) voxel.sum(b, x, acc, e);
  store_block_sums(smem, C * kStats, partial);
}

// Gradients: one voxel per thread, grid-stride over all B x N voxels.
template <typename T, typename Voxel>
__global__ void grad_kernel(const Voxel voxel, int64_t total) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Strided<T> e{reinterpret_cast<T*>(smem_raw) + threadIdx.x, blockDim.x};
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / voxel.N;
    voxel.grad(b, i - b * voxel.N, i, e);
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

// (B, C, kStats) sums of `voxel` over every voxel, in the precision T.
template <typename T, typename Voxel>
Tensor launch_sums(const Voxel& voxel, const Shape& s, const Tensor& logits, const char* op) {
  TORCH_CHECK_VALUE(s.B <= 65535, "medfast ", op, ": batch size ", s.B, " exceeds the CUDA grid limit 65535");
  const Plan p = plan((5 * s.C + 2) * int64_t(sizeof(T)), s.C, op);
  const int64_t blocks = sum_blocks(s, p.threads), chunk = (s.N + blocks - 1) / blocks;
  Tensor partial = at::empty({s.B, blocks, s.C, kStats}, logits.options().dtype(c10::CppTypeToScalarType<T>::value));
  auto kernel = sums_kernel<T, Voxel>;
  allow_smem(kernel, p.smem);
  kernel<<<dim3(blocks, s.B), p.threads, p.smem, at::cuda::getCurrentCUDAStream()>>>(voxel, chunk,
                                                                                     partial.mutable_data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return finish_sums(partial, logits.scalar_type());
}

template <typename T, typename Voxel>
void launch_grad(const Voxel& voxel, const Shape& s, const char* op) {
  const Plan p = plan((s.C + 4) * int64_t(sizeof(T)), s.C, op);
  auto kernel = grad_kernel<T, Voxel>;
  allow_smem(kernel, p.smem);
  const int64_t total = s.B * s.N;
  kernel<<<grid_blocks(total, p.threads), p.threads, p.smem, at::cuda::getCurrentCUDAStream()>>>(voxel, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

Tensor softmax_stats_cuda(const Tensor& logits_in, const Tensor& labels_in, const OptTensor& weight_in) {
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const Tensor logits = logits_in.contiguous(), labels = labels_in.contiguous().to(at::kLong);
  const Shape s(logits);
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "medfast_softmax_stats_cuda", [&] {
    using T = compute_t<scalar_t>;
    const Tensor weight = weight_as(weight_in, c10::CppTypeToScalarType<T>::value);
    const LabelVoxel<scalar_t, T> voxel{logits.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(),
                                        ptr_or_null<T>(weight), nullptr, nullptr, s.C, s.N};
    out = launch_sums<T>(voxel, s, logits, "softmax_stats");
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
    const LabelVoxel<scalar_t, T> voxel{logits.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(),
                                        ptr_or_null<T>(weight), g.const_data_ptr<T>(),
                                        grad.mutable_data_ptr<scalar_t>(), s.C, s.N};
    launch_grad<T>(voxel, s, "softmax_stats_backward");
  });
  return grad;
}

Tensor soft_stats_cuda(const Tensor& logits_in, const Tensor& target_in, const OptTensor& weight_in, bool sigmoid) {
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const Tensor logits = logits_in.contiguous(), target = target_in.contiguous().to(logits.scalar_type());
  const Shape s(logits);
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "medfast_soft_stats_cuda", [&] {
    using T = compute_t<scalar_t>;
    const Tensor weight = weight_as(weight_in, c10::CppTypeToScalarType<T>::value);
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const scalar_t* t = target.const_data_ptr<scalar_t>();
    if (sigmoid)
      out = launch_sums<T>(SoftVoxel<true, scalar_t, T>{z, t, ptr_or_null<T>(weight), nullptr, nullptr, s.C, s.N}, s,
                           logits, "soft_stats");
    else
      out = launch_sums<T>(SoftVoxel<false, scalar_t, T>{z, t, ptr_or_null<T>(weight), nullptr, nullptr, s.C, s.N},
                           s, logits, "soft_stats");
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
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const scalar_t* t = target.const_data_ptr<scalar_t>();
    scalar_t* gz = grad.mutable_data_ptr<scalar_t>();
    if (sigmoid)
      launch_grad<T>(SoftVoxel<true, scalar_t, T>{z, t, ptr_or_null<T>(weight), g.const_data_ptr<T>(), gz, s.C, s.N},
                     s, "soft_stats_backward");
    else
      launch_grad<T>(SoftVoxel<false, scalar_t, T>{z, t, ptr_or_null<T>(weight), g.const_data_ptr<T>(), gz, s.C, s.N},
                     s, "soft_stats_backward");
  });
  return grad;
}

}  // namespace medfast::loss

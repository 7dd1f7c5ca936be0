// CUDA launcher of the fused segmentation-loss sums: the kernels, their functors and the launch
// geometry are in loss_kernels.cuh (arithmetic in loss.h); here the shared-memory plan and opt-in, the
// tensors and the final sum of the blocks' partial sums (at::sum, in a fixed order).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "common/cuda_launch.h"
#include "loss/loss_kernels.cuh"
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

// Threads from plan_threads (loss_kernels.cuh): the largest block (<= 256 threads, >= 32) whose shared
// memory fits in the default 48 KiB; past that, 32 threads with the device's opt-in maximum. Too many
// classes for even that: a clear error.
Plan plan(int64_t per_thread_bytes, int64_t C, const char* op) {
  const int threads = plan_threads(per_thread_bytes);
  const int64_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK_VALUE(threads * per_thread_bytes <= std::max(kDefaultSharedBytes, optin), "medfast ", op, ": C = ", C,
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

struct Shape {
  int64_t B, C, N;
  explicit Shape(const Tensor& logits)
      : B(logits.size(0)), C(logits.size(1)), N(logits.numel() / std::max<int64_t>(1, B * C)) {}
};

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
  if (s.B == 0) return at::zeros({0, s.C, kStats}, logits.options().dtype(stats_dtype(logits.scalar_type())));
  const Plan p = plan(sums_values_per_thread(s.C) * int64_t(sizeof(T)), s.C, op);
  const int64_t blocks = sum_blocks_per_batch(s.B, s.N, p.threads, sm_count()), chunk = sum_chunk(s.N, blocks);
  Tensor partial = at::empty({s.B, blocks, s.C, kStats}, logits.options().dtype(c10::CppTypeToScalarType<T>::value));
  auto kernel = sums_kernel<T, Voxel>;
  allow_smem(kernel, p.smem);
  kernel<<<dim3(blocks, s.B), p.threads, p.smem, at::cuda::getCurrentCUDAStream()>>>(voxel, chunk,
                                                                                     partial.mutable_data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return finish_sums(partial, logits.scalar_type());
}

// The label sums: the class-transposed label_sums_warp_kernel by default (a voxel row per thread and
// per-warp sums, so far more threads per multiprocessor at many classes). On an H200 (h200c_kernel_profile,
// Dice+CE fwd+bwd, B=2, 128^3) its kernels took 0.53 ms against sums_kernel's 0.62 at C=16 and 3.24 against
// 5.10 ms at C=64. MEDFAST_LOSS_CUDA_SUMS=thread selects sums_kernel.
bool warp_sums() {
  const char* v = std::getenv("MEDFAST_LOSS_CUDA_SUMS");
  return v == nullptr || std::strcmp(v, "thread") != 0;
}

template <typename S, typename T>
Tensor launch_label_sums_warp(const LabelVoxel<S, T>& voxel, const Shape& s, const Tensor& logits) {
  TORCH_CHECK_VALUE(s.B <= 65535, "medfast softmax_stats: batch size ", s.B, " exceeds the CUDA grid limit 65535");
  if (s.B == 0) return at::zeros({0, s.C, kStats}, logits.options().dtype(stats_dtype(logits.scalar_type())));
  const int threads = plan_label_threads(s.C, sizeof(T));
  const int64_t bytes = label_warp_values(threads, s.C) * int64_t(sizeof(T));
  const int64_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK_VALUE(bytes <= std::max(kDefaultSharedBytes, optin), "medfast softmax_stats: C = ", s.C,
                    " classes need ", bytes, " bytes of shared memory per block on the GPU, more than this device's ",
                    optin, "; use fewer classes per call or the CPU");
  const int64_t blocks = sum_blocks_per_batch(s.B, s.N, threads, sm_count()), chunk = sum_chunk(s.N, blocks);
  Tensor partial = at::empty({s.B, blocks, s.C, kStats}, logits.options().dtype(c10::CppTypeToScalarType<T>::value));
  auto kernel = label_sums_warp_kernel<S, T>;
  allow_smem(kernel, static_cast<size_t>(bytes));
  kernel<<<dim3(blocks, s.B), threads, static_cast<size_t>(bytes), at::cuda::getCurrentCUDAStream()>>>(
      voxel, chunk, partial.mutable_data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return finish_sums(partial, logits.scalar_type());
}

template <typename T, typename Voxel>
void launch_grad(const Voxel& voxel, const Shape& s, const char* op) {
  const Plan p = plan(grad_values_per_thread(s.C) * int64_t(sizeof(T)), s.C, op);
  auto kernel = grad_kernel<T, Voxel>;
  allow_smem(kernel, p.smem);
  const int64_t total = s.B * s.N, blocks = grad_blocks(total, p.threads, sm_count());
  kernel<<<blocks, p.threads, p.smem, at::cuda::getCurrentCUDAStream()>>>(voxel, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One block of finalize_kernel / finalize_backward_kernel: kFinalizeThreads threads, kFinalizeSums values
// of T each in shared memory (at most 6 KiB).
template <typename T>
constexpr size_t finalize_smem() {
  return size_t(kFinalizeSums) * kFinalizeThreads * sizeof(T);
}

}  // namespace

Tensor loss_finalize_cuda(const Tensor& stats, const OptTensor& class_weight, const OptTensor& divisor,
                          const OptTensor& bad_labels, const FinalizeOptions& o) {
  const c10::cuda::CUDAGuard guard(stats.device());
  const FinalizeInputs in(stats, class_weight, divisor, bad_labels);
  Tensor out = at::empty({}, in.stats.options());
  AT_DISPATCH_FLOATING_TYPES(in.stats.scalar_type(), "medfast_loss_finalize_cuda", [&] {
    finalize_kernel<scalar_t><<<1, kFinalizeThreads, finalize_smem<scalar_t>(), at::cuda::getCurrentCUDAStream()>>>(
        in.args<scalar_t>(o), out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

Tensor loss_finalize_backward_cuda(const Tensor& grad, const Tensor& stats, const OptTensor& class_weight,
                                   const OptTensor& divisor, const OptTensor& bad_labels, const FinalizeOptions& o) {
  const c10::cuda::CUDAGuard guard(stats.device());
  const FinalizeInputs in(stats, class_weight, divisor, bad_labels);
  const Tensor g = grad.to(in.stats.scalar_type()).contiguous();
  Tensor out = at::empty_like(in.stats, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(in.stats.scalar_type(), "medfast_loss_finalize_backward_cuda", [&] {
    finalize_backward_kernel<scalar_t>
        <<<1, kFinalizeThreads, finalize_smem<scalar_t>(), at::cuda::getCurrentCUDAStream()>>>(
            in.args<scalar_t>(o), g.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<Tensor, Tensor> softmax_stats_cuda(const Tensor& logits_in, const Tensor& labels_in,
                                              const OptTensor& weight_in, std::optional<int64_t> ignore_index,
                                              bool ce) {
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const LogitsLayout l = logits_layout(logits_in);
  const Tensor& logits = l.t;
  const Tensor labels = label_tensor(labels_in);
  const Shape s(logits);
  const LabelRule rule = label_rule(s.C, ignore_index);
  // The out-of-range labels (LabelRange), zeros to start: a memset, no kernel.
  Tensor range = at::zeros({2}, logits.options().dtype(at::kLong));
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "medfast_softmax_stats_cuda", [&] {
    using T = compute_t<scalar_t>;
    const Tensor weight = weight_as(weight_in, c10::CppTypeToScalarType<T>::value);
    const LabelVoxel<scalar_t, T> voxel{logits.const_data_ptr<scalar_t>(),
                                        any_labels(labels),
                                        ptr_or_null<T>(weight),
                                        nullptr,
                                        nullptr,
                                        s.C,
                                        s.N,
                                        l.cs,
                                        l.vs,
                                        rule,
                                        ce,
                                        reinterpret_cast<long long*>(range.mutable_data_ptr<int64_t>())};
    out = warp_sums() ? launch_label_sums_warp(voxel, s, logits) : launch_sums<T>(voxel, s, logits, "softmax_stats");
  });
  return {out, range};
}

Tensor softmax_stats_backward_cuda(const Tensor& grad_stats, const Tensor& logits_in, const Tensor& labels_in,
                                   const OptTensor& weight_in, std::optional<int64_t> ignore_index) {
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const LogitsLayout l = logits_layout(logits_in);
  const Tensor& logits = l.t;
  const Tensor labels = label_tensor(labels_in);
  const Shape s(logits);
  const LabelRule rule = label_rule(s.C, ignore_index);
  Tensor grad = grad_like(l);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "medfast_softmax_stats_bwd_cuda",
                                  [&] {
    using T = compute_t<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<T>::value;
    const Tensor weight = weight_as(weight_in, acc), g = grad_stats.to(acc).contiguous();
    const LabelVoxel<scalar_t, T> voxel{logits.const_data_ptr<scalar_t>(),
                                        any_labels(labels),
                                        ptr_or_null<T>(weight),
                                        g.const_data_ptr<T>(),
                                        grad.mutable_data_ptr<scalar_t>(),
                                        s.C,
                                        s.N,
                                        l.cs,
                                        l.vs,
                                        rule,
                                        true,
                                        nullptr};
    launch_grad<T>(voxel, s, "softmax_stats_backward");
  });
  return grad;
}

// f(U{}): the soft targets' element type, the logits' S or (for half logits) the compute type T
// (target_like gives one of the two: loss_launch.h target_dtype).
template <typename S, typename T, typename F>
void dispatch_target(const Tensor& target, F&& f) {
  if constexpr (std::is_same_v<S, T>) {
    f(S{});
  } else {
    if (target.scalar_type() == c10::CppTypeToScalarType<S>::value)
      f(S{});
    else
      f(T{});
  }
}

Tensor soft_stats_cuda(const Tensor& logits_in, const Tensor& target_in, const OptTensor& weight_in, bool sigmoid,
                       bool ce) {
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const LogitsLayout l = logits_layout(logits_in);
  const Tensor& logits = l.t;
  const Tensor target = target_like(target_in, l);
  const Shape s(logits);
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "medfast_soft_stats_cuda", [&] {
    using T = compute_t<scalar_t>;
    const Tensor weight = weight_as(weight_in, c10::CppTypeToScalarType<T>::value);
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const T* w = ptr_or_null<T>(weight);
    dispatch_target<scalar_t, T>(target, [&](auto target_zero) {
      using U = decltype(target_zero);
      const U* t = target.const_data_ptr<U>();
      auto sums = [&](auto voxel) { return launch_sums<T>(voxel, s, logits, "soft_stats"); };
      if (sigmoid)
        out = ce ? sums(SoftVoxel<true, true, scalar_t, T, U>{z, t, w, nullptr, nullptr, s.C, s.N, l.cs, l.vs})
                 : sums(SoftVoxel<true, false, scalar_t, T, U>{z, t, w, nullptr, nullptr, s.C, s.N, l.cs, l.vs});
      else
        out = ce ? sums(SoftVoxel<false, true, scalar_t, T, U>{z, t, w, nullptr, nullptr, s.C, s.N, l.cs, l.vs})
                 : sums(SoftVoxel<false, false, scalar_t, T, U>{z, t, w, nullptr, nullptr, s.C, s.N, l.cs, l.vs});
    });
  });
  return out;
}

Tensor soft_stats_backward_cuda(const Tensor& grad_stats, const Tensor& logits_in, const Tensor& target_in,
                                const OptTensor& weight_in, bool sigmoid) {
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const LogitsLayout l = logits_layout(logits_in);
  const Tensor& logits = l.t;
  const Tensor target = target_like(target_in, l);
  const Shape s(logits);
  Tensor grad = grad_like(l);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "medfast_soft_stats_bwd_cuda", [&] {
    using T = compute_t<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<T>::value;
    const Tensor weight = weight_as(weight_in, acc), g = grad_stats.to(acc).contiguous();
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const T* w = ptr_or_null<T>(weight);
    const T* gs = g.const_data_ptr<T>();
    scalar_t* gz = grad.mutable_data_ptr<scalar_t>();
    dispatch_target<scalar_t, T>(target, [&](auto target_zero) {
      using U = decltype(target_zero);
      const U* t = target.const_data_ptr<U>();
      // (the gradient does not depend on CE: one instantiation)
      if (sigmoid)
        launch_grad<T>(SoftVoxel<true, true, scalar_t, T, U>{z, t, w, gs, gz, s.C, s.N, l.cs, l.vs}, s,
                       "soft_stats_backward");
      else
        launch_grad<T>(SoftVoxel<false, true, scalar_t, T, U>{z, t, w, gs, gz, s.C, s.N, l.cs, l.vs}, s,
                       "soft_stats_backward");
    });
  });
  return grad;
}

}  // namespace medfast::loss

// CUDA launcher of the ultrasound ray march: one thread per ray (grid-stride), the arithmetic from
// ussim.h. The property gradient is scattered into the volume by one thread per sample with
// atomicAdd (not bitwise deterministic; see docs/ultrasound.md).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "common/cuda_launch.h"
#include "ussim/ussim_launch.h"

namespace medfast::ussim {
namespace {

constexpr int kThreads = 128;

struct AtomicAdd {
  template <typename T>
  __device__ void operator()(T* dst, T v) const { atomicAdd(dst, v); }
};

template <typename T>
__global__ void march_kernel(const T* vol, const float* table, const Params P, const T* coords, T* out, int64_t rays,
                             int64_t R, int64_t Bv) {
  using A = acc_t<T>;
  const int64_t vol_stride = P.D * P.H * P.W * kProps;
  for (int64_t ray = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; ray < rays; ray += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = ray / R;
    march_ray<T, A>(vol + (Bv == 1 ? 0 : b) * vol_stride, table, P, coords + ray * P.S * 3, out + ray * P.S * 3);
  }
}

template <typename T>
__global__ void lines_kernel(const T* vol, const float* table, const Params P, const T* start, const T* step,
                             const T* w, T* out, int64_t lines, int64_t L, int64_t E, int64_t Bv) {
  using A = acc_t<T>;
  const int64_t vol_stride = P.D * P.H * P.W * kProps;
  for (int64_t line = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; line < lines;
       line += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = line / L;
    march_line<T, A>(vol + (Bv == 1 ? 0 : b) * vol_stride, table, P, start + line * E * 3, step + line * 3, w, E,
                     out + line * 3 * P.S, P.S);
  }
}

template <typename T>
__global__ void backward_kernel(const T* vol, const float* table, const Params P, const T* coords, const T* grad,
                                T* gvals, T* gcoords, int64_t rays, int64_t R, int64_t Bv) {
  using A = acc_t<T>;
  const int64_t vol_stride = P.D * P.H * P.W * kProps;
  for (int64_t ray = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; ray < rays; ray += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = ray / R;
    march_ray_backward<T, A>(vol + (Bv == 1 ? 0 : b) * vol_stride, table, P, coords + ray * P.S * 3,
                             grad + ray * P.S * 3, gvals ? gvals + ray * P.S * kProps : nullptr,
                             gcoords ? gcoords + ray * P.S * 3 : nullptr);
  }
}

template <typename T>
__global__ void scatter_kernel(T* gprops, const Params P, const T* coords, const T* gvals, int64_t samples,
                               int64_t per_volume) {
  using A = acc_t<T>;
  const int64_t vol_stride = P.D * P.H * P.W * kProps;
  const AtomicAdd add;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < samples; k += int64_t(gridDim.x) * blockDim.x) {
    A g[kProps];
    for (int q = 0; q < kProps; ++q) g[q] = static_cast<A>(gvals[k * kProps + q]);
    scatter_props<A>(gprops + (k / per_volume) * vol_stride, P, static_cast<A>(coords[3 * k]),
                     static_cast<A>(coords[3 * k + 1]), static_cast<A>(coords[3 * k + 2]), g, add);
  }
}

}  // namespace

Tensor march_cuda(const Tensor& props, const Tensor& coords, const Tensor& noise, const Params& P) {
  const c10::cuda::CUDAGuard guard(coords.device());
  const int64_t B = coords.size(0), R = coords.size(1), S = coords.size(2), Bv = props.size(0);
  Tensor out = at::empty({B, R, S, 3}, coords.options());
  const int64_t rays = B * R;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(coords.scalar_type(), "medfast_ussim_march_cuda", [&] {
    march_kernel<scalar_t><<<grid_blocks(rays, kThreads), kThreads, 0, stream>>>(
        props.const_data_ptr<scalar_t>(), noise.const_data_ptr<float>(), P, coords.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), rays, R, Bv);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  (void)S;
  return out;
}

Tensor march_lines_cuda(const Tensor& props, const Tensor& start, const Tensor& step, const Tensor& weights,
                        const Tensor& noise, const Params& P) {
  const c10::cuda::CUDAGuard guard(start.device());
  const int64_t B = start.size(0), L = start.size(1), E = start.size(2), Bv = props.size(0);
  Tensor out = at::empty({B, L, 3, P.S}, start.options());
  const int64_t lines = B * L;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(start.scalar_type(), "medfast_ussim_march_lines_cuda", [&] {
    lines_kernel<scalar_t><<<grid_blocks(lines, kThreads), kThreads, 0, stream>>>(
        props.const_data_ptr<scalar_t>(), noise.const_data_ptr<float>(), P, start.const_data_ptr<scalar_t>(),
        step.const_data_ptr<scalar_t>(), weights.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), lines,
        L, E, Bv);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<Tensor, Tensor> march_backward_cuda(const Tensor& grad, const Tensor& props, const Tensor& coords,
                                               const Tensor& noise, const Params& P, bool props_grad,
                                               bool coords_grad) {
  const c10::cuda::CUDAGuard guard(coords.device());
  const int64_t B = coords.size(0), R = coords.size(1), S = coords.size(2), Bv = props.size(0);
  Tensor gvals = props_grad ? at::empty({B, R, S, kProps}, coords.options()) : Tensor();
  Tensor gcoords = coords_grad ? at::empty(coords.sizes(), coords.options()) : at::empty({0}, coords.options());
  Tensor gprops = props_grad ? at::zeros(props.sizes(), props.options()) : at::empty({0}, props.options());
  const int64_t rays = B * R;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(coords.scalar_type(), "medfast_ussim_march_backward_cuda", [&] {
    backward_kernel<scalar_t><<<grid_blocks(rays, kThreads), kThreads, 0, stream>>>(
        props.const_data_ptr<scalar_t>(), noise.const_data_ptr<float>(), P, coords.const_data_ptr<scalar_t>(),
        grad.const_data_ptr<scalar_t>(), props_grad ? gvals.mutable_data_ptr<scalar_t>() : nullptr,
        coords_grad ? gcoords.mutable_data_ptr<scalar_t>() : nullptr, rays, R, Bv);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (props_grad) {
      const int64_t samples = rays * S;
      const int64_t per_volume = (Bv == 1 ? B : 1) * R * S;
      scatter_kernel<scalar_t><<<grid_blocks(samples, kThreads), kThreads, 0, stream>>>(
          gprops.mutable_data_ptr<scalar_t>(), P, coords.const_data_ptr<scalar_t>(),
          gvals.const_data_ptr<scalar_t>(), samples, per_volume);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {gprops, gcoords};
}

}  // namespace medfast::ussim

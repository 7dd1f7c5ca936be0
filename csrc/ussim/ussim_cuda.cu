// CUDA launcher of the ultrasound ray march: one thread per ray (grid-stride), or for the line march
// optionally one warp per line (MEDFAST_USSIM_CUDA_MARCH=warp), the arithmetic from ussim.h. The
// property gradient is scattered into the volume by one thread per sample with atomicAdd (not bitwise
// deterministic; see docs/ultrasound.md).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>
#include <cstring>

#include "common/cuda_launch.h"
#include "ussim/ussim_launch.h"
#include "ussim/ussim_warp.cuh"

namespace medfast::ussim {
namespace {

constexpr int kThreads = 128;

struct AtomicAdd {
  template <typename T>
  __device__ void operator()(T* dst, T v) const { atomicAdd(dst, v); }
};

template <typename T>
__global__ void march_kernel(const T* vol, const float* table, const Params P, const T* coords, T* out, int64_t rays,
                             int64_t R) {
  using A = acc_t<T>;
  const int64_t vol_stride = P.D * P.H * P.W * kProps;
  for (int64_t ray = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; ray < rays; ray += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = ray / R;
    march_ray<T, A>(vol + frame_volume(P, b) * vol_stride, table, P, coords + ray * P.S * 3, out + ray * P.S * 3);
  }
}

template <typename T>
__global__ void lines_kernel(const T* vol, const float* table, const Params P, const T* start, const T* step,
                             const T* w, T* out, int64_t lines, int64_t L, int64_t E) {
  using A = acc_t<T>;
  const int64_t vol_stride = P.D * P.H * P.W * kProps;
  for (int64_t line = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; line < lines;
       line += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = line / L;
    march_line<T, A>(vol + frame_volume(P, b) * vol_stride, table, P, start + line * E * 3, step + line * 3, w, E,
                     out + line * 3 * P.S, P.S);
  }
}

// MEDFAST_USSIM_CUDA_MARCH=warp opts in to the warp-cooperative kernels (line march forward and ray
// backward); the default stays one thread per line / ray until their CUDA tests and timings have run
// on a GPU.
bool warp_march() {
  const char* v = std::getenv("MEDFAST_USSIM_CUDA_MARCH");
  return v != nullptr && std::strcmp(v, "warp") == 0;
}

// PSF: one thread per output sample (the row functions of ussim.h over the range [s, s + 1)).
template <typename T>
__global__ void psf_axial_kernel(const T* x, const T* h, T* out, int64_t rows, int64_t K, int64_t S, bool flip) {
  using A = acc_t<T>;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < rows * S; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = k / S, s = k % S;
    psf_axial_row<T, A>(x + r * S, h + (r % 3) * K, K, S, s, s + 1, out + r * S, flip);
  }
}

template <typename T>
__global__ void psf_lateral_kernel(const T* y, const T* w, T* out, int64_t B, int64_t L, int64_t J, int64_t S) {
  using A = acc_t<T>;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < B * L * S; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t s = k % S, l = (k / S) % L, b = k / (S * L);
    const T* yb = y + b * L * 3 * S;
    T* re = out + (b * 2 * L + l) * S;
    T* im = out + ((b * 2 + 1) * L + l) * S;
    psf_lateral_row<T, A>(yb, 3 * S, w, J, L, S, l, s, s + 1, re, false, false);
    psf_lateral_row<T, A>(yb + S, 3 * S, w + J * S, J, L, S, l, s, s + 1, re, false, true);
    psf_lateral_row<T, A>(yb + 2 * S, 3 * S, w + 2 * J * S, J, L, S, l, s, s + 1, im, false, false);
  }
}

template <typename T>
__global__ void psf_lateral_t_kernel(const T* g, const T* w, T* out, int64_t B, int64_t L, int64_t J, int64_t S) {
  using A = acc_t<T>;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < B * L * 3 * S;
       k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t s = k % S, r = k / S, c = r % 3, l = (r / 3) % L, b = r / (3 * L);
    psf_lateral_row<T, A>(g + (b * 2 + (c < 2 ? 0 : 1)) * L * S, S, w + c * J * S, J, L, S, l, s, s + 1,
                          out + r * S, true, false);
  }
}

template <typename T>
__global__ void backward_kernel(const T* vol, const float* table, const Params P, const T* coords, const T* grad,
                                T* gvals, T* gcoords, int64_t rays, int64_t R) {
  using A = acc_t<T>;
  const int64_t vol_stride = P.D * P.H * P.W * kProps;
  for (int64_t ray = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; ray < rays; ray += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = ray / R;
    march_ray_backward<T, A>(vol + frame_volume(P, b) * vol_stride, table, P, coords + ray * P.S * 3,
                             grad + ray * P.S * 3, gvals ? gvals + ray * P.S * kProps : nullptr,
                             gcoords ? gcoords + ray * P.S * 3 : nullptr);
  }
}

template <typename T>
__global__ void scatter_kernel(T* gprops, const Params P, const T* coords, const T* gvals, int64_t samples,
                               int64_t per_frame) {
  using A = acc_t<T>;
  const int64_t vol_stride = P.D * P.H * P.W * kProps;
  const AtomicAdd add;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < samples; k += int64_t(gridDim.x) * blockDim.x) {
    A g[kProps];
    for (int q = 0; q < kProps; ++q) g[q] = static_cast<A>(gvals[k * kProps + q]);
    scatter_props<A>(gprops + frame_volume(P, k / per_frame) * vol_stride, P, static_cast<A>(coords[3 * k]),
                     static_cast<A>(coords[3 * k + 1]), static_cast<A>(coords[3 * k + 2]), g, add);
  }
}

}  // namespace

Tensor march_cuda(const Tensor& props, const Tensor& coords, const Tensor& noise, const Params& P) {
  const c10::cuda::CUDAGuard guard(coords.device());
  const int64_t B = coords.size(0), R = coords.size(1), S = coords.size(2);
  Tensor out = at::empty({B, R, S, 3}, coords.options());
  const int64_t rays = B * R;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(coords.scalar_type(), "medfast_ussim_march_cuda", [&] {
    march_kernel<scalar_t><<<grid_blocks(rays, kThreads), kThreads, 0, stream>>>(
        props.const_data_ptr<scalar_t>(), noise.const_data_ptr<float>(), P, coords.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), rays, R);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  (void)S;
  return out;
}

Tensor march_lines_cuda(const Tensor& props, const Tensor& start, const Tensor& step, const Tensor& weights,
                        const Tensor& noise, const Params& P) {
  const c10::cuda::CUDAGuard guard(start.device());
  const int64_t B = start.size(0), L = start.size(1), E = start.size(2);
  Tensor out = at::empty({B, L, 3, P.S}, start.options());
  const int64_t lines = B * L;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const bool warp = warp_march();
  AT_DISPATCH_FLOATING_TYPES(start.scalar_type(), "medfast_ussim_march_lines_cuda", [&] {
    if (warp) {
      lines_warp_kernel<scalar_t><<<grid_blocks(lines * 32, kThreads), kThreads, 0, stream>>>(
          props.const_data_ptr<scalar_t>(), noise.const_data_ptr<float>(), P, start.const_data_ptr<scalar_t>(),
          step.const_data_ptr<scalar_t>(), weights.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
          lines, L, E);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    lines_kernel<scalar_t><<<grid_blocks(lines, kThreads), kThreads, 0, stream>>>(
        props.const_data_ptr<scalar_t>(), noise.const_data_ptr<float>(), P, start.const_data_ptr<scalar_t>(),
        step.const_data_ptr<scalar_t>(), weights.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), lines,
        L, E);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

Tensor psf_cuda(const Tensor& x, const Tensor& h, const Tensor& w, bool transpose) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), S = x.size(3), L = transpose ? x.size(2) : x.size(1);
  const int64_t K = h.size(1), J = w.size(1);
  Tensor tmp = at::empty({B, L, 3, S}, x.options());
  Tensor out = transpose ? at::empty({B, L, 3, S}, x.options()) : at::empty({B, 2, L, S}, x.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t n3 = B * L * 3 * S, n2 = B * L * S;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "medfast_ussim_psf_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* t = tmp.mutable_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    if (!transpose) {
      psf_axial_kernel<scalar_t><<<grid_blocks(n3, kThreads), kThreads, 0, stream>>>(xp, hp, t, B * L * 3, K, S, false);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      psf_lateral_kernel<scalar_t><<<grid_blocks(n2, kThreads), kThreads, 0, stream>>>(t, wp, o, B, L, J, S);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      psf_lateral_t_kernel<scalar_t><<<grid_blocks(n3, kThreads), kThreads, 0, stream>>>(xp, wp, t, B, L, J, S);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      psf_axial_kernel<scalar_t><<<grid_blocks(n3, kThreads), kThreads, 0, stream>>>(t, hp, o, B * L * 3, K, S, true);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

std::tuple<Tensor, Tensor> march_backward_cuda(const Tensor& grad, const Tensor& props, const Tensor& coords,
                                               const Tensor& noise, const Params& P, bool props_grad,
                                               bool coords_grad) {
  const c10::cuda::CUDAGuard guard(coords.device());
  const int64_t B = coords.size(0), R = coords.size(1), S = coords.size(2);
  Tensor gvals = props_grad ? at::empty({B, R, S, kProps}, coords.options()) : Tensor();
  Tensor gcoords = coords_grad ? at::empty(coords.sizes(), coords.options()) : at::empty({0}, coords.options());
  Tensor gprops = props_grad ? at::zeros(props.sizes(), props.options()) : at::empty({0}, props.options());
  const int64_t rays = B * R;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const bool warp = warp_march();
  AT_DISPATCH_FLOATING_TYPES(coords.scalar_type(), "medfast_ussim_march_backward_cuda", [&] {
    if (warp)
      backward_warp_kernel<scalar_t><<<grid_blocks(rays * 32, kThreads), kThreads, 0, stream>>>(
          props.const_data_ptr<scalar_t>(), noise.const_data_ptr<float>(), P, coords.const_data_ptr<scalar_t>(),
          grad.const_data_ptr<scalar_t>(), props_grad ? gvals.mutable_data_ptr<scalar_t>() : nullptr,
          coords_grad ? gcoords.mutable_data_ptr<scalar_t>() : nullptr, rays, R);
    else
      backward_kernel<scalar_t><<<grid_blocks(rays, kThreads), kThreads, 0, stream>>>(
          props.const_data_ptr<scalar_t>(), noise.const_data_ptr<float>(), P, coords.const_data_ptr<scalar_t>(),
          grad.const_data_ptr<scalar_t>(), props_grad ? gvals.mutable_data_ptr<scalar_t>() : nullptr,
          coords_grad ? gcoords.mutable_data_ptr<scalar_t>() : nullptr, rays, R);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (props_grad) {
      const int64_t samples = rays * S;
      scatter_kernel<scalar_t><<<grid_blocks(samples, kThreads), kThreads, 0, stream>>>(
          gprops.mutable_data_ptr<scalar_t>(), P, coords.const_data_ptr<scalar_t>(),
          gvals.const_data_ptr<scalar_t>(), samples, R * S);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {gprops, gcoords};
}

}  // namespace medfast::ussim

namespace medfast::ussim {

std::tuple<Tensor, Tensor> march_lines_backward_cuda(const Tensor& grad, const Tensor& props, const Tensor& start,
                                                     const Tensor& step, const Tensor& weights, const Tensor& noise,
                                                     const Params& P, bool props_grad, bool coords_grad) {
  const c10::cuda::CUDAGuard guard(start.device());
  const int64_t B = start.size(0), L = start.size(1), E = start.size(2), S = P.S;
  if (!warp_march()) {  // the positions and echo gradients materialised, (B, L E, S, 3) each
    const Tensor i = at::arange(S, start.options());
    const Tensor coords =
        (start.unsqueeze(3) + i.unsqueeze(1) * step.unsqueeze(2).unsqueeze(3)).reshape({B, L * E, S, 3});
    const Tensor gech = (grad.transpose(2, 3).unsqueeze(2) * weights).reshape({B, L * E, S, 3});
    return march_backward_cuda(gech.contiguous(), props, coords.contiguous(), noise, P, props_grad, coords_grad);
  }
  const int64_t rays = B * L * E;
  Tensor gvals = props_grad ? at::empty({B, L * E, S, kProps}, start.options()) : Tensor();
  Tensor gcoords = coords_grad ? at::empty({B, L * E, S, 3}, start.options()) : at::empty({0}, start.options());
  Tensor gprops = props_grad ? at::zeros(props.sizes(), props.options()) : at::empty({0}, props.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(start.scalar_type(), "medfast_ussim_march_lines_backward_cuda", [&] {
    lines_backward_warp_kernel<scalar_t><<<grid_blocks(rays * 32, kThreads), kThreads, 0, stream>>>(
        props.const_data_ptr<scalar_t>(), noise.const_data_ptr<float>(), P, start.const_data_ptr<scalar_t>(),
        step.const_data_ptr<scalar_t>(), weights.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
        props_grad ? gvals.mutable_data_ptr<scalar_t>() : nullptr,
        coords_grad ? gcoords.mutable_data_ptr<scalar_t>() : nullptr, rays, L, E);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (props_grad) {
      const int64_t samples = rays * S;
      lines_scatter_kernel<scalar_t><<<grid_blocks(samples, kThreads), kThreads, 0, stream>>>(
          gprops.mutable_data_ptr<scalar_t>(), P, start.const_data_ptr<scalar_t>(), step.const_data_ptr<scalar_t>(),
          gvals.const_data_ptr<scalar_t>(), samples, L, E);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {gprops, gcoords};
}

}  // namespace medfast::ussim

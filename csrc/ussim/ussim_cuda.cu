// CUDA launcher of the ultrasound ray march: one thread per ray (grid-stride), or for the line march
// optionally one warp per line (MEDFAST_USSIM_CUDA_MARCH=warp). The kernels and their launch geometry
// are in ussim_kernels.cuh and ussim_warp.cuh (arithmetic in ussim.h). The property gradient is
// scattered into the volume with atomicAdd (not bitwise deterministic; see docs/ultrasound.md) by the
// merged warp scatter (the lanes of a warp whose samples share a voxel cell summed before the atomics;
// ussim_warp.cuh), or with MEDFAST_USSIM_CUDA_SCATTER=plain by one thread per sample.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>
#include <cstring>

#include "common/cuda_launch.h"
#include "ussim/ussim_kernels.cuh"
#include "ussim/ussim_launch.h"
#include "ussim/ussim_warp.cuh"

namespace medfast::ussim {
namespace {

// Blocks for n grid-stride work items on this device (ussim_kernels.cuh blocks_for).
int64_t grid_for(int64_t n) { return blocks_for(n, sm_count()); }

// The warp-cooperative kernels (line march forward, ray backward) by default: on an H200 they gave
// 1.6x the frames/s of one thread per line at batch 64 and 4.7x at batch 5 (benchmarks/results/gpu,
// h200b_kernel_profile). MEDFAST_USSIM_CUDA_MARCH=thread selects one thread per line / ray.
bool warp_march() {
  const char* v = std::getenv("MEDFAST_USSIM_CUDA_MARCH");
  return v == nullptr || std::strcmp(v, "thread") != 0;
}

// The property-gradient scatter: the merged warp scatter (scatter_merged_kernel,
// lines_scatter_merged_kernel) by default; MEDFAST_USSIM_CUDA_SCATTER=plain selects one thread per sample
// (scatter_kernel, lines_scatter_kernel). Merged is the default before a GPU timing because consecutive
// samples of a ray share a voxel cell for tens of samples (the sample step is a fraction of a voxel), so
// it issues up to 32x fewer atomics; the plain scatter took 18.3 of 37.3 ms of forward + backward kernels
// at batch 64 on an H200, and where no two lanes share a cell the merged one stops after one ballot. Timed
// since: forward + backward at batch 64 ran at 2,965 frames/s merged and 1,681 plain (h200d_kernel_profile).
bool merged_scatter() {
  const char* v = std::getenv("MEDFAST_USSIM_CUDA_SCATTER");
  return v == nullptr || std::strcmp(v, "plain") != 0;
}

}  // namespace

Tensor march_cuda(const Tensor& props, const Tensor& coords, const Tensor& noise, const Params& P) {
  const c10::cuda::CUDAGuard guard(coords.device());
  const int64_t B = coords.size(0), R = coords.size(1), S = coords.size(2);
  Tensor out = at::empty({B, R, S, 3}, coords.options());
  const int64_t rays = B * R;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(coords.scalar_type(), "medfast_ussim_march_cuda", [&] {
    march_kernel<scalar_t><<<grid_for(rays), kThreads, 0, stream>>>(
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
      lines_warp_kernel<scalar_t><<<grid_for(lines * 32), kThreads, 0, stream>>>(
          props.const_data_ptr<scalar_t>(), noise.const_data_ptr<float>(), P, start.const_data_ptr<scalar_t>(),
          step.const_data_ptr<scalar_t>(), weights.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
          lines, L, E);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    lines_kernel<scalar_t><<<grid_for(lines), kThreads, 0, stream>>>(
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
  if (out.numel() == 0) return out;  // nothing to launch (as psf_cpu)
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t n3 = B * L * 3 * S, n2 = B * L * S;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "medfast_ussim_psf_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* t = tmp.mutable_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    if (!transpose) {
      psf_axial_kernel<scalar_t><<<grid_for(n3), kThreads, 0, stream>>>(xp, hp, t, B * L * 3, K, S, false);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      psf_lateral_kernel<scalar_t><<<grid_for(n2), kThreads, 0, stream>>>(t, wp, o, B, L, J, S);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      psf_lateral_t_kernel<scalar_t><<<grid_for(n3), kThreads, 0, stream>>>(xp, wp, t, B, L, J, S);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      psf_axial_kernel<scalar_t><<<grid_for(n3), kThreads, 0, stream>>>(t, hp, o, B * L * 3, K, S, true);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

std::tuple<Tensor, Tensor> march_backward_cuda(const Tensor& grad, const Tensor& props, const Tensor& coords,
                                               const Tensor& noise, const Params& P, bool props_grad,
                                               bool coords_grad) {
  const c10::cuda::CUDAGuard guard(coords.device());
  // the property-map gradient is scattered with float atomics: PyTorch's rule for such ops
  if (props_grad) at::globalContext().alertNotDeterministic("medfast ultrasound ray march backward (CUDA), "
                                                            "gradient w.r.t. the property maps");
  const int64_t B = coords.size(0), R = coords.size(1), S = coords.size(2);
  Tensor gvals = props_grad ? at::empty({B, R, S, kProps}, coords.options()) : Tensor();
  Tensor gcoords = coords_grad ? at::empty(coords.sizes(), coords.options()) : at::empty({0}, coords.options());
  Tensor gprops = props_grad ? at::zeros(props.sizes(), props.options()) : at::empty({0}, props.options());
  const int64_t rays = B * R;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const bool warp = warp_march();
  AT_DISPATCH_FLOATING_TYPES(coords.scalar_type(), "medfast_ussim_march_backward_cuda", [&] {
    if (warp)
      backward_warp_kernel<scalar_t><<<grid_for(rays * 32), kThreads, 0, stream>>>(
          props.const_data_ptr<scalar_t>(), noise.const_data_ptr<float>(), P, coords.const_data_ptr<scalar_t>(),
          grad.const_data_ptr<scalar_t>(), props_grad ? gvals.mutable_data_ptr<scalar_t>() : nullptr,
          coords_grad ? gcoords.mutable_data_ptr<scalar_t>() : nullptr, rays, R);
    else
      backward_kernel<scalar_t><<<grid_for(rays), kThreads, 0, stream>>>(
          props.const_data_ptr<scalar_t>(), noise.const_data_ptr<float>(), P, coords.const_data_ptr<scalar_t>(),
          grad.const_data_ptr<scalar_t>(), props_grad ? gvals.mutable_data_ptr<scalar_t>() : nullptr,
          coords_grad ? gcoords.mutable_data_ptr<scalar_t>() : nullptr, rays, R);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (props_grad) {
      const int64_t samples = rays * S;
      if (merged_scatter())
        scatter_merged_kernel<scalar_t><<<grid_for(samples), kThreads, 0, stream>>>(
            gprops.mutable_data_ptr<scalar_t>(), P, coords.const_data_ptr<scalar_t>(),
            gvals.const_data_ptr<scalar_t>(), samples, R * S);
      else
        scatter_kernel<scalar_t><<<grid_for(samples), kThreads, 0, stream>>>(
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
  // the property-map gradient is scattered with float atomics: PyTorch's rule for such ops
  if (props_grad) at::globalContext().alertNotDeterministic("medfast ultrasound ray march backward (CUDA), "
                                                            "gradient w.r.t. the property maps");
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
    lines_backward_warp_kernel<scalar_t><<<grid_for(rays * 32), kThreads, 0, stream>>>(
        props.const_data_ptr<scalar_t>(), noise.const_data_ptr<float>(), P, start.const_data_ptr<scalar_t>(),
        step.const_data_ptr<scalar_t>(), weights.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
        props_grad ? gvals.mutable_data_ptr<scalar_t>() : nullptr,
        coords_grad ? gcoords.mutable_data_ptr<scalar_t>() : nullptr, rays, L, E);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (props_grad) {
      const int64_t samples = rays * S;
      if (merged_scatter())
        lines_scatter_merged_kernel<scalar_t><<<grid_for(samples), kThreads, 0, stream>>>(
            gprops.mutable_data_ptr<scalar_t>(), P, start.const_data_ptr<scalar_t>(),
            step.const_data_ptr<scalar_t>(), gvals.const_data_ptr<scalar_t>(), samples, L, E);
      else
        lines_scatter_kernel<scalar_t><<<grid_for(samples), kThreads, 0, stream>>>(
            gprops.mutable_data_ptr<scalar_t>(), P, start.const_data_ptr<scalar_t>(),
            step.const_data_ptr<scalar_t>(), gvals.const_data_ptr<scalar_t>(), samples, L, E);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {gprops, gcoords};
}

}  // namespace medfast::ussim

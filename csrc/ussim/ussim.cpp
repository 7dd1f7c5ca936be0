// Schemas of the ultrasound ray-march family and their dispatch to the CPU / CUDA launchers.
// Friendly argument validation happens in Python (medfast/ops/_ussim.py); the checks here only
// keep a direct call of torch.ops.medfast.ussim_* from reaching a kernel with unusable arguments.
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "ussim/ussim_launch.h"

namespace medfast::ussim {
namespace {

// The volume index of a call, checked: int64 (B,) on the device of the call; on the CPU also its range
// (on a GPU that would cost a device sync: simulate() checks it on the host before copying it).
Tensor check_volume_index(const std::optional<Tensor>& index, const Tensor& props, const Tensor& coords,
                          int64_t batch) {
  if (!index.has_value() || !index->defined()) return Tensor();
  const Tensor& idx = *index;
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, "medfast ussim: volume_index must be int64");
  TORCH_CHECK_VALUE(idx.dim() == 1 && idx.size(0) == batch, "medfast ussim: volume_index must be (B,) with B = ",
                    batch, ", got ", idx.sizes());
  TORCH_CHECK_VALUE(idx.device() == coords.device(), "medfast ussim: volume_index on another device");
  if (idx.device().is_cpu() && batch > 0) {
    const auto mm = at::aminmax(idx);
    TORCH_CHECK_VALUE(std::get<0>(mm).item<int64_t>() >= 0 && std::get<1>(mm).item<int64_t>() < props.size(0),
                      "medfast ussim: volume_index values must lie in [0, ", props.size(0), ")");
  }
  return idx.contiguous();
}

Params make_params_for(const Tensor& props, const Tensor& coords, int64_t batch, int64_t S, const Tensor& noise,
                       at::ArrayRef<double> grid_affine, double att, at::ArrayRef<double> background, int64_t seed,
                       at::ArrayRef<double> sharp, const Tensor& volume_index) {
  TORCH_CHECK_VALUE(props.dim() == 5 && props.size(4) == kProps,
                    "medfast ussim: props must be (B, D, H, W, 5) channels-last, got ", props.sizes());
  TORCH_CHECK_VALUE(volume_index.defined() || props.size(0) == 1 || props.size(0) == batch,
                    "medfast ussim: props batch must be 1 or equal to the coords batch (or give a volume_index)");
  TORCH_CHECK_VALUE(props.numel() > 0, "medfast ussim: empty props");
  TORCH_CHECK_TYPE(props.scalar_type() == coords.scalar_type(), "medfast ussim: props and coords dtypes differ");
  TORCH_CHECK_TYPE(props.scalar_type() == at::kFloat || props.scalar_type() == at::kDouble,
                   "medfast ussim: dtype must be float32 or float64");
  TORCH_CHECK_TYPE(noise.scalar_type() == at::kFloat, "medfast ussim: noise table must be float32");
  TORCH_CHECK_VALUE(noise.dim() == 2 && noise.size(1) == kNoise && noise.size(0) > 0 &&
                        (noise.size(0) & (noise.size(0) - 1)) == 0,
                    "medfast ussim: noise must be (N, 4) with N a power of two, got ", noise.sizes());
  TORCH_CHECK_VALUE(noise.size(0) <= (int64_t(1) << 31), "medfast ussim: at most 2^31 noise rows (32-bit hash)");
  TORCH_CHECK_VALUE(grid_affine.size() == 12, "medfast ussim: grid_affine must have 12 entries");
  TORCH_CHECK_VALUE(background.size() == kProps, "medfast ussim: background must have 5 entries");
  TORCH_CHECK_VALUE(props.device() == coords.device() && noise.device() == coords.device(),
                    "medfast ussim: tensors on different devices");
  Params P{};
  P.D = props.size(1);
  P.H = props.size(2);
  P.W = props.size(3);
  P.S = S;
  P.noise_mask = noise.size(0) - 1;
  P.seed = static_cast<uint64_t>(seed);
  for (int i = 0; i < 12; ++i) P.G[i] = grid_affine[i];
  P.att = att;
  for (int i = 0; i < kProps; ++i) P.bg[i] = background[i];
  // (float[3] in the schema: a single value is given for all three axes)
  TORCH_CHECK_VALUE(sharp.size() == 3, "medfast ussim: sharp must have 3 entries (one per voxel axis), got ",
                    sharp.size());
  for (int a = 0; a < 3; ++a) {
    TORCH_CHECK_VALUE(std::isfinite(sharp[a]) && sharp[a] >= 1.0, "medfast ussim: sharp must be >= 1, got ", sharp);
    P.sharp[a] = sharp[a];
  }
  P.V = props.size(0);
  P.volume_index = volume_index.defined() ? volume_index.const_data_ptr<int64_t>() : nullptr;
  return P;
}

Params make_params(const Tensor& props, const Tensor& coords, const Tensor& noise, at::ArrayRef<double> grid_affine,
                   double att, at::ArrayRef<double> background, int64_t seed, at::ArrayRef<double> sharp,
                   const Tensor& volume_index = Tensor()) {
  TORCH_CHECK_VALUE(coords.dim() == 4 && coords.size(3) == 3, "medfast ussim: coords must be (B, R, S, 3), got ",
                    coords.sizes());
  TORCH_CHECK_VALUE(coords.size(2) >= 1 && coords.size(1) >= 1 && coords.size(0) >= 1, "medfast ussim: empty coords");
  return make_params_for(props, coords, coords.size(0), coords.size(2), noise, grid_affine, att, background, seed,
                         sharp, volume_index);
}

using Lines = Tensor (*)(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Params&);

template <Lines F>
Tensor march_lines_impl(const Tensor& props, const Tensor& start, const Tensor& step, const Tensor& weights,
                        const Tensor& noise, at::ArrayRef<double> grid_affine, double att,
                        at::ArrayRef<double> background, int64_t seed, at::ArrayRef<double> sharp,
                        const std::optional<Tensor>& volume_index) {
  TORCH_CHECK_VALUE(start.dim() == 4 && start.size(3) == 3 && start.size(0) >= 1 && start.size(1) >= 1 &&
                        start.size(2) >= 1,
                    "medfast ussim: start must be (B, L, E, 3), got ", start.sizes());
  TORCH_CHECK_VALUE(step.dim() == 3 && step.size(0) == start.size(0) && step.size(1) == start.size(1) &&
                        step.size(2) == 3,
                    "medfast ussim: step must be (B, L, 3), got ", step.sizes());
  TORCH_CHECK_VALUE(weights.dim() == 3 && weights.size(0) == start.size(2) && weights.size(1) >= 1 &&
                        weights.size(2) == 3,
                    "medfast ussim: weights must be (E, S, 3), got ", weights.sizes());
  TORCH_CHECK_TYPE(step.scalar_type() == start.scalar_type() && weights.scalar_type() == start.scalar_type(),
                   "medfast ussim: start, step and weights dtypes differ");
  TORCH_CHECK_VALUE(step.device() == start.device() && weights.device() == start.device(),
                    "medfast ussim: tensors on different devices");
  const Tensor vidx = check_volume_index(volume_index, props, start, start.size(0));  // alive during the call
  const Params P = make_params_for(props, start, start.size(0), weights.size(1), noise, grid_affine, att, background,
                                   seed, sharp, vidx);
  return F(props.contiguous(), start.contiguous(), step.contiguous(), weights.contiguous(), noise.contiguous(), P);
}

using Fwd = Tensor (*)(const Tensor&, const Tensor&, const Tensor&, const Params&);
using Bwd = std::tuple<Tensor, Tensor> (*)(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Params&,
                                           bool, bool);

Tensor march(Fwd launch, const Tensor& props, const Tensor& coords, const Tensor& noise,
             at::ArrayRef<double> grid_affine, double att, at::ArrayRef<double> background, int64_t seed,
             at::ArrayRef<double> sharp) {
  const Params P = make_params(props, coords, noise, grid_affine, att, background, seed, sharp);
  return launch(props.contiguous(), coords.contiguous(), noise.contiguous(), P);
}

std::tuple<Tensor, Tensor> march_backward(Bwd launch, const Tensor& grad, const Tensor& props, const Tensor& coords,
                                          const Tensor& noise, at::ArrayRef<double> grid_affine, double att,
                                          at::ArrayRef<double> background, int64_t seed, at::ArrayRef<double> sharp,
                                          bool props_grad, bool coords_grad,
                                          const std::optional<Tensor>& volume_index) {
  TORCH_CHECK_VALUE(coords.dim() == 4, "medfast ussim: coords must be (B, R, S, 3), got ", coords.sizes());
  const Tensor vidx = check_volume_index(volume_index, props, coords, coords.size(0));  // alive during the call
  const Params P = make_params(props, coords, noise, grid_affine, att, background, seed, sharp, vidx);
  TORCH_CHECK_VALUE(grad.dim() == 4 && grad.size(0) == coords.size(0) && grad.size(1) == coords.size(1) &&
                        grad.size(2) == coords.size(2) && grad.size(3) == 3,
                    "medfast ussim: grad must be (B, R, S, 3), got ", grad.sizes());
  TORCH_CHECK_VALUE(grad.device() == coords.device(), "medfast ussim: grad is on ", grad.device(),
                    ", coords on ", coords.device());
  TORCH_CHECK_TYPE(at::isFloatingType(grad.scalar_type()), "medfast ussim: grad must be floating, got ",
                   grad.scalar_type());
  return launch(grad.contiguous().to(coords.scalar_type()), props.contiguous(), coords.contiguous(),
                noise.contiguous(), P, props_grad, coords_grad);
}

template <Fwd F>
Tensor march_impl(const Tensor& props, const Tensor& coords, const Tensor& noise, at::ArrayRef<double> grid_affine,
                  double att, at::ArrayRef<double> background, int64_t seed, at::ArrayRef<double> sharp) {
  return march(F, props, coords, noise, grid_affine, att, background, seed, sharp);
}

template <Bwd F>
std::tuple<Tensor, Tensor> march_backward_impl(const Tensor& grad, const Tensor& props, const Tensor& coords,
                                               const Tensor& noise, at::ArrayRef<double> grid_affine, double att,
                                               at::ArrayRef<double> background, int64_t seed,
                                               at::ArrayRef<double> sharp, bool props_grad, bool coords_grad,
                                               const std::optional<Tensor>& volume_index) {
  return march_backward(F, grad, props, coords, noise, grid_affine, att, background, seed, sharp, props_grad,
                        coords_grad, volume_index);
}

using LinesBwd = std::tuple<Tensor, Tensor> (*)(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                const Tensor&, const Tensor&, const Params&, bool, bool);

template <LinesBwd F>
std::tuple<Tensor, Tensor> march_lines_backward_impl(const Tensor& grad, const Tensor& props, const Tensor& start,
                                                     const Tensor& step, const Tensor& weights, const Tensor& noise,
                                                     at::ArrayRef<double> grid_affine, double att,
                                                     at::ArrayRef<double> background, int64_t seed,
                                                     at::ArrayRef<double> sharp, bool props_grad, bool coords_grad,
                                                     const std::optional<Tensor>& volume_index) {
  TORCH_CHECK_VALUE(start.dim() == 4 && start.size(3) == 3 && start.size(0) >= 1 && start.size(1) >= 1 &&
                        start.size(2) >= 1,
                    "medfast ussim: start must be (B, L, E, 3), got ", start.sizes());
  TORCH_CHECK_VALUE(step.dim() == 3 && step.size(0) == start.size(0) && step.size(1) == start.size(1) &&
                        step.size(2) == 3,
                    "medfast ussim: step must be (B, L, 3), got ", step.sizes());
  TORCH_CHECK_VALUE(weights.dim() == 3 && weights.size(0) == start.size(2) && weights.size(1) >= 1 &&
                        weights.size(2) == 3,
                    "medfast ussim: weights must be (E, S, 3), got ", weights.sizes());
  TORCH_CHECK_VALUE(grad.dim() == 4 && grad.size(0) == start.size(0) && grad.size(1) == start.size(1) &&
                        grad.size(2) == 3 && grad.size(3) == weights.size(1),
                    "medfast ussim: grad must be (B, L, 3, S), got ", grad.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(grad.scalar_type()), "medfast ussim: grad must be floating, got ",
                   grad.scalar_type());
  TORCH_CHECK_TYPE(step.scalar_type() == start.scalar_type() && weights.scalar_type() == start.scalar_type(),
                   "medfast ussim: start, step and weights dtypes differ");
  TORCH_CHECK_VALUE(step.device() == start.device() && weights.device() == start.device() &&
                        grad.device() == start.device(),
                    "medfast ussim: tensors on different devices");
  const Tensor vidx = check_volume_index(volume_index, props, start, start.size(0));  // alive during the call
  const Params P = make_params_for(props, start, start.size(0), weights.size(1), noise, grid_affine, att, background,
                                   seed, sharp, vidx);
  return F(grad.contiguous().to(start.scalar_type()), props.contiguous(), start.contiguous(), step.contiguous(),
           weights.contiguous(), noise.contiguous(), P, props_grad, coords_grad);
}


template <Tensor (*F)(const Tensor&, const Tensor&, const Tensor&, bool)>
Tensor psf_impl(const Tensor& x, const Tensor& h, const Tensor& w, bool transpose) {
  TORCH_CHECK_VALUE(x.dim() == 4 && h.dim() == 2 && h.size(0) == 3 && h.size(1) >= 1 && w.dim() == 3 &&
                        w.size(0) == 3 && w.size(1) >= 1 && w.size(2) == x.size(3),
                    "medfast ussim: psf needs x (B, L, 3, S) or (B, 2, L, S), h (3, K), w (3, J, S); got ", x.sizes(),
                    ", ", h.sizes(), ", ", w.sizes());
  TORCH_CHECK_VALUE(x.size(transpose ? 1 : 2) == (transpose ? 2 : 3), "medfast ussim: psf input shape ", x.sizes());
  TORCH_CHECK_TYPE(h.scalar_type() == x.scalar_type() && w.scalar_type() == x.scalar_type() &&
                       (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
                   "medfast ussim: psf dtypes must be one of float32 / float64");
  TORCH_CHECK_VALUE(h.device() == x.device() && w.device() == x.device(), "medfast ussim: tensors on different devices");
  return F(x.contiguous(), h.contiguous(), w.contiguous(), transpose);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(medfast, m) {
  m.def(
      "ussim_march(Tensor props, Tensor coords, Tensor noise, float[] grid_affine, float att, float[] background, "
      "int seed, float[3] sharp) -> Tensor");
  m.def(
      "ussim_march_lines(Tensor props, Tensor start, Tensor step, Tensor weights, Tensor noise, float[] grid_affine, "
      "float att, float[] background, int seed, float[3] sharp, Tensor? volume_index=None) -> Tensor");
  m.def("ussim_psf(Tensor x, Tensor h, Tensor w, bool transpose) -> Tensor");
  m.def(
      "ussim_march_backward(Tensor grad, Tensor props, Tensor coords, Tensor noise, float[] grid_affine, float att, "
      "float[] background, int seed, float[3] sharp, bool props_grad, bool coords_grad, Tensor? volume_index=None) "
      "-> (Tensor, Tensor)");
  m.def(
      "ussim_march_lines_backward(Tensor grad, Tensor props, Tensor start, Tensor step, Tensor weights, Tensor noise, "
      "float[] grid_affine, float att, float[] background, int seed, float[3] sharp, bool props_grad, "
      "bool coords_grad, Tensor? volume_index=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(medfast, CPU, m) {
  m.impl("ussim_march", &march_impl<march_cpu>);
  m.impl("ussim_march_lines", &march_lines_impl<march_lines_cpu>);
  m.impl("ussim_psf", &psf_impl<psf_cpu>);
  m.impl("ussim_march_backward", &march_backward_impl<march_backward_cpu>);
  m.impl("ussim_march_lines_backward", &march_lines_backward_impl<march_lines_backward_cpu>);
}

#ifdef MEDFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(medfast, CUDA, m) {
  m.impl("ussim_march", &march_impl<march_cuda>);
  m.impl("ussim_march_lines", &march_lines_impl<march_lines_cuda>);
  m.impl("ussim_psf", &psf_impl<psf_cuda>);
  m.impl("ussim_march_backward", &march_backward_impl<march_backward_cuda>);
  m.impl("ussim_march_lines_backward", &march_lines_backward_impl<march_lines_backward_cuda>);
}
#endif

}  // namespace medfast::ussim

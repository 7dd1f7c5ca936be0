// Schema of the distance family and its dispatch to the CPU / CUDA launchers. Friendly argument
// validation happens in Python (medfast/ops/_distance.py); the checks here only keep a direct call
// of torch.ops.medfast.distance_transform from reaching a kernel with arguments it cannot handle.
#include <torch/library.h>

#include <cmath>

#include "distance/distance_launch.h"

namespace medfast::distance {
namespace {

using Launcher = Tensor (*)(const Tensor&, const std::vector<double>&, at::ScalarType);

Tensor distance_transform(Launcher launch, const Tensor& mask, at::ArrayRef<double> spacing, at::ScalarType dtype) {
  const int64_t nd = mask.dim() - 1;
  TORCH_CHECK_VALUE(nd == 2 || nd == 3, "medfast distance_transform: mask must be (B, H, W) or (B, D, H, W), got ",
                    mask.sizes());
  TORCH_CHECK_VALUE(mask.numel() > 0, "medfast distance_transform: mask is empty: ", mask.sizes());
  TORCH_CHECK_TYPE(!at::isComplexType(mask.scalar_type()), "medfast distance_transform: complex mask");
  TORCH_CHECK_VALUE(static_cast<int64_t>(spacing.size()) == nd, "medfast distance_transform: spacing must have ", nd,
                    " entries, got ", spacing.size());
  for (double s : spacing)
    TORCH_CHECK_VALUE(std::isfinite(s) && s > 0, "medfast distance_transform: spacing must be positive, got ", s);
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble,
                   "medfast distance_transform: dtype must be float32 or float64, got ", dtype);
  return launch(mask, std::vector<double>(spacing.begin(), spacing.end()), dtype);
}

using SeedLauncher = Tensor (*)(const Tensor&, const Tensor&, const std::vector<double>&);

Tensor seed_distances(SeedLauncher launch, const Tensor& seeds, const Tensor& query, at::ArrayRef<double> spacing) {
  const int64_t nd = seeds.dim() - 1;
  TORCH_CHECK_VALUE(nd == 2 || nd == 3, "medfast seed_distances: seeds must be (B, H, W) or (B, D, H, W), got ",
                    seeds.sizes());
  TORCH_CHECK_VALUE(query.sizes() == seeds.sizes(), "medfast seed_distances: query must have the seeds' shape ",
                    seeds.sizes(), ", got ", query.sizes());
  TORCH_CHECK_VALUE(seeds.numel() > 0, "medfast seed_distances: seeds is empty");
  TORCH_CHECK_VALUE(query.device() == seeds.device(), "medfast seed_distances: query on ", query.device(),
                    " but seeds on ", seeds.device());
  TORCH_CHECK_VALUE(static_cast<int64_t>(spacing.size()) == nd, "medfast seed_distances: spacing must have ", nd,
                    " entries, got ", spacing.size());
  for (double s : spacing)
    TORCH_CHECK_VALUE(std::isfinite(s) && s > 0, "medfast seed_distances: spacing must be positive, got ", s);
  return launch(seeds, query, std::vector<double>(spacing.begin(), spacing.end()));
}

using EdgeLauncher = std::tuple<Tensor, Tensor> (*)(const Tensor&);

std::tuple<Tensor, Tensor> surface_edges(EdgeLauncher launch, const Tensor& mask) {
  const int64_t nd = mask.dim() - 1;
  TORCH_CHECK_VALUE(nd == 2 || nd == 3, "medfast surface_edges: mask must be (B, H, W) or (B, D, H, W), got ",
                    mask.sizes());
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "medfast surface_edges: mask must be bool, got ",
                   mask.scalar_type());
  return launch(mask.contiguous());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(medfast, m) {
  // Surface voxels of a bool mask (set voxels with a face neighbour unset or outside the image) and
  // their number per batch element.
  m.def("surface_edges(Tensor mask) -> (Tensor, Tensor)");
  m.def("distance_transform(Tensor mask, float[] spacing, ScalarType dtype) -> Tensor");
  // Distances from each query voxel (C order) to the nearest seed voxel of its batch element.
  m.def("seed_distances(Tensor seeds, Tensor query, float[] spacing) -> Tensor");
}

TORCH_LIBRARY_IMPL(medfast, CPU, m) {
  m.impl("surface_edges", [](const Tensor& mask) { return surface_edges(surface_edges_cpu, mask); });
  m.impl("distance_transform", [](const Tensor& mask, at::ArrayRef<double> spacing, at::ScalarType dtype) {
    return distance_transform(distance_cpu, mask, spacing, dtype);
  });
  m.impl("seed_distances", [](const Tensor& seeds, const Tensor& query, at::ArrayRef<double> spacing) {
    return seed_distances(seed_distances_cpu, seeds, query, spacing);
  });
}

#ifdef MEDFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(medfast, CUDA, m) {
  m.impl("surface_edges", [](const Tensor& mask) { return surface_edges(surface_edges_cuda, mask); });
  m.impl("distance_transform", [](const Tensor& mask, at::ArrayRef<double> spacing, at::ScalarType dtype) {
    return distance_transform(distance_cuda, mask, spacing, dtype);
  });
  m.impl("seed_distances", [](const Tensor& seeds, const Tensor& query, at::ArrayRef<double> spacing) {
    return seed_distances(seed_distances_cuda, seeds, query, spacing);
  });
}
#endif

}  // namespace medfast::distance

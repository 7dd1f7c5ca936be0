// Host-side entry points of the distance family, registered by distance.cpp.
#pragma once
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "distance/distance.h"

namespace medfast::distance {

using at::Tensor;

// Squared-distance buffer of a mask: 0 on background (mask == 0), +inf elsewhere; contiguous.
inline Tensor initial_squared(const Tensor& mask, at::ScalarType dtype) {
  Tensor d = at::zeros(mask.sizes(), mask.options().dtype(dtype));
  d.masked_fill_(mask.ne(0), std::numeric_limits<double>::infinity());
  return d;
}

// Lines along spatial axis `axis` of the contiguous tensor d of shape (B, *spatial).
inline Lines lines_along(const Tensor& d, int64_t axis) {
  Lines L{1, d.size(1 + axis), 1};
  for (int64_t i = 0; i < 1 + axis; ++i) L.outer *= d.size(i);
  for (int64_t i = 2 + axis; i < d.dim(); ++i) L.inner *= d.size(i);
  return L;
}

// Distances (float32, (Q,)) from the query voxels (query != 0, in C order over (B, *spatial)) to the
// nearest seed voxel (seeds != 0) of the same batch element; +inf where an element has no seed.
Tensor seed_distances_cpu(const Tensor& seeds, const Tensor& query, const std::vector<double>& spacing);
Tensor seed_distances_cuda(const Tensor& seeds, const Tensor& query, const std::vector<double>& spacing);

// Surface voxels of a (B, *spatial) bool mask (surface_voxel) and their number per element (int64, (B,)).
std::tuple<Tensor, Tensor> surface_edges_cpu(const Tensor& mask);
std::tuple<Tensor, Tensor> surface_edges_cuda(const Tensor& mask);

Tensor distance_cpu(const Tensor& mask, const std::vector<double>& spacing, at::ScalarType dtype);
Tensor distance_cuda(const Tensor& mask, const std::vector<double>& spacing, at::ScalarType dtype);

}  // namespace medfast::distance

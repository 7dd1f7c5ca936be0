// CPU launcher of the distance transform: one at::parallel_for per axis over the lines of all
// batches, the arithmetic from distance.h. Lines along an inner-strided axis are handled in blocks
// of kBlock neighbours: gathered into a contiguous scratch (one cache line per row), solved, and
// scattered back, so the strided passes stream memory instead of touching one value per line.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "distance/distance_launch.h"

namespace medfast::distance {
namespace {

constexpr int64_t kBlock = 16;

template <typename T>
void pass_cpu(T* d, const Lines& L, T h) {
  const int64_t n = L.n;
  if (L.inner == 1) {
    at::parallel_for(0, L.outer, std::max<int64_t>(1, 4096 / n), [&](int64_t begin, int64_t end) {
      std::vector<int64_t> v(n);
      std::vector<T> scratch(2 * n);
      for (int64_t o = begin; o < end; ++o)
        envelope_pass<T>(d + o * n, 1, n, h, v.data(), scratch.data(), scratch.data() + n, 1);
    });
    return;
  }
  const int64_t per_outer = (L.inner + kBlock - 1) / kBlock;
  const int64_t blocks = L.outer * per_outer;
  at::parallel_for(0, blocks, std::max<int64_t>(1, 256 / n), [&](int64_t begin, int64_t end) {
    std::vector<T> buf(kBlock * n), scratch(2 * n);
    std::vector<int64_t> v(n);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t o = b / per_outer, i0 = (b - o * per_outer) * kBlock;
      const int64_t w = std::min(kBlock, L.inner - i0);
      T* base = d + o * n * L.inner + i0;
      for (int64_t q = 0; q < n; ++q) {
        const T* row = base + q * L.inner;
        for (int64_t j = 0; j < w; ++j) buf[j * n + q] = row[j];
      }
      for (int64_t j = 0; j < w; ++j)
        envelope_pass<T>(buf.data() + j * n, 1, n, h, v.data(), scratch.data(), scratch.data() + n, 1);
      for (int64_t q = 0; q < n; ++q) {
        T* row = base + q * L.inner;
        for (int64_t j = 0; j < w; ++j) row[j] = buf[j * n + q];
      }
    }
  });
}

template <typename T>
void finish_cpu(T* d, int64_t total, int ndim, const int64_t* size, const T* spacing, int64_t numel) {
  at::parallel_for(0, total, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) d[i] = finish<T>(d[i], i % numel, ndim, size, spacing);
  });
}

}  // namespace

Tensor seed_distances_cpu(const Tensor& seeds_in, const Tensor& query, const std::vector<double>& spacing) {
  const Tensor seeds = seeds_in.ne(0).contiguous();
  const Tensor index = query.ne(0).flatten().nonzero().flatten();  // C order, as boolean indexing
  Tensor d = at::empty(seeds.sizes(), seeds.options().dtype(at::kFloat));
  Tensor out = at::empty({index.numel()}, d.options());
  const int ndim = static_cast<int>(d.dim() - 1);
  const bool* s = seeds.const_data_ptr<bool>();
  float* dp = d.mutable_data_ptr<float>();
  // 2D: axis 1 (contiguous) by the binary two-sweep pass. 3D: axis 1 by the binary pass (its strided
  // lines walked side by side, so each cache line serves 16 of them), then axis 2 by envelopes on
  // contiguous lines (no gather into a scratch block, unlike a strided envelope pass). The first axis
  // last, at the queries only.
  const int binary_axis = ndim == 3 ? 1 : ndim - 1;
  const Lines bl = lines_along(d, binary_axis);
  const float hb = static_cast<float>(spacing[binary_axis]);
  at::parallel_for(0, bl.outer, std::max<int64_t>(1, 4096 / (bl.n * bl.inner)), [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o)
      for (int64_t k = 0; k < bl.inner; ++k) {
        const int64_t start = o * bl.n * bl.inner + k;
        seed_line_pass<float>(s + start, bl.inner, dp + start, bl.inner, bl.n, hb);
      }
  });
  if (ndim == 3) pass_cpu<float>(dp, lines_along(d, 2), static_cast<float>(spacing[2]));
  const Lines first = lines_along(d, 0);
  const float h0 = static_cast<float>(spacing[0]);
  const int64_t* qi = index.const_data_ptr<int64_t>();
  float* o = out.mutable_data_ptr<float>();
  at::parallel_for(0, index.numel(), 2048, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t x = qi[k], plane = first.n * first.inner;
      const int64_t b = x / plane, r = x - b * plane, i = r / first.inner;
      o[k] = distance_at<float>(dp + b * plane + (r - i * first.inner), first.inner, first.n, i, h0);
    }
  });
  return out;
}

Tensor distance_cpu(const Tensor& mask, const std::vector<double>& spacing, at::ScalarType dtype) {
  Tensor d = initial_squared(mask, dtype);
  const int ndim = static_cast<int>(d.dim() - 1);
  int64_t size[3] = {1, 1, 1}, numel = 1;
  for (int a = 0; a < ndim; ++a) {
    size[a] = d.size(1 + a);
    numel *= size[a];
  }
  AT_DISPATCH_FLOATING_TYPES(dtype, "medfast_distance_cpu", [&] {
    scalar_t h[3];
    for (int a = 0; a < ndim; ++a) h[a] = static_cast<scalar_t>(spacing[a]);
    scalar_t* ptr = d.mutable_data_ptr<scalar_t>();
    for (int a = 0; a < ndim; ++a) pass_cpu<scalar_t>(ptr, lines_along(d, a), h[a]);
    finish_cpu<scalar_t>(ptr, d.numel(), ndim, size, h, numel);
  });
  return d;
}

}  // namespace medfast::distance

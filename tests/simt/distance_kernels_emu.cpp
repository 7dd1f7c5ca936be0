// The CUDA kernels of the distance family (csrc/distance/distance_kernels.cuh: the binary first pass,
// the envelope pass, the finish, the seed distances' binary pass and queries, and the surface voxels)
// on the CPU under the launch emulation of simt.h, as a C library for tests/test_simt_distance.py
// (ctypes): the same kernel source as the CUDA build, launched in the launcher's order
// (distance_cuda.cu) with its geometry (kThreads per block, blocks from the multiprocessor count given
// here); checked against the CPU ops.
#include "simt.h"
// (simt.h first: the kernels' CUDA names must exist before the header is parsed)
#include "distance/distance_kernels.cuh"

#include <cstdint>
#include <limits>
#include <vector>

using namespace medfast::distance;

namespace {

// Lines along spatial axis `axis` of a contiguous (B, *size[0 .. ndim)) tensor (distance_launch.h
// lines_along).
Lines lines_along(int64_t B, int ndim, const int64_t* size, int axis) {
  Lines L{B, size[axis], 1};
  for (int a = 0; a < axis; ++a) L.outer *= size[a];
  for (int a = axis + 1; a < ndim; ++a) L.inner *= size[a];
  return L;
}

void launch(int64_t work, int64_t sms, const std::function<void()>& kernel) {
  simt::launch({static_cast<unsigned>(blocks_for(work, sms)), 1, 1}, kThreads, 0, kernel);
}

// d (B, *size): the squared-distance start (0 on background, +inf elsewhere), transformed in place as
// distance_cuda does: one pass per axis, then the finish.
template <typename T>
void transform(T* d, int64_t B, int ndim, const int64_t* size, const double* spacing, int64_t sms) {
  Geometry g{{1, 1, 1}, {1.0, 1.0, 1.0}};
  int64_t numel = 1;
  for (int a = 0; a < ndim; ++a) {
    g.size[a] = size[a];
    g.spacing[a] = spacing[a];
    numel *= size[a];
  }
  const int64_t total = B * numel;
  // Every axis has lines x n = total entries per scratch array; NaN / garbage where a kernel would read
  // what it did not write.
  std::vector<int64_t> index(static_cast<size_t>(total), -1);
  std::vector<T> scratch(static_cast<size_t>(2 * total), std::numeric_limits<T>::quiet_NaN());
  for (int a = 0; a < ndim; ++a) {
    const Lines L = lines_along(B, ndim, size, a);
    const int64_t lines = L.count();
    const T h = static_cast<T>(spacing[a]);
    if (a == 0)  // the binary start, as distance_cuda launches it
      launch(lines, sms, [&] { binary_pass_kernel<T>(d, L, h, lines); });
    else
      launch(lines, sms, [&] { pass_kernel<T>(d, L, h, index.data(), scratch.data(), lines); });
  }
  launch(total, sms, [&] { finish_kernel<T>(d, total, ndim, g, numel); });
}

}  // namespace

extern "C" {
void emu_distance_transform_f32(float* d, int64_t B, int ndim, const int64_t* size, const double* spacing,
                                int64_t sms) {
  transform<float>(d, B, ndim, size, spacing, sms);
}
void emu_distance_transform_f64(double* d, int64_t B, int ndim, const int64_t* size, const double* spacing,
                                int64_t sms) {
  transform<double>(d, B, ndim, size, spacing, sms);
}

// seeds (B, *size) bool (seeds != 0); index: the count query voxels (C order); out (count,) float32.
// As seed_distances_cuda: the binary pass along the first axis, in 3D the envelope pass along the
// middle one, then the queries along the last.
void emu_seed_distances(const bool* seeds, const int64_t* index, int64_t count, int64_t B, int ndim,
                        const int64_t* size, const double* spacing, int64_t sms, float* out) {
  int64_t total = B;
  for (int a = 0; a < ndim; ++a) total *= size[a];
  std::vector<float> d(static_cast<size_t>(total), std::numeric_limits<float>::quiet_NaN());
  const Lines first = lines_along(B, ndim, size, 0);
  const float h0 = static_cast<float>(spacing[0]);
  launch(first.count(), sms, [&] { seed_pass_kernel(seeds, d.data(), first, h0, first.count()); });
  if (ndim == 3) {
    const Lines mid = lines_along(B, ndim, size, 1);
    std::vector<int64_t> vidx(static_cast<size_t>(total), -1);
    std::vector<float> scratch(static_cast<size_t>(2 * total), std::numeric_limits<float>::quiet_NaN());
    const float h1 = static_cast<float>(spacing[1]);
    launch(mid.count(), sms,
           [&] { pass_kernel<float>(d.data(), mid, h1, vidx.data(), scratch.data(), mid.count()); });
  }
  if (count > 0) {
    const Lines last = lines_along(B, ndim, size, ndim - 1);
    const float hl = static_cast<float>(spacing[ndim - 1]);
    launch(count, sms, [&] { query_kernel(d.data(), index, count, last, hl, out); });
  }
}

// mask, out (B, *size) bool (ndim 2 or 3): surface_edges_cuda's launch (its counts are a torch sum).
void emu_surface_edges(const bool* mask, bool* out, int64_t B, int ndim, const int64_t* size, int64_t sms) {
  const int64_t D = ndim == 3 ? size[0] : 1, H = size[ndim - 2], W = size[ndim - 1];
  const int64_t total = B * D * H * W;
  launch(total, sms, [&] {
    surface_kernel(reinterpret_cast<const uint8_t*>(mask), reinterpret_cast<uint8_t*>(out), total, D, H, W,
                   ndim == 3);
  });
}

// The blocks a launch of n work items gets on `sms` multiprocessors (for the tests' geometry checks).
int64_t emu_distance_blocks(int64_t n, int64_t sms) { return blocks_for(n, sms); }
}

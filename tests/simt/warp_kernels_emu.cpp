// The CUDA kernels of the warp op (csrc/warp/warp_kernels.cuh: forward, atomic backward, warp-merged
// linear backward) on the CPU under the warp emulation of simt.h, as a C library for
// tests/test_simt.py (ctypes): the same kernel source as the CUDA build, checked against the CPU op.
#include "simt.h"
// (simt.h first: the kernels' CUDA names must exist before the header is parsed)
#include "warp/warp_kernels.cuh"

#include <cstdint>

using namespace medfast::warp;

namespace {

struct Call {
  int kernel;  // 0 forward, 1 backward (one atomic per tap), 2 merged linear backward, 3 / 4 / 5 forward with 2 /
               // 4 / 1 voxels per thread (forward_ilp_kernel; linear and nearest)
  int ndim, mode, pad;
  bool fast_index;  // IndexSplit by FastDiv (false: the int64 division path)
};

// image (image_batch, C, *in) and ddf (batch, NDIM, *out) contiguous; out / gout (batch, C, *out);
// grad_pos (batch, NDIM, *out) or null; grad_image (image_batch, C, *in) zeroed, or null.
template <typename T, int NDIM, int MODE, int PAD>
void run(const Call& call, const T* image, int64_t image_batch, int64_t C, const int64_t* in, const T* ddf,
         int64_t batch, const int64_t* out_size, T* out, const T* gout, T* grad_pos, T* grad_image) {
  WarpArgs<T, T, NDIM> A{};
  A.batch = batch;
  A.channels = C;
  A.image = image;
  A.image_batch = image_batch;
  int64_t in_numel = 1, out_numel = 1;
  for (int i = 0; i < NDIM; ++i) {
    in_numel *= in[i];
    out_numel *= out_size[i];
    A.in_size[i] = in[i];
    A.out_size[i] = out_size[i];
  }
  A.image_sb = image_batch == 1 ? 0 : C * in_numel;
  A.image_sc = in_numel;
  int64_t st = 1, dst = 1;
  for (int i = NDIM - 1; i >= 0; --i) {
    A.image_st[i] = st;
    st *= in[i];
    A.ddf_st[i] = dst;
    dst *= out_size[i];
  }
  A.out_numel = out_numel;
  A.ddf = ddf;
  A.ddf_sb = NDIM * out_numel;
  A.ddf_sc = out_numel;
  A.theta = nullptr;
  const int64_t total = batch * out_numel;
  IndexSplit<NDIM> U = make_index_split<NDIM>(total, out_numel, A.out_size);
  U.fast = U.fast && call.fast_index;
  simt::run_warp([&] {
    if (call.kernel == 0) forward_kernel<T, T, NDIM, MODE, PAD>(A, U, out, total);
    if (call.kernel == 1) backward_kernel<T, T, NDIM, MODE, PAD>(A, U, gout, grad_pos, grad_image, in_numel, total);
    if constexpr (MODE == kLinear)
      if (call.kernel == 2)
        backward_linear_merged_kernel<T, T, NDIM, PAD>(A, U, gout, grad_pos, grad_image, in_numel, total);
    if constexpr (MODE != kCubic) {
      if (call.kernel == 3) forward_ilp_kernel<T, T, NDIM, MODE, PAD, 2>(A, U, out, total);
      if (call.kernel == 4) forward_ilp_kernel<T, T, NDIM, MODE, PAD, 4>(A, U, out, total);
      if (call.kernel == 5) forward_ilp_kernel<T, T, NDIM, MODE, PAD, 1>(A, U, out, total);
    }
  });
}

template <typename T>
void dispatch(const Call& c, const T* image, int64_t image_batch, int64_t C, const int64_t* in, const T* ddf,
              int64_t batch, const int64_t* out_size, T* out, const T* gout, T* grad_pos, T* grad_image) {
  auto go = [&]<int NDIM, int MODE, int PAD>() {
    run<T, NDIM, MODE, PAD>(c, image, image_batch, C, in, ddf, batch, out_size, out, gout, grad_pos, grad_image);
  };
  auto by_pad = [&]<int NDIM, int MODE>() {
    if (c.pad == kZeros) go.template operator()<NDIM, MODE, kZeros>();
    if (c.pad == kBorder) go.template operator()<NDIM, MODE, kBorder>();
    if (c.pad == kReflection) go.template operator()<NDIM, MODE, kReflection>();
  };
  auto by_mode = [&]<int NDIM>() {
    if (c.mode == kNearest) by_pad.template operator()<NDIM, kNearest>();
    if (c.mode == kLinear) by_pad.template operator()<NDIM, kLinear>();
    if (c.mode == kCubic) by_pad.template operator()<NDIM, kCubic>();
  };
  if (c.ndim == 2) by_mode.template operator()<2>();
  if (c.ndim == 3) by_mode.template operator()<3>();
}

}  // namespace

extern "C" {
void emu_warp_f32(int kernel, int ndim, int mode, int pad, int fast_index, const float* image, int64_t image_batch,
                  int64_t C, const int64_t* in, const float* ddf, int64_t batch, const int64_t* out_size, float* out,
                  const float* gout, float* grad_pos, float* grad_image) {
  dispatch<float>({kernel, ndim, mode, pad, fast_index != 0}, image, image_batch, C, in, ddf, batch, out_size, out,
                  gout, grad_pos, grad_image);
}
void emu_warp_f64(int kernel, int ndim, int mode, int pad, int fast_index, const double* image, int64_t image_batch,
                  int64_t C, const int64_t* in, const double* ddf, int64_t batch, const int64_t* out_size,
                  double* out, const double* gout, double* grad_pos, double* grad_image) {
  dispatch<double>({kernel, ndim, mode, pad, fast_index != 0}, image, image_batch, C, in, ddf, batch, out_size, out,
                   gout, grad_pos, grad_image);
}
// fast_div of n by d for the tests of the division itself
uint32_t emu_fast_div(uint32_t n, uint32_t d) { return fast_div(n, make_fast_div(d)); }
}

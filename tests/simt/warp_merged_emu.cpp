// The warp-merged scatter kernel of the linear warp backward (csrc/warp/warp_merged.cuh) on the CPU
// under the warp emulation of simt.h, as a C library for tests/test_simt.py (ctypes): the same kernel
// source as the CUDA build, checked against the CPU op.
#include "simt.h"
// (simt.h first: the kernel's CUDA names must exist before the header is parsed)
#include "warp/warp_merged.cuh"

#include <cstdint>

using namespace medfast::warp;

namespace {

// image (image_batch, C, *in) and ddf (batch, NDIM, *out) contiguous; gout (batch, C, *out);
// grad_pos (batch, NDIM, *out) or null; grad_image (image_batch, C, *in) zeroed, or null.
template <typename T, int NDIM, int PAD>
void run(const T* image, int64_t image_batch, int64_t C, const int64_t* in, const T* ddf, int64_t batch,
         const int64_t* out, const T* gout, T* grad_pos, T* grad_image) {
  WarpArgs<T, T, NDIM> A{};
  A.batch = batch;
  A.channels = C;
  A.image = image;
  A.image_batch = image_batch;
  int64_t in_numel = 1, out_numel = 1;
  for (int i = 0; i < NDIM; ++i) {
    in_numel *= in[i];
    out_numel *= out[i];
    A.in_size[i] = in[i];
    A.out_size[i] = out[i];
  }
  A.image_sb = image_batch == 1 ? 0 : C * in_numel;
  A.image_sc = in_numel;
  int64_t st = 1, dst = 1;
  for (int i = NDIM - 1; i >= 0; --i) {
    A.image_st[i] = st;
    st *= in[i];
    A.ddf_st[i] = dst;
    dst *= out[i];
  }
  A.out_numel = out_numel;
  A.ddf = ddf;
  A.ddf_sb = NDIM * out_numel;
  A.ddf_sc = out_numel;
  A.theta = nullptr;
  simt::run_warp([&] {
    backward_linear_merged_kernel<T, T, NDIM, PAD>(A, gout, grad_pos, grad_image, in_numel, batch * out_numel);
  });
}

template <typename T>
void dispatch(int ndim, int pad, const T* image, int64_t image_batch, int64_t C, const int64_t* in, const T* ddf,
              int64_t batch, const int64_t* out, const T* gout, T* grad_pos, T* grad_image) {
  auto go = [&]<int NDIM>() {
    if (pad == kZeros) run<T, NDIM, kZeros>(image, image_batch, C, in, ddf, batch, out, gout, grad_pos, grad_image);
    if (pad == kBorder) run<T, NDIM, kBorder>(image, image_batch, C, in, ddf, batch, out, gout, grad_pos, grad_image);
    if (pad == kReflection)
      run<T, NDIM, kReflection>(image, image_batch, C, in, ddf, batch, out, gout, grad_pos, grad_image);
  };
  if (ndim == 2) go.template operator()<2>();
  if (ndim == 3) go.template operator()<3>();
}

}  // namespace

extern "C" {
void emu_warp_merged_f32(int ndim, int pad, const float* image, int64_t image_batch, int64_t C, const int64_t* in,
                         const float* ddf, int64_t batch, const int64_t* out, const float* gout, float* grad_pos,
                         float* grad_image) {
  dispatch<float>(ndim, pad, image, image_batch, C, in, ddf, batch, out, gout, grad_pos, grad_image);
}
void emu_warp_merged_f64(int ndim, int pad, const double* image, int64_t image_batch, int64_t C, const int64_t* in,
                         const double* ddf, int64_t batch, const int64_t* out, const double* gout, double* grad_pos,
                         double* grad_image) {
  dispatch<double>(ndim, pad, image, image_batch, C, in, ddf, batch, out, gout, grad_pos, grad_image);
}
}

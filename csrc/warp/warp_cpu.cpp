// CPU launcher of the warp family: at::parallel_for over all output voxels of all batches, so a
// single volume uses every core. The arithmetic is in warp.h / spline.h.
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/cpu_alloc.h"
#include "common/cpu_simd.h"
#include "warp/spline.h"
#include "warp/warp_launch.h"

namespace medfast::warp {
namespace {

// Walks (b, x, xi) in linear order without a division per voxel.
template <int NDIM>
struct VoxelCursor {
  const int64_t* size;
  int64_t numel, b, x, xi[NDIM];
  VoxelCursor(int64_t linear, const int64_t* size_, int64_t numel_) : size(size_), numel(numel_) {
    b = linear / numel;
    x = linear - b * numel;
    unravel<NDIM>(x, size, xi);
  }
  void next() {
    if (++x == numel) {
      x = 0;
      ++b;
      for (int i = 0; i < NDIM; ++i) xi[i] = 0;
      return;
    }
    for (int i = NDIM - 1; i >= 0; --i) {
      if (++xi[i] < size[i]) return;
      xi[i] = 0;
    }
  }
};

template <int MODE>
constexpr int64_t grain() {
  return MODE == kCubic ? 512 : 4096;
}

template <typename S, typename T, int NDIM, int MODE, int PAD>
void forward_loop(const WarpArgs<S, T, NDIM>& A, S* out) {
  const int64_t total = A.batch * A.out_numel;
  at::parallel_for(0, total, grain<MODE>(), [&](int64_t begin, int64_t end) {
    VoxelCursor<NDIM> v(begin, A.out_size, A.out_numel);
    for (int64_t i = begin; i < end; ++i, v.next()) forward_voxel<MODE, PAD>(A, out, v.b, v.xi, v.x);
  });
}

// The image gradient is a scatter, made race-free without atomics in one of two ways:
// - plane_parallel (image_batch x channels >= threads): each thread owns whole (batch, channel)
//   planes of the gradient and walks every output voxel that reads them (positions first, in a
//   voxel-parallel pass);
// - otherwise each of `chunks` contiguous ranges of output voxels adds into its own buffer (chunk 0
//   into the result) and the buffers are summed in a fixed order.
// Either way the result is bitwise reproducible for a given thread count.
template <typename S, typename T, int NDIM, int MODE, int PAD>
void backward_loop(const WarpArgs<S, T, NDIM>& A, const S* gout, T* grad_pos, T* grad_image, T* extra,
                   int64_t chunks, bool plane_parallel) {
  const int64_t total = A.batch * A.out_numel;
  int64_t in_numel = 1;
  for (int i = 0; i < NDIM; ++i) in_numel *= A.in_size[i];
  if (grad_image == nullptr || plane_parallel) {
    if (grad_pos != nullptr) {
      auto none = [](int64_t, T) {};
      at::parallel_for(0, total, grain<MODE>(), [&](int64_t begin, int64_t end) {
        VoxelCursor<NDIM> v(begin, A.out_size, A.out_numel);
        for (int64_t i = begin; i < end; ++i, v.next())
          backward_voxel<MODE, PAD>(A, gout, grad_pos, false, in_numel, v.b, v.xi, v.x, none);
      });
    }
    if (grad_image == nullptr) return;
    auto add = [grad_image](int64_t off, T val) { grad_image[off] += val; };
    at::parallel_for(0, A.image_batch * A.channels, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t plane = p0; plane < p1;) {  // one sweep per run of channels of one image
        const int64_t bi = plane / A.channels, c = plane - bi * A.channels;
        const int64_t c1 = std::min(A.channels, c + p1 - plane);
        const int64_t begin = A.image_batch == 1 ? 0 : bi * A.out_numel;
        const int64_t end = A.image_batch == 1 ? total : begin + A.out_numel;
        VoxelCursor<NDIM> v(begin, A.out_size, A.out_numel);
        for (int64_t i = begin; i < end; ++i, v.next())
          backward_voxel<MODE, PAD>(A, gout, static_cast<T*>(nullptr), true, in_numel, v.b, v.xi, v.x, add, c, c1);
        plane += c1 - c;
      }
    });
    return;
  }
  const int64_t image_numel = A.image_batch * A.channels * in_numel;
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      T* buf = k == 0 ? grad_image : extra + (k - 1) * image_numel;
      auto add = [buf](int64_t off, T val) { buf[off] += val; };
      const int64_t begin = total * k / chunks, end = total * (k + 1) / chunks;
      VoxelCursor<NDIM> v(begin, A.out_size, A.out_numel);
      for (int64_t i = begin; i < end; ++i, v.next())
        backward_voxel<MODE, PAD>(A, gout, grad_pos, true, in_numel, v.b, v.xi, v.x, add);
    }
  });
  reduce_chunk_buffers(grad_image, extra, chunks, image_numel);
}

template <typename T>
void reduce_buffers(T* grad_image, const T* extra, int64_t chunks, int64_t numel) {
  if (chunks <= 1) return;
  at::parallel_for(0, numel, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t k = 1; k < chunks; ++k) {
      const T* src = extra + (k - 1) * numel;
      for (int64_t i = begin; i < end; ++i) grad_image[i] += src[i];
    }
  });
}

// The AVX2 rows read the ddf's last axis with unit stride. A ddf stored channels-last ((B, D, H, W, 3)
// viewed as (B, 3, D, H, W), VoxelMorph's layout) would take the scalar loop, 5x slower than one copy.
OptTensor ddf_for_avx2(const Tensor& image, const OptTensor& ddf, int mode, int padding) {
  if (!ddf.has_value() || image.scalar_type() != at::kFloat || image.dim() != 5 || mode == kCubic ||
      ddf->stride(4) == 1 || ddf->size(4) == 1)
    return ddf;
  return ddf->contiguous();
}

// 2D float32 linear / nearest warps (ddf, theta or both): the 3D AVX2 rows on a (B, C, 1, H, W) view of the
// image, the field given a zero axis-0 channel and theta a zero axis-0 row and column (one small copy each), so
// that axis-0 positions are exactly 0. Every sample then sits exactly on the single plane (weight 1; the other
// axis-0 tap weighs 0 and is clamped, outside, or mirrored onto the plane, and contributes nothing, not even
// 0 x an inf pixel: warp.h tap_product), so values and gradients are the 2D ones (up to FMA rounding of the
// affine), from the vectorized code instead of the scalar 2D loop (which was slower than grid_sample).
bool via_3d(const Tensor& image, const OptTensor& theta, const OptTensor& ddf, int mode, int padding) {
  return image.dim() == 4 && image.scalar_type() == at::kFloat && (theta.has_value() || ddf.has_value()) &&
         mode != kCubic && cpu_simd_available();
}

OptTensor ddf_3d(const OptTensor& ddf) {
  if (!ddf.has_value()) return std::nullopt;
  return at::cat({at::zeros_like(ddf->narrow(1, 0, 1)), *ddf}, 1).unsqueeze(2);
}

// (B, 2, 3) -> (B, 3, 4): [[0, 0, 0, 0], [0 | theta]] (axis-0 position 0, the 2D map on axes 1, 2). The
// position gradient of the 3D view narrowed to axes 1, 2 is the 2D one, so the theta gradient (computed from
// it in Python) needs no mapping.
OptTensor theta_3d(const OptTensor& theta) {
  if (!theta.has_value()) return std::nullopt;
  return at::constant_pad_nd(*theta, {1, 0, 1, 0}, 0).contiguous();
}

}  // namespace

void reduce_chunk_buffers(float* grad_image, const float* extra, int64_t chunks, int64_t numel) {
  reduce_buffers(grad_image, extra, chunks, numel);
}
void reduce_chunk_buffers(double* grad_image, const double* extra, int64_t chunks, int64_t numel) {
  reduce_buffers(grad_image, extra, chunks, numel);
}

Tensor forward_cpu(const Tensor& image, const OptTensor& theta, const OptTensor& ddf_in, at::IntArrayRef shape,
                   int mode, int padding) {
  if (via_3d(image, theta, ddf_in, mode, padding))
    return forward_cpu(image.unsqueeze(2), theta_3d(theta), ddf_3d(ddf_in), {1, shape[0], shape[1]}, mode, padding)
        .squeeze(2);
  const OptTensor ddf = ddf_for_avx2(image, ddf_in, mode, padding);
  const int64_t batch = output_batch(image, theta, ddf);
  Tensor out = empty_large_cpu(output_sizes(batch, image.size(1), shape), image.options());
  if (out.numel() == 0) return out;
  dispatch_warp(image.scalar_type(), image.dim() - 2, mode, padding, [&]<typename S, int NDIM, int MODE, int PAD>() {
    const auto A = make_args<S, acc_t<S>, NDIM>(image, theta, ddf, shape);
    if constexpr (std::is_same_v<S, float> && NDIM == 3 && MODE != kCubic) {
      if (try_forward_avx2(A, MODE, PAD, out.mutable_data_ptr<S>())) return;
    }
    forward_loop<S, acc_t<S>, NDIM, MODE, PAD>(A, out.mutable_data_ptr<S>());
  });
  return out;
}

std::tuple<Tensor, Tensor> backward_cpu(const Tensor& grad, const Tensor& image, const OptTensor& theta,
                                        const OptTensor& ddf_in, at::IntArrayRef shape, int mode, int padding,
                                        bool image_grad, bool position_grad) {
  if (via_3d(image, theta, ddf_in, mode, padding)) {
    auto [gi, gp] = backward_cpu(grad.unsqueeze(2), image.unsqueeze(2), theta_3d(theta), ddf_3d(ddf_in),
                                 {1, shape[0], shape[1]}, mode, padding, image_grad, position_grad);
    return {image_grad ? gi.squeeze(2) : gi, position_grad ? gp.narrow(1, 1, 2).squeeze(2).contiguous() : gp};
  }
  const OptTensor ddf = ddf_for_avx2(image, ddf_in, mode, padding);
  const int64_t batch = output_batch(image, theta, ddf);
  const int64_t ndim = image.dim() - 2;
  const auto pos_opts = image.options().dtype(position_dtype(image.scalar_type()));
  const Tensor gout = grad.contiguous();
  Tensor grad_pos =
      position_grad ? empty_large_cpu(output_sizes(batch, ndim, shape), pos_opts) : at::empty({0}, pos_opts);
  Tensor grad_image = image_grad ? empty_large_cpu(image.sizes(), pos_opts).zero_() : at::empty({0}, pos_opts);
  const int64_t total = batch * c10::multiply_integers(shape);
  // AVX2: both gradients in one sweep, race-free without per-thread buffers (warp_cpu_avx2.cpp);
  // otherwise the schemes of backward_loop.
  if (total > 0 && image_grad && position_grad && image.scalar_type() == at::kFloat && ndim == 3 &&
      mode != kCubic) {
    const auto A = make_args<float, float, 3>(image, theta, ddf, shape);
    if (try_backward_avx2_one_sweep(A, mode, padding, gout.const_data_ptr<float>(),
                                    grad_pos.mutable_data_ptr<float>(), grad_image.mutable_data_ptr<float>()))
      return {grad_image, grad_pos};
  }
  const int64_t threads = at::get_num_threads();
  const bool plane_parallel = image_grad && image.size(0) * image.size(1) >= threads;
  // Each chunk past the first adds an image-sized gradient buffer: no more of them than the position
  // gradient's size in images (at least one), so that more threads do not cost memory without bound (an
  // image 16x the output's size took 7 extra images at 8 threads, 4x the grid_sample route's peak).
  const int64_t spare = std::max<int64_t>(1, ndim * total / std::max<int64_t>(1, image.numel()));
  const int64_t chunks =
      image_grad && !plane_parallel
          ? std::clamp<int64_t>(std::min({threads, total / 4096, spare + 1}), 1, 8)
          : 1;
  Tensor extra = chunks > 1 ? empty_large_cpu({chunks - 1, image.numel()}, pos_opts).zero_() : Tensor();
  if (total > 0 && (image_grad || position_grad)) {
    dispatch_warp(image.scalar_type(), ndim, mode, padding, [&]<typename S, int NDIM, int MODE, int PAD>() {
      using T = acc_t<S>;
      const auto A = make_args<S, T, NDIM>(image, theta, ddf, shape);
      T* gpos = position_grad ? grad_pos.mutable_data_ptr<T>() : nullptr;
      T* gimg = image_grad ? grad_image.mutable_data_ptr<T>() : nullptr;
      T* more = chunks > 1 ? extra.mutable_data_ptr<T>() : nullptr;
      if constexpr (std::is_same_v<S, float> && NDIM == 3 && MODE != kCubic) {
        if (try_backward_avx2(A, MODE, PAD, gout.const_data_ptr<S>(), gpos, gimg, more, chunks, plane_parallel))
          return;
      }
      backward_loop<S, T, NDIM, MODE, PAD>(A, gout.const_data_ptr<S>(), gpos, gimg, more, chunks, plane_parallel);
    });
  }
  if (image_grad && grad_image.scalar_type() != image.scalar_type()) grad_image = grad_image.to(image.scalar_type());
  return {grad_image, grad_pos};
}

Tensor prefilter_cpu(const Tensor& image, int padding, bool transpose) {
  const auto acc = position_dtype(image.scalar_type());
  Tensor coef = image.to(acc, /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous);
  const int64_t ndim = image.dim() - 2;
  if (coef.numel() == 0) return coef.to(image.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(acc, "medfast_spline_prefilter", [&] {
    scalar_t* data = coef.mutable_data_ptr<scalar_t>();
    for (int64_t axis = 0; axis < ndim; ++axis) {
      const int64_t n = coef.size(2 + axis);
      const int64_t inner = c10::multiply_integers(coef.sizes().slice(3 + axis));
      const int64_t outer = coef.numel() / (n * inner);
      std::vector<scalar_t> factors(3 * n);
      spline_factors_into(factors.data(), n, padding, transpose);
      // Blocks of up to kBlock adjacent lines: the inner loop of spline_solve_lines vectorizes.
      constexpr int64_t kBlock = 256;
      const int64_t blocks = (inner + kBlock - 1) / kBlock;
      at::parallel_for(0, outer * blocks, std::max<int64_t>(1, 4096 / (n * std::min(inner, kBlock))),
                       [&](int64_t begin, int64_t end) {
                         for (int64_t i = begin; i < end; ++i) {
                           const int64_t o = i / blocks, j0 = (i - o * blocks) * kBlock;
                           spline_solve_lines(data + o * n * inner + j0, n, inner, std::min(kBlock, inner - j0),
                                              factors.data());
                         }
                       });
    }
  });
  return coef.scalar_type() == image.scalar_type() ? coef : coef.to(image.scalar_type());
}

}  // namespace medfast::warp

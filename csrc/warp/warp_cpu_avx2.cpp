// AVX2 specialization of the CPU launcher for the commonest case: linear interpolation of float32
// images with "zeros" or "border" padding, 3D, displacement rows contiguous in memory. Eight
// output voxels of a row are processed at once: positions, floor, weights and (clamped) tap
// offsets in vector registers, the image read with gathers. It is the linear-tap arithmetic of
// warp.h (axis_taps_linear + make_stencil) written for eight lanes; the tests compare it with the
// generic path (set_cpu_simd(False)) and with scipy. Everything else uses the generic launcher.
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <atomic>

#include "warp/warp_launch.h"

namespace medfast::warp {

namespace {
std::atomic<bool> g_simd_enabled{true};

bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

#define MEDFAST_AVX2 __attribute__((target("avx2,fma")))

// Per-axis linear taps for eight lanes: clamped indices and weights (zeros: 0 outside).
struct Taps8 {
  __m256i i0, i1;
  __m256 w0, w1, d0, d1;  // weights and d weight / d position
};

template <int PAD>
MEDFAST_AVX2 inline Taps8 axis_taps8(__m256 x, int32_t n) {
  const __m256 lim = _mm256_set1_ps(4194304.0f);  // 2^22: far outside, and exact as int32
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_sub_ps(_mm256_setzero_ps(), lim)), lim);
  const __m256 f = _mm256_floor_ps(x);
  const __m256 t = _mm256_sub_ps(x, f);
  const __m256i i = _mm256_cvttps_epi32(f);
  const __m256i one = _mm256_set1_epi32(1), zero = _mm256_setzero_si256(), last = _mm256_set1_epi32(n - 1);
  const __m256i j = _mm256_add_epi32(i, one);
  Taps8 a;
  a.i0 = _mm256_min_epi32(_mm256_max_epi32(i, zero), last);
  a.i1 = _mm256_min_epi32(_mm256_max_epi32(j, zero), last);
  a.w0 = _mm256_sub_ps(_mm256_set1_ps(1.0f), t);
  a.w1 = t;
  a.d0 = _mm256_set1_ps(-1.0f);
  a.d1 = _mm256_set1_ps(1.0f);
  if constexpr (PAD == kZeros) {  // taps outside the image weigh nothing
    const __m256 in0 = _mm256_castsi256_ps(_mm256_cmpeq_epi32(i, a.i0));
    const __m256 in1 = _mm256_castsi256_ps(_mm256_cmpeq_epi32(j, a.i1));
    a.w0 = _mm256_and_ps(a.w0, in0);
    a.d0 = _mm256_and_ps(a.d0, in0);
    a.w1 = _mm256_and_ps(a.w1, in1);
    a.d1 = _mm256_and_ps(a.d1, in1);
  }
  return a;
}

// The eight taps of eight voxels.
struct Stencil8 {
  __m256i off[8];  // in the image (image strides)
  __m256 w[8];
  __m256 dw[3][8];
};

template <bool GRAD>
MEDFAST_AVX2 inline void stencil8(const Taps8* ax, const int32_t* st, Stencil8& s) {
  const __m256i s0 = _mm256_set1_epi32(st[0]), s1 = _mm256_set1_epi32(st[1]), s2 = _mm256_set1_epi32(st[2]);
  const __m256i o0[2] = {_mm256_mullo_epi32(ax[0].i0, s0), _mm256_mullo_epi32(ax[0].i1, s0)};
  const __m256i o1[2] = {_mm256_mullo_epi32(ax[1].i0, s1), _mm256_mullo_epi32(ax[1].i1, s1)};
  const __m256i o2[2] = {_mm256_mullo_epi32(ax[2].i0, s2), _mm256_mullo_epi32(ax[2].i1, s2)};
  const __m256 w0[2] = {ax[0].w0, ax[0].w1}, w1[2] = {ax[1].w0, ax[1].w1}, w2[2] = {ax[2].w0, ax[2].w1};
  const __m256 d0[2] = {ax[0].d0, ax[0].d1}, d1[2] = {ax[1].d0, ax[1].d1}, d2[2] = {ax[2].d0, ax[2].d1};
  int t = 0;
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < 2; ++b) {
      const __m256 wab = _mm256_mul_ps(w0[a], w1[b]);
      const __m256i oab = _mm256_add_epi32(o0[a], o1[b]);
      for (int c = 0; c < 2; ++c, ++t) {
        s.off[t] = _mm256_add_epi32(oab, o2[c]);
        s.w[t] = _mm256_mul_ps(wab, w2[c]);
        if constexpr (GRAD) {
          s.dw[0][t] = _mm256_mul_ps(_mm256_mul_ps(d0[a], w1[b]), w2[c]);
          s.dw[1][t] = _mm256_mul_ps(_mm256_mul_ps(w0[a], d1[b]), w2[c]);
          s.dw[2][t] = _mm256_mul_ps(wab, d2[c]);
        }
      }
    }
}

// Positions of eight voxels (b, x0, x1, x2 .. x2 + 7); false when one of them is NaN.
MEDFAST_AVX2 inline bool positions8(const WarpArgs<float, float, 3>& A, int64_t b, int64_t x0, int64_t x1, int64_t x2,
                                    __m256* p) {
  const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 fx[3] = {_mm256_set1_ps(float(x0)), _mm256_set1_ps(float(x1)),
                        _mm256_add_ps(_mm256_set1_ps(float(x2)), lane)};
  if (A.theta != nullptr) {
    const float* th = A.theta + b * A.theta_sb;
    for (int i = 0; i < 3; ++i) {
      __m256 acc = _mm256_set1_ps(th[i * 4 + 3]);
      for (int j = 0; j < 3; ++j) acc = _mm256_fmadd_ps(_mm256_set1_ps(th[i * 4 + j]), fx[j], acc);
      p[i] = acc;
    }
  } else {
    for (int i = 0; i < 3; ++i) p[i] = fx[i];
  }
  if (A.ddf != nullptr) {
    const float* d = A.ddf + b * A.ddf_sb + x0 * A.ddf_st[0] + x1 * A.ddf_st[1] + x2;
    for (int i = 0; i < 3; ++i) p[i] = _mm256_add_ps(p[i], _mm256_loadu_ps(d + i * A.ddf_sc));
  }
  const __m256 nan = _mm256_or_ps(_mm256_or_ps(_mm256_cmp_ps(p[0], p[0], _CMP_UNORD_Q),
                                               _mm256_cmp_ps(p[1], p[1], _CMP_UNORD_Q)),
                                  _mm256_cmp_ps(p[2], p[2], _CMP_UNORD_Q));
  return _mm256_testz_ps(nan, nan);
}

template <int PAD>
MEDFAST_AVX2 void forward_rows(const WarpArgs<float, float, 3>& A, float* out, const int32_t* st, int64_t r0,
                               int64_t r1) {
  const int64_t W = A.out_size[2];
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / (A.out_size[0] * A.out_size[1]), rem = r - b * A.out_size[0] * A.out_size[1];
    int64_t xi[3] = {rem / A.out_size[1], rem % A.out_size[1], 0};
    const int64_t row = xi[0] * A.out_size[1] * W + xi[1] * W;
    const float* img = A.image + b * A.image_sb;
    float* o = out + b * A.channels * A.out_numel + row;
    int64_t w = 0;
    for (; w + 8 <= W; w += 8) {
      __m256 p[3];
      if (!positions8(A, b, xi[0], xi[1], w, p)) break;  // NaN: the scalar path handles the rest
      Taps8 ax[3];
      for (int i = 0; i < 3; ++i) ax[i] = axis_taps8<PAD>(p[i], int32_t(A.in_size[i]));
      Stencil8 s;
      stencil8<false>(ax, st, s);
      for (int64_t c = 0; c < A.channels; ++c) {
        const float* ic = img + c * A.image_sc;
        __m256 acc = _mm256_mul_ps(s.w[0], _mm256_i32gather_ps(ic, s.off[0], 4));
        for (int t = 1; t < 8; ++t) acc = _mm256_fmadd_ps(s.w[t], _mm256_i32gather_ps(ic, s.off[t], 4), acc);
        _mm256_storeu_ps(o + c * A.out_numel + w, acc);
      }
    }
    for (; w < W; ++w) {
      xi[2] = w;
      forward_voxel<kLinear, PAD>(A, out, b, xi, row + w);
    }
  }
}

template <int PAD>
void forward_avx2(const WarpArgs<float, float, 3>& A, float* out, const int32_t* st) {
  const int64_t rows = A.batch * A.out_size[0] * A.out_size[1];
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / A.out_size[2]),
                   [&](int64_t r0, int64_t r1) { forward_rows<PAD>(A, out, st, r0, r1); });
}

// Backward of rows [r0, r1), image gradient added into buf (nullptr: none).
template <int PAD>
MEDFAST_AVX2 void backward_rows(const WarpArgs<float, float, 3>& A, const float* gout, float* grad_pos, float* buf,
                                const int32_t* st, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  const int64_t W = A.out_size[2], plane = A.out_size[0] * A.out_size[1];
  const int64_t in_numel = A.in_size[0] * A.in_size[1] * A.in_size[2];
  const int32_t lin_st[3] = {int32_t(A.in_size[1] * A.in_size[2]), int32_t(A.in_size[2]), 1};
  auto add = [buf](int64_t off, float val) { buf[off] += val; };
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / plane, rem = r - b * plane;
    int64_t xi[3] = {rem / A.out_size[1], rem % A.out_size[1], 0};
    const int64_t row = xi[0] * A.out_size[1] * W + xi[1] * W;
    const float* img = A.image + b * A.image_sb;
    const float* g = gout + b * A.channels * A.out_numel + row;
    const int64_t gbase = (A.image_batch == 1 ? 0 : b) * A.channels * in_numel;
    int64_t w = 0;
    for (; w + 8 <= W; w += 8) {
      __m256 p[3];
      if (!positions8(A, b, xi[0], xi[1], w, p)) break;
      Taps8 ax[3];
      for (int i = 0; i < 3; ++i) ax[i] = axis_taps8<PAD>(p[i], int32_t(A.in_size[i]));
      Stencil8 s;
      stencil8<true>(ax, st, s);
      __m256 gp[3] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      alignas(32) int32_t lin[8][8];
      if (buf != nullptr) {
        Stencil8 l;  // tap offsets in the contiguous gradient buffer
        stencil8<false>(ax, lin_st, l);
        for (int t = 0; t < 8; ++t) _mm256_store_si256(reinterpret_cast<__m256i*>(lin[t]), l.off[t]);
      }
      for (int64_t c = c0; c < c1; ++c) {
        const __m256 gc = _mm256_loadu_ps(g + c * A.out_numel + w);
        if (grad_pos != nullptr) {
          const float* ic = img + c * A.image_sc;
          for (int t = 0; t < 8; ++t) {
            const __m256 v = _mm256_mul_ps(gc, _mm256_i32gather_ps(ic, s.off[t], 4));
            for (int i = 0; i < 3; ++i) gp[i] = _mm256_fmadd_ps(s.dw[i][t], v, gp[i]);
          }
        }
        if (buf != nullptr) {
          alignas(32) float gw[8][8];
          for (int t = 0; t < 8; ++t) _mm256_store_ps(gw[t], _mm256_mul_ps(gc, s.w[t]));
          float* cb = buf + gbase + c * in_numel;
          for (int lane = 0; lane < 8; ++lane)
            for (int t = 0; t < 8; ++t) cb[lin[t][lane]] += gw[t][lane];
        }
      }
      if (grad_pos != nullptr)
        for (int i = 0; i < 3; ++i) _mm256_storeu_ps(grad_pos + (b * 3 + i) * A.out_numel + row + w, gp[i]);
    }
    for (; w < W; ++w) {
      xi[2] = w;
      backward_voxel<kLinear, PAD>(A, gout, grad_pos, buf != nullptr, in_numel, b, xi, row + w, add, c0, c1);
    }
  }
}

// Same schemes as the generic launcher (warp_cpu.cpp): whole (batch, channel) planes per thread,
// or contiguous ranges of rows with one gradient buffer each, summed in a fixed order.
template <int PAD>
void backward_avx2(const WarpArgs<float, float, 3>& A, const float* gout, float* grad_pos, float* grad_image,
                   float* extra, int64_t chunks, bool plane_parallel, const int32_t* st) {
  const int64_t plane = A.out_size[0] * A.out_size[1], rows = A.batch * plane, C = A.channels;
  const int64_t image_numel = A.image_batch * C * A.in_size[0] * A.in_size[1] * A.in_size[2];
  if (grad_image == nullptr || plane_parallel) {
    if (grad_pos != nullptr)
      at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / A.out_size[2]), [&](int64_t r0, int64_t r1) {
        backward_rows<PAD>(A, gout, grad_pos, nullptr, st, r0, r1, 0, C);
      });
    if (grad_image == nullptr) return;
    at::parallel_for(0, A.image_batch * C, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t bi = p / C, c = p - bi * C;
        const int64_t r0 = A.image_batch == 1 ? 0 : bi * plane, r1 = A.image_batch == 1 ? rows : r0 + plane;
        backward_rows<PAD>(A, gout, nullptr, grad_image, st, r0, r1, c, c + 1);
      }
    });
    return;
  }
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      float* buf = k == 0 ? grad_image : extra + (k - 1) * image_numel;
      backward_rows<PAD>(A, gout, grad_pos, buf, st, rows * k / chunks, rows * (k + 1) / chunks, 0, C);
    }
  });
  reduce_chunk_buffers(grad_image, extra, chunks, image_numel);
}

// int32 strides of the image when every offset fits (gathers take 32-bit indices).
bool int32_strides(const WarpArgs<float, float, 3>& A, int32_t* st) {
  int64_t span = 0;
  for (int i = 0; i < 3; ++i) {
    if (A.image_st[i] < 0) return false;
    span += (A.in_size[i] - 1) * A.image_st[i];
    st[i] = int32_t(A.image_st[i]);
  }
  return span < (int64_t(1) << 31) && A.image_batch * A.channels * A.in_size[0] * A.in_size[1] * A.in_size[2] <
                                          (int64_t(1) << 31);
}

bool applicable(const WarpArgs<float, float, 3>& A, int padding) {
  return g_simd_enabled.load(std::memory_order_relaxed) && cpu_has_avx2() && padding != kReflection &&
         (A.ddf == nullptr || A.ddf_st[2] == 1);
}

}  // namespace

void set_cpu_simd(bool enabled) { g_simd_enabled.store(enabled); }
bool cpu_simd_available() { return cpu_has_avx2() && g_simd_enabled.load(); }

bool try_forward_avx2(const WarpArgs<float, float, 3>& A, int padding, float* out) {
  int32_t st[3];
  if (!applicable(A, padding) || !int32_strides(A, st)) return false;
  if (padding == kZeros) forward_avx2<kZeros>(A, out, st);
  else forward_avx2<kBorder>(A, out, st);
  return true;
}

bool try_backward_avx2(const WarpArgs<float, float, 3>& A, int padding, const float* gout, float* grad_pos,
                       float* grad_image, float* extra, int64_t chunks, bool plane_parallel) {
  int32_t st[3];
  if (!applicable(A, padding) || !int32_strides(A, st)) return false;
  if (padding == kZeros) backward_avx2<kZeros>(A, gout, grad_pos, grad_image, extra, chunks, plane_parallel, st);
  else backward_avx2<kBorder>(A, gout, grad_pos, grad_image, extra, chunks, plane_parallel, st);
  return true;
}

}  // namespace medfast::warp

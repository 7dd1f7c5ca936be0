// The arithmetic of the warp family, written once for both launchers (CPU and CUDA).
//
// One output voxel x samples the image at a position p = theta @ [x; 1] + ddf(x) (voxel units),
// with nearest / linear / cubic B-spline interpolation and three boundary conditions that match
// scipy.ndimage.map_coordinates: "zeros" (grid-constant, cval 0), "border" (nearest), and
// "reflection" (mirror). Each axis contributes K taps (index, weight, d weight / d position); the
// N-d value, its gradient and the adjoint scatter are tensor products over those taps.
#pragma once
#include <cmath>

#include "common/macros.h"

namespace medfast::warp {

enum Mode : int { kNearest = 0, kLinear = 1, kCubic = 2 };
enum Padding : int { kZeros = 0, kBorder = 1, kReflection = 2 };

template <int MODE> struct taps_of;
template <> struct taps_of<kNearest> { static constexpr int value = 1; };
template <> struct taps_of<kLinear> { static constexpr int value = 2; };
template <> struct taps_of<kCubic> { static constexpr int value = 4; };

// Pole of the cubic B-spline interpolation filter, sqrt(3) - 2.
constexpr double kPole = -0.267949192431122706472553658494127633;
// Positions are clamped to +-kFar before rounding to integers: far enough to be "outside" for
// every boundary mode, small enough that int64 arithmetic cannot overflow.
constexpr double kFar = 1e12;

template <typename T, int K>
struct AxisTaps {
  int64_t idx[K];  // in-range index into the (coefficient) image along this axis
  T w[K];          // interpolation weight
  T dw[K];         // d weight / d position
};

// kPole^d for an integer d >= 0 (the pole is negative, so no pow() of a negative base).
template <typename T>
MEDFAST_HOST_DEVICE T pole_power(int64_t d) {
  const T mag = exp(T(d) * T(-1.3169578969248167086250463473079684440));  // log(-kPole)
  return (d & 1) ? -mag : mag;
}

template <typename T>
MEDFAST_HOST_DEVICE T clamp_position(T x) {
  return x < T(-kFar) ? T(-kFar) : (x > T(kFar) ? T(kFar) : x);
}

// Round half up (scipy's order 0). Not floor(x + 0.5): in float32 0.49999997 + 0.5 rounds to 1.
template <typename T>
MEDFAST_HOST_DEVICE T round_half_up(T x) {
  const T f = floor(x);
  return x - f >= T(0.5) ? f + T(1) : f;  // x - f is exact
}

template <int PAD, typename T>
MEDFAST_HOST_DEVICE void axis_taps_nearest(T x, int64_t n, AxisTaps<T, 1>& a) {
  // Round half up, as scipy's order-0 map_coordinates does; like scipy, mirror the continuous
  // position first (it decides ties beyond the edge), in scipy's order: a negative position is
  // mirrored about 0 (into [0, n - 1]); a position past n - 1 is taken modulo the period and mirrored
  // only from n on, so one in (n - 1, n) rounds to n - 1 or n, and the index n mirrors to n - 2.
  x = clamp_position(x);
  if constexpr (PAD == kReflection) {
    const T period = T(2 * (n - 1));
    if (n == 1) {
      x = T(0);
    } else if (x < T(0)) {
      x = fmod(x, period);  // (-period, 0]
      x = x <= T(1 - n) ? x + period : -x;
    } else if (x > T(n - 1)) {
      x = fmod(x, period);
      if (x >= T(n)) x = period - x;
    }
  }
  const int64_t i = static_cast<int64_t>(round_half_up(x));
  a.dw[0] = T(0);
  a.w[0] = T(1);
  if constexpr (PAD == kZeros) {
    const bool inside = i >= 0 && i < n;
    a.idx[0] = inside ? i : 0;
    a.w[0] = inside ? T(1) : T(0);
  } else if constexpr (PAD == kBorder) {
    a.idx[0] = clamp_index(i, n);
  } else {
    a.idx[0] = mirror_index(i, n);
  }
}

template <int PAD, typename T>
MEDFAST_HOST_DEVICE void axis_taps_linear(T x, int64_t n, AxisTaps<T, 2>& a) {
  x = clamp_position(x);
  const T f = floor(x);
  const int64_t i0 = static_cast<int64_t>(f);
  const T t = x - f;
  a.w[0] = T(1) - t;
  a.w[1] = t;
  a.dw[0] = T(-1);
  a.dw[1] = T(1);
MEDFAST_UNROLL
  for (int k = 0; k < 2; ++k) {
    const int64_t i = i0 + k;
    if constexpr (PAD == kZeros) {
      if (i < 0 || i >= n) {
        a.w[k] = T(0);
        a.dw[k] = T(0);
      }
      a.idx[k] = clamp_index(i, n);
    } else if constexpr (PAD == kBorder) {
      a.idx[k] = clamp_index(i, n);
    } else {
      a.idx[k] = mirror_index(i, n);
    }
  }
}

// Cubic B-spline over the coefficients c of the interpolating spline. Out-of-range coefficients
// follow from the boundary condition and are folded onto in-range ones, so the coefficient array
// has the image's shape:
//   reflection: c is mirror-symmetric too, so the tap index is mirrored;
//   zeros:      c[n-1+d] = z^d c[n-1]                       (z = kPole; likewise on the left);
//   border:     c[n-1+d] = a + (c[n-1] - a) z^d,  a = ((4+z) c[n-1] + c[n-2]) / (5+z)  (= f[n-1]).
template <int PAD, typename T>
MEDFAST_HOST_DEVICE void axis_taps_cubic(T x, int64_t n, AxisTaps<T, 4>& a) {
  x = clamp_position(x);
  const T f = floor(x);
  const int64_t i0 = static_cast<int64_t>(f);
  const T t = x - f, u = T(1) - t, t2 = t * t;
  const T w[4] = {u * u * u / T(6), (T(3) * t2 * t - T(6) * t2 + T(4)) / T(6),
                  (T(-3) * t2 * t + T(3) * t2 + T(3) * t + T(1)) / T(6), t2 * t / T(6)};
  const T dw[4] = {-u * u / T(2), (T(3) * t2 - T(4) * t) / T(2), (T(-3) * t2 + T(2) * t + T(1)) / T(2),
                   t2 / T(2)};
  if constexpr (PAD == kReflection) {
MEDFAST_UNROLL
    for (int k = 0; k < 4; ++k) {
      a.idx[k] = mirror_index(i0 - 1 + k, n);
      a.w[k] = w[k];
      a.dw[k] = dw[k];
    }
    return;
  }
  // Window of m <= 4 consecutive in-range coefficients that every tap folds onto.
  const int64_t m = n < 4 ? n : 4;
  int64_t s = i0 - 1;
  s = s < 0 ? 0 : (s > n - m ? n - m : s);
MEDFAST_UNROLL
  for (int k = 0; k < 4; ++k) {
    a.idx[k] = s + (k < m ? k : 0);
    a.w[k] = T(0);
    a.dw[k] = T(0);
  }
  const T z = T(kPole);
MEDFAST_UNROLL
  for (int k = 0; k < 4; ++k) {
    const int64_t i = i0 - 1 + k;
    if (i >= 0 && i < n) {
      a.w[i - s] += w[k];
      a.dw[i - s] += dw[k];
      continue;
    }
    const int64_t d = i < 0 ? -i : i - (n - 1);  // distance outside
    const int64_t edge = i < 0 ? 0 : n - 1;
    const T zd = pole_power<T>(d);
    if constexpr (PAD == kZeros) {
      a.w[edge - s] += zd * w[k];
      a.dw[edge - s] += zd * dw[k];
    } else if (n == 1) {  // border, a single sample: constant signal
      a.w[0] += w[k];
      a.dw[0] += dw[k];
    } else {  // border
      const int64_t inner = i < 0 ? 1 : n - 2;
      const T g = (T(1) - zd) / (T(5) + z);
      const T ge = g * (T(4) + z) + zd;
      a.w[edge - s] += ge * w[k];
      a.dw[edge - s] += ge * dw[k];
      a.w[inner - s] += g * w[k];
      a.dw[inner - s] += g * dw[k];
    }
  }
}

template <int MODE, int PAD, typename T>
MEDFAST_HOST_DEVICE void axis_taps(T x, int64_t n, AxisTaps<T, taps_of<MODE>::value>& a) {
  if constexpr (MODE == kNearest) {
    axis_taps_nearest<PAD>(x, n, a);
  } else if constexpr (MODE == kLinear) {
    axis_taps_linear<PAD>(x, n, a);
  } else {
    axis_taps_cubic<PAD>(x, n, a);
  }
}

// The K^NDIM taps of one sample as flat lists: the tensor products of the per-axis weights
// (and of their derivatives) are formed once per voxel and reused for every channel. I: the type of
// the image offsets, int64, or int32 where the launcher knows that one batch element of the image
// has fewer than 2^31 elements (fewer registers and integer instructions on a GPU).
template <typename T, int NDIM, int K, typename I = int64_t>
struct Stencil {
  static constexpr int N = NDIM == 3 ? K * K * K : K * K;
  I off[N];           // offset of the tap in the image (image strides)
  int64_t lin[N];     // offset of the tap in a contiguous buffer of the image's spatial shape
  T w[N];             // weight
  T dw[NDIM][N];      // d weight / d position along each axis (only with GRAD)
};

template <bool GRAD, typename T, int NDIM, int K, typename I>
MEDFAST_HOST_DEVICE void make_stencil(const AxisTaps<T, K>* ax, const int64_t* stride, const int64_t* size,
                                      Stencil<T, NDIM, K, I>& s) {
  int t = 0;
  if constexpr (NDIM == 2) {
    MEDFAST_UNROLL
    for (int a = 0; a < K; ++a) {
      MEDFAST_UNROLL
      for (int b = 0; b < K; ++b, ++t) {
        s.off[t] = I(ax[0].idx[a]) * I(stride[0]) + I(ax[1].idx[b]) * I(stride[1]);
        s.lin[t] = ax[0].idx[a] * size[1] + ax[1].idx[b];
        s.w[t] = ax[0].w[a] * ax[1].w[b];
        if constexpr (GRAD) {
          s.dw[0][t] = ax[0].dw[a] * ax[1].w[b];
          s.dw[1][t] = ax[0].w[a] * ax[1].dw[b];
        }
      }
    }
  } else {
    MEDFAST_UNROLL
    for (int a = 0; a < K; ++a) {
      MEDFAST_UNROLL
      for (int b = 0; b < K; ++b) {
        const T wab = ax[0].w[a] * ax[1].w[b];
        const T dab0 = ax[0].dw[a] * ax[1].w[b], dab1 = ax[0].w[a] * ax[1].dw[b];
        const I oab = I(ax[0].idx[a]) * I(stride[0]) + I(ax[1].idx[b]) * I(stride[1]);
        const int64_t lab = (ax[0].idx[a] * size[1] + ax[1].idx[b]) * size[2];
        MEDFAST_UNROLL
        for (int c = 0; c < K; ++c, ++t) {
          s.off[t] = oab + I(ax[2].idx[c]) * I(stride[2]);
          s.lin[t] = lab + ax[2].idx[c];
          s.w[t] = wab * ax[2].w[c];
          if constexpr (GRAD) {
            s.dw[0][t] = dab0 * ax[2].w[c];
            s.dw[1][t] = dab1 * ax[2].w[c];
            s.dw[2][t] = wab * ax[2].dw[c];
          }
        }
      }
    }
  }
}

// Everything a launcher needs about one call; plain data so it can be passed to a CUDA kernel.
// S: image dtype; T: position dtype and accumulation type (float, or double for double images).
template <typename S, typename T, int NDIM>
struct WarpArgs {
  const S* image;
  int64_t image_sb, image_sc, image_st[NDIM];  // strides (elements); image_sb = 0 when broadcast
  int64_t in_size[NDIM];
  int64_t image_batch;  // 1 (broadcast) or batch
  const T* ddf;         // nullptr: no displacement
  int64_t ddf_sb, ddf_sc, ddf_st[NDIM];
  const T* theta;  // nullptr: identity; else rows of (NDIM, NDIM + 1), contiguous per batch
  int64_t theta_sb;
  int64_t batch, channels;
  int64_t out_size[NDIM], out_numel;
};

// Output voxel index (b, x) -> spatial multi-index.
template <int NDIM>
MEDFAST_HOST_DEVICE void unravel(int64_t x, const int64_t* size, int64_t* xi) {
MEDFAST_UNROLL
  for (int i = NDIM - 1; i > 0; --i) {
    xi[i] = x % size[i];
    x /= size[i];
  }
  xi[0] = x;
}

// Division by a divisor fixed for a whole kernel launch, as a multiply-high, an add and a shift
// (Granlund & Montgomery, PLDI 1994): q = (mulhi(n, magic) + n) >> shift, exact for n, d < 2^31. The
// GPU kernels split their flat output index into (batch, voxel) and the voxel into its coordinates
// with it: int64 division is a long emulated sequence on a GPU, several per voxel.
struct FastDiv {
  uint32_t d, magic, shift;
};

inline FastDiv make_fast_div(uint32_t d) {  // host: 1 <= d < 2^31
  FastDiv f{d, 0, 0};
  while ((uint64_t(1) << f.shift) < d) ++f.shift;
  f.magic = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << f.shift) - d)) / d + 1);
  return f;
}

MEDFAST_HOST_DEVICE uint32_t fast_div(uint32_t n, const FastDiv& f) {
#ifdef __CUDA_ARCH__
  const uint32_t t = __umulhi(n, f.magic);
#else
  const uint32_t t = static_cast<uint32_t>((static_cast<uint64_t>(n) * f.magic) >> 32);
#endif
  return (t + n) >> f.shift;
}

// Flat output index i of a launch -> (batch b, voxel x, coordinates xi): by FastDiv when the launch
// has fewer than 2^31 outputs (`fast`), else by int64 division.
template <int NDIM>
struct IndexSplit {
  bool fast;
  FastDiv numel, size[NDIM];
};

template <int NDIM>
inline IndexSplit<NDIM> make_index_split(int64_t total, int64_t out_numel, const int64_t* out_size) {
  IndexSplit<NDIM> u{};
  u.fast = total < (int64_t(1) << 31) && out_numel >= 1;
  if (u.fast) {
    u.numel = make_fast_div(static_cast<uint32_t>(out_numel));
    for (int k = 0; k < NDIM; ++k) u.size[k] = make_fast_div(static_cast<uint32_t>(out_size[k] > 0 ? out_size[k] : 1));
  }
  return u;
}

template <int NDIM>
MEDFAST_HOST_DEVICE void split_index(int64_t i, const IndexSplit<NDIM>& u, int64_t out_numel, const int64_t* out_size,
                                     int64_t& b, int64_t& x, int64_t* xi) {
  if (u.fast) {
    const uint32_t n = static_cast<uint32_t>(i);
    const uint32_t bq = fast_div(n, u.numel);
    uint32_t r = n - bq * u.numel.d;
    b = bq;
    x = r;
MEDFAST_UNROLL
    for (int k = NDIM - 1; k > 0; --k) {
      const uint32_t q = fast_div(r, u.size[k]);
      xi[k] = r - q * u.size[k].d;
      r = q;
    }
    xi[0] = r;
    return;
  }
  b = i / out_numel;
  x = i - b * out_numel;
  unravel<NDIM>(x, out_size, xi);
}

// Sampling position of output voxel xi in batch b; false when it is NaN.
template <typename S, typename T, int NDIM>
MEDFAST_HOST_DEVICE bool sample_position(const WarpArgs<S, T, NDIM>& A, int64_t b, const int64_t* xi, T* p) {
  if (A.theta != nullptr) {
    const T* th = A.theta + b * A.theta_sb;
MEDFAST_UNROLL
    for (int i = 0; i < NDIM; ++i) {
      T acc = th[i * (NDIM + 1) + NDIM];
MEDFAST_UNROLL
      for (int j = 0; j < NDIM; ++j) acc += th[i * (NDIM + 1) + j] * static_cast<T>(xi[j]);
      p[i] = acc;
    }
  } else {
MEDFAST_UNROLL
    for (int i = 0; i < NDIM; ++i) p[i] = static_cast<T>(xi[i]);
  }
  if (A.ddf != nullptr) {
    int64_t off = b * A.ddf_sb;
MEDFAST_UNROLL
    for (int j = 0; j < NDIM; ++j) off += xi[j] * A.ddf_st[j];
MEDFAST_UNROLL
    for (int i = 0; i < NDIM; ++i) p[i] += A.ddf[off + i * A.ddf_sc];
  }
  bool ok = true;
MEDFAST_UNROLL
  for (int i = 0; i < NDIM; ++i) ok = ok && (p[i] == p[i]);
  return ok;
}

template <int MODE, int PAD, typename S, typename T, int NDIM>
MEDFAST_HOST_DEVICE void compute_taps(const WarpArgs<S, T, NDIM>& A, const T* p,
                                      AxisTaps<T, taps_of<MODE>::value>* ax) {
MEDFAST_UNROLL
  for (int i = 0; i < NDIM; ++i) axis_taps<MODE, PAD>(p[i], A.in_size[i], ax[i]);
}

// Zeros padding: whether the sample lies so far beyond the image along some axis that no tap inside
// has a weight (nearest: the rounded position; linear: both taps, or at x = -1 exactly the inside tap
// 0 with weight 0, counted outside as the AVX2 path finds it from the weights). Such a sample is
// exactly 0, has no gradient, and reads nothing: its taps keep in-range indices with weight 0, and
// 0 x a NaN or inf image value would be NaN where scipy's grid-constant gives 0. (Cubic taps fold onto
// the edge coefficients: the spline continues outside, so they are read.) A sample straddling the
// edge still reads its edge voxels, as scipy does.
template <int MODE, int PAD, typename T, int NDIM>
MEDFAST_HOST_DEVICE bool sample_outside(const T* p, const int64_t* n) {
  if constexpr (PAD != kZeros || MODE == kCubic) {
    return false;
  } else {
    bool out = false;
MEDFAST_UNROLL
    for (int i = 0; i < NDIM; ++i) {
      if constexpr (MODE == kNearest) {
        const T r = round_half_up(p[i]);  // outside [0, n): as axis_taps_nearest rounds
        out = out || r < T(0) || r >= T(n[i]);
      } else {
        out = out || p[i] <= T(-1) || p[i] >= T(n[i]);  // no tap inside with a weight
      }
    }
    return out;
  }
}

// What forward_stencil found for an output voxel: a NaN position (NaN in every channel), a sample
// outside the image under zeros padding (0, nothing read), or a stencil to sum.
enum SampleKind : int { kSampleNaN = 0, kSampleStencil = 1, kSampleZero = 2 };

// The taps of output voxel xi of batch b (position, per-axis taps, stencil) and what to do with them.
template <int MODE, int PAD, typename S, typename T, int NDIM, typename I>
MEDFAST_HOST_DEVICE int forward_stencil(const WarpArgs<S, T, NDIM>& A, int64_t b, const int64_t* xi,
                                        Stencil<T, NDIM, taps_of<MODE>::value, I>& s) {
  T p[NDIM];
  if (!sample_position(A, b, xi, p)) return kSampleNaN;
  if (sample_outside<MODE, PAD, T, NDIM>(p, A.in_size)) return kSampleZero;
  AxisTaps<T, taps_of<MODE>::value> ax[NDIM];
  compute_taps<MODE, PAD>(A, p, ax);
  make_stencil<false>(ax, A.image_st, A.in_size, s);
  return kSampleStencil;
}

// w x v, exactly 0 where the coefficient w is 0: a tap with no weight contributes nothing, even where
// it reads inf or NaN (0 x inf is NaN). Such taps are common: the upper tap at an exact grid position
// (an identity or integer warp), an outside tap clamped onto the edge under zeros padding, and the
// phantom axis of a 2D image warped as a one-plane 3D volume (warp_cpu.cpp via_3d), whose second tap
// reads the same plane with weight 0. v is then the image value (forward), the upstream gradient
// (image gradient) or their product (position gradient, w = d weight / d position).
template <typename T>
MEDFAST_HOST_DEVICE T tap_product(T w, T v) {
  return w == T(0) ? T(0) : w * v;
}

// One channel's interpolated value: sum_t w[t] image[tap t], in tap order. The plain multiply-adds first
// (a compare per tap would slow the cubic loops by a third); only a NaN sum, where some tap read inf or NaN,
// is summed again with tap_product.
template <typename S, typename T, int NDIM, int K, typename I>
MEDFAST_HOST_DEVICE T stencil_sum(const Stencil<T, NDIM, K, I>& s, const S* img) {
  T acc = T(0);
  MEDFAST_UNROLL
  for (int t = 0; t < Stencil<T, NDIM, K, I>::N; ++t) acc += s.w[t] * static_cast<T>(img[s.off[t]]);
  if (acc != acc) {
    acc = T(0);
    for (int t = 0; t < Stencil<T, NDIM, K, I>::N; ++t) acc += tap_product(s.w[t], static_cast<T>(img[s.off[t]]));
  }
  return acc;
}

// Forward: out is contiguous (batch, channels, out_numel). A NaN position gives NaN in every channel.
template <int MODE, int PAD, typename S, typename T, int NDIM>
MEDFAST_HOST_DEVICE void forward_voxel(const WarpArgs<S, T, NDIM>& A, S* out, int64_t b, const int64_t* xi,
                                       int64_t x) {
  Stencil<T, NDIM, taps_of<MODE>::value> s;
  S* o = out + b * A.channels * A.out_numel + x;
  const int kind = forward_stencil<MODE, PAD>(A, b, xi, s);
  if (kind != kSampleStencil) {
    const S fill = kind == kSampleNaN ? static_cast<S>(NAN) : S(0);
    for (int64_t c = 0; c < A.channels; ++c) o[c * A.out_numel] = fill;
    return;
  }
  const S* img = A.image + b * A.image_sb;
  for (int64_t c = 0; c < A.channels; ++c, img += A.image_sc) o[c * A.out_numel] = static_cast<S>(stencil_sum(s, img));
}

// d loss / d position of one voxel and channel: gp += gc * sum_t dw[t] * image[tap t].
// As stencil_sum: the plain sums first, and again with tap_product only where one came out NaN.
template <typename S, typename T, int NDIM, int K>
MEDFAST_HOST_DEVICE void add_position_grad(const Stencil<T, NDIM, K>& s, const S* img, T gc, T* gp) {
  T before[NDIM];
  bool nan = false;
  MEDFAST_UNROLL
  for (int i = 0; i < NDIM; ++i) before[i] = gp[i];
  MEDFAST_UNROLL
  for (int t = 0; t < Stencil<T, NDIM, K>::N; ++t) {
    const T v = gc * static_cast<T>(img[s.off[t]]);
    MEDFAST_UNROLL
    for (int i = 0; i < NDIM; ++i) gp[i] += s.dw[i][t] * v;
  }
  MEDFAST_UNROLL
  for (int i = 0; i < NDIM; ++i) nan |= gp[i] != gp[i] && before[i] == before[i];
  if (!nan) return;
  for (int i = 0; i < NDIM; ++i) gp[i] = before[i];
  for (int t = 0; t < Stencil<T, NDIM, K>::N; ++t) {
    const T v = gc * static_cast<T>(img[s.off[t]]);
    for (int i = 0; i < NDIM; ++i) gp[i] += tap_product(s.dw[i][t], v);
  }
}

// Backward of one output voxel.
//   gout: contiguous (batch, channels, out_numel) gradient of the output.
//   grad_pos (optional): contiguous (batch, NDIM, out_numel), d loss / d position.
//   image_grad: calls add(offset, value) for a contiguous (image_batch, channels, *in_size) buffer.
template <int MODE, int PAD, typename S, typename T, int NDIM, typename Add>
MEDFAST_HOST_DEVICE void backward_voxel(const WarpArgs<S, T, NDIM>& A, const S* gout, T* grad_pos, bool image_grad,
                                        int64_t in_numel, int64_t b, const int64_t* xi, int64_t x, Add& add,
                                        int64_t c_begin = 0, int64_t c_end = -1) {
  constexpr int K = taps_of<MODE>::value;
  constexpr bool kPosGrad = MODE != kNearest;  // nearest is piecewise constant
  using St = Stencil<T, NDIM, K>;
  T p[NDIM];
  const bool finite = sample_position(A, b, xi, p);
  if (!finite || sample_outside<MODE, PAD, T, NDIM>(p, A.in_size)) {  // NaN, or 0 without a gradient
    if (grad_pos != nullptr)
      for (int i = 0; i < NDIM; ++i) grad_pos[(b * NDIM + i) * A.out_numel + x] = finite ? T(0) : static_cast<T>(NAN);
    return;
  }
  AxisTaps<T, K> ax[NDIM];
  compute_taps<MODE, PAD>(A, p, ax);
  St s;
  make_stencil<kPosGrad>(ax, A.image_st, A.in_size, s);
  if (c_end < 0) c_end = A.channels;  // a channel range: for launchers that split the scatter by plane
  const S* img = A.image + b * A.image_sb + c_begin * A.image_sc;
  const S* g = gout + b * A.channels * A.out_numel + x;
  int64_t gbase = ((A.image_batch == 1 ? 0 : b) * A.channels + c_begin) * in_numel;
  const bool pos_grad = kPosGrad && grad_pos != nullptr;
  T gp[NDIM];
  MEDFAST_UNROLL
  for (int i = 0; i < NDIM; ++i) gp[i] = T(0);
  for (int64_t c = c_begin; c < c_end; ++c, img += A.image_sc, gbase += in_numel) {
    const T gc = static_cast<T>(g[c * A.out_numel]);
    if (gc == T(0)) continue;
    if (pos_grad) add_position_grad(s, img, gc, gp);
    if (image_grad) {
      if (gc - gc == T(0)) {  // finite: w x gc is never NaN (a compare per tap would slow the cubic loop)
        MEDFAST_UNROLL
        for (int t = 0; t < St::N; ++t) add(gbase + s.lin[t], gc * s.w[t]);
      } else {
        for (int t = 0; t < St::N; ++t) add(gbase + s.lin[t], tap_product(s.w[t], gc));
      }
    }
  }
  if (grad_pos != nullptr) {
    MEDFAST_UNROLL
    for (int i = 0; i < NDIM; ++i) grad_pos[(b * NDIM + i) * A.out_numel + x] = gp[i];
  }
}

}  // namespace medfast::warp

// AVX2 specialization of the CPU launcher for the commonest cases: linear and nearest
// interpolation of float32 images with any padding ("zeros", "border", "reflection"), 3D (2D through
// a one-plane view, warp_cpu.cpp), displacement rows contiguous in memory. Eight output voxels of a
// row are processed at once: positions, floor, weights and (clamped or mirrored) tap offsets in
// vector registers, the image read with gathers (linear: the two taps of the contiguous axis as one
// 64-bit pair, loaded one by one; the stencils of a whole row are computed first and then applied to
// one channel plane after the other). It is the arithmetic of warp.h (axis_taps_linear /
// axis_taps_nearest + make_stencil) written for eight lanes; the tests compare it with the generic
// path (_set_cpu_simd(False)) and with scipy. Everything else uses the generic launcher.
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/cpu_simd.h"
#include "warp/warp_launch.h"

namespace medfast::warp {

namespace {

// Per-axis taps for eight lanes (K = 2: linear, K = 1: nearest): clamped indices, weights
// (zeros padding: 0 outside) and d weight / d position.
template <int K>
struct Taps8 {
  __m256i i[K];
  __m256 w[K], d[K];
};

// floor(i / P) * P subtracted from eight int32 lanes i, |i| < 2^22, 1 <= P < 2^23: i mod P in [0, P). The
// float quotient is off by at most one (relative error < 2^-22, |i / P| < 2^22): one correction each way.
MEDFAST_AVX2 inline __m256i mod8(__m256i i, int32_t P) {
  const __m256 q = _mm256_floor_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(1.0f / float(P))));
  const __m256i p = _mm256_set1_epi32(P);
  __m256i r = _mm256_sub_epi32(i, _mm256_mullo_epi32(_mm256_cvttps_epi32(q), p));
  r = _mm256_add_epi32(r, _mm256_and_si256(_mm256_cmpgt_epi32(_mm256_setzero_si256(), r), p));
  return _mm256_sub_epi32(r, _mm256_andnot_si256(_mm256_cmpgt_epi32(p, r), p));
}

// The taps of eight lanes from the scalar arithmetic of warp.h, lane by lane (out of line: rare).
template <int K, int PAD>
[[gnu::noinline, gnu::cold]] MEDFAST_AVX2 Taps8<K> scalar_taps8(__m256 x, int32_t n) {
  alignas(32) float xs[8], w[K][8], d[K][8];
  alignas(32) int32_t idx[K][8];
  _mm256_store_ps(xs, x);
  for (int l = 0; l < 8; ++l) {
    AxisTaps<float, K> s;
    axis_taps<K == 1 ? kNearest : kLinear, PAD>(xs[l], n, s);
    for (int k = 0; k < K; ++k) {
      idx[k][l] = int32_t(s.idx[k]);
      w[k][l] = s.w[k];
      d[k][l] = s.dw[k];
    }
  }
  Taps8<K> a;
  for (int k = 0; k < K; ++k) {
    a.i[k] = _mm256_load_si256(reinterpret_cast<const __m256i*>(idx[k]));
    a.w[k] = _mm256_load_ps(w[k]);
    a.d[k] = _mm256_load_ps(d[k]);
  }
  return a;
}

// Reflection (scipy "mirror"): the taps of axis_taps_linear / axis_taps_nearest<kReflection> (warp.h) for
// eight lanes, the same indices and weights bit for bit. An index i in [0, P], P = 2 (n - 1), mirrors to
// min(i, P - i); so linear takes floor(x) mod P and its successor, and nearest folds |x| exactly (floor
// mod P plus the exact fraction) before rounding, in scipy's order. A group with a lane at |x| >= 2^22
// (rare: the float quotient of mod8 would not do) takes the scalar taps of warp.h lane by lane.
template <int K>
MEDFAST_AVX2 inline Taps8<K> axis_taps8_reflect(__m256 x, int32_t n) {
  Taps8<K> a;
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  if (n == 1) {  // every tap at index 0; linear keeps the weights of the unfolded position
    const __m256 lim = _mm256_set1_ps(8388608.0f);  // 2^23: clamping there keeps x - floor(x)
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_sub_ps(_mm256_setzero_ps(), lim)), lim);
    const __m256 t = _mm256_sub_ps(x, _mm256_floor_ps(x));
    for (int k = 0; k < K; ++k) a.i[k] = _mm256_setzero_si256();
    if constexpr (K == 1) {
      a.w[0] = one;
      a.d[0] = _mm256_setzero_ps();
    } else {
      a.w[0] = _mm256_sub_ps(one, t);
      a.w[1] = t;
      a.d[0] = _mm256_set1_ps(-1.0f);
      a.d[1] = one;
    }
    return a;
  }
  const int32_t P = 2 * (n - 1);
  // Lanes in [0, P) need no period taken off (the common case: the reduction costs more than the rest).
  const __m256 pf = _mm256_set1_ps(float(P));
  const bool reduce = _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ),
                                                       _mm256_cmp_ps(x, pf, _CMP_LT_OQ))) != 0xFF;
  if (reduce && _mm256_movemask_ps(_mm256_cmp_ps(ax, _mm256_set1_ps(4194304.0f), _CMP_GE_OQ)) != 0)
    return scalar_taps8<K, kReflection>(x, n);
  const __m256i period = _mm256_set1_epi32(P);
  const auto mirror = [&](__m256i i) MEDFAST_AVX2 { return _mm256_min_epi32(i, _mm256_sub_epi32(period, i)); };
  if constexpr (K == 1) {
    // y = fmod(|x|, P), exact; a negative x mirrors about 0 (from n - 1 on), a positive one from n on.
    __m256 y = x, from = _mm256_set1_ps(float(n));
    if (reduce) {
      const __m256 f = _mm256_floor_ps(ax);
      y = _mm256_add_ps(_mm256_cvtepi32_ps(mod8(_mm256_cvttps_epi32(f), P)), _mm256_sub_ps(ax, f));
      from = _mm256_blendv_ps(from, _mm256_set1_ps(float(n - 1)), _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
    }
    y = _mm256_blendv_ps(y, _mm256_sub_ps(pf, y), _mm256_cmp_ps(y, from, _CMP_GE_OQ));
    const __m256 fy = _mm256_floor_ps(y);  // round half up, as axis_taps8 (y - floor(y) is exact)
    const __m256 up = _mm256_cmp_ps(_mm256_sub_ps(y, fy), _mm256_set1_ps(0.5f), _CMP_GE_OQ);
    a.i[0] = mirror(_mm256_sub_epi32(_mm256_cvttps_epi32(fy), _mm256_castps_si256(up)));
    a.w[0] = one;
    a.d[0] = _mm256_setzero_ps();
  } else {
    const __m256 f = _mm256_floor_ps(x);
    const __m256 t = _mm256_sub_ps(x, f);
    __m256i r = _mm256_cvttps_epi32(f);
    if (reduce) r = mod8(r, P);
    a.i[0] = mirror(r);
    a.i[1] = mirror(_mm256_add_epi32(r, _mm256_set1_epi32(1)));
    a.w[0] = _mm256_sub_ps(one, t);
    a.w[1] = t;
    a.d[0] = _mm256_set1_ps(-1.0f);
    a.d[1] = one;
  }
  return a;
}

template <int K, int PAD>
MEDFAST_AVX2 inline Taps8<K> axis_taps8(__m256 x, int32_t n) {
  if constexpr (PAD == kReflection) return axis_taps8_reflect<K>(x, n);
  const __m256 lim = _mm256_set1_ps(4194304.0f);  // 2^22: far outside, and exact as int32
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_sub_ps(_mm256_setzero_ps(), lim)), lim);
  const __m256i zero = _mm256_setzero_si256(), last = _mm256_set1_epi32(n - 1);
  Taps8<K> a;
  __m256i raw[K];
  if constexpr (K == 1) {  // round half up, as axis_taps_nearest (floor, +1 where x - floor >= 1/2: exact)
    const __m256 f = _mm256_floor_ps(x);
    const __m256 up = _mm256_cmp_ps(_mm256_sub_ps(x, f), _mm256_set1_ps(0.5f), _CMP_GE_OQ);
    raw[0] = _mm256_sub_epi32(_mm256_cvttps_epi32(f), _mm256_castps_si256(up));  // the mask is -1 where up
    a.w[0] = _mm256_set1_ps(1.0f);
    a.d[0] = _mm256_setzero_ps();
  } else {
    const __m256 f = _mm256_floor_ps(x);
    const __m256 t = _mm256_sub_ps(x, f);
    raw[0] = _mm256_cvttps_epi32(f);
    raw[1] = _mm256_add_epi32(raw[0], _mm256_set1_epi32(1));
    a.w[0] = _mm256_sub_ps(_mm256_set1_ps(1.0f), t);
    a.w[1] = t;
    a.d[0] = _mm256_set1_ps(-1.0f);
    a.d[1] = _mm256_set1_ps(1.0f);
  }
  for (int k = 0; k < K; ++k) {
    a.i[k] = _mm256_min_epi32(_mm256_max_epi32(raw[k], zero), last);
    if constexpr (PAD == kZeros) {  // taps outside the image weigh nothing
      const __m256 inside = _mm256_castsi256_ps(_mm256_cmpeq_epi32(raw[k], a.i[k]));
      a.w[k] = _mm256_and_ps(a.w[k], inside);
      a.d[k] = _mm256_and_ps(a.d[k], inside);
    }
  }
  return a;
}

// A tap with no weight contributes nothing (warp.h tap_product), but eight lanes multiply every tap they
// hold: 0 x an inf or NaN image value is NaN. Weightless taps are common (the upper tap at an exact grid
// position; outside taps clamped onto the edge under zeros padding, where a lane outside the image along
// some axis, warp.h sample_outside, has weight 0 on every tap and is 0; the phantom axis of a 2D image's
// one-plane view). Found after the fact, so the common case costs one compare per result: the NaN lanes
// of a result are recomputed by `weighted` (a callable: the same sum over the taps with a weight only).
// A NaN that is the answer (a NaN image value read with a weight, inf - inf) stays NaN.
MEDFAST_AVX2 inline __m256 nan_lanes(__m256 v) { return _mm256_cmp_ps(v, v, _CMP_UNORD_Q); }

template <typename Weighted>
MEDFAST_AVX2 inline __m256 redo_nan_lanes(__m256 v, Weighted weighted) {
  const __m256 nan = nan_lanes(v);
  if (!_mm256_testz_ps(nan, nan)) v = _mm256_blendv_ps(v, weighted(), nan);
  return v;
}

// v, 0 in the lanes where the coefficient w is 0 (tap_product: v is a tap's value or upstream gradient).
MEDFAST_AVX2 inline __m256 where_weighted(__m256 w, __m256 v) {
  return _mm256_and_ps(v, _mm256_cmp_ps(w, _mm256_setzero_ps(), _CMP_NEQ_OQ));
}

// Whether no lane of an upstream gradient is inf or NaN (else gout x a weight 0 is NaN).
MEDFAST_AVX2 inline bool all_finite(__m256 g) {
  const __m256 d = _mm256_sub_ps(g, g);  // NaN exactly where g is inf or NaN
  return _mm256_testz_ps(nan_lanes(d), nan_lanes(d));
}

// The position gradient of eight lanes (three axes), as redo_nan_lanes: the NaN lanes from `weighted`
// (fills three vectors: the gradient over the taps whose d weight / d position is not 0, and over the
// channels whose upstream gradient is not 0, as warp.h backward_voxel skips them). Under zeros padding a
// lane outside the image (weight sum 0, from the callable `weight_sum`) has no gradient.
template <int PAD, typename Weighted, typename WeightSum>
MEDFAST_AVX2 inline void redo_nan_grads(__m256* gp, Weighted weighted, WeightSum weight_sum) {
  const __m256 nan[3] = {nan_lanes(gp[0]), nan_lanes(gp[1]), nan_lanes(gp[2])};
  const __m256 any = _mm256_or_ps(_mm256_or_ps(nan[0], nan[1]), nan[2]);
  if (_mm256_testz_ps(any, any)) return;
  __m256 redo[3];
  weighted(redo);
  const __m256 sum = PAD == kZeros ? weight_sum() : _mm256_set1_ps(1.0f);
  for (int i = 0; i < 3; ++i) gp[i] = _mm256_blendv_ps(gp[i], where_weighted(sum, redo[i]), nan[i]);
}

// The K^3 taps of eight voxels.
template <int K>
struct Stencil8 {
  static constexpr int N = K * K * K;
  __m256i off[N];  // in the image (image strides)
  __m256 w[N];
  __m256 dw[3][N];
};

template <int K, bool GRAD>
MEDFAST_AVX2 inline void stencil8(const Taps8<K>* ax, const int32_t* st, Stencil8<K>& s) {
  __m256i o[3][K];
  for (int i = 0; i < 3; ++i)
    for (int k = 0; k < K; ++k) o[i][k] = _mm256_mullo_epi32(ax[i].i[k], _mm256_set1_epi32(st[i]));
  int t = 0;
  for (int a = 0; a < K; ++a)
    for (int b = 0; b < K; ++b) {
      const __m256 wab = _mm256_mul_ps(ax[0].w[a], ax[1].w[b]);
      const __m256i oab = _mm256_add_epi32(o[0][a], o[1][b]);
      for (int c = 0; c < K; ++c, ++t) {
        s.off[t] = _mm256_add_epi32(oab, o[2][c]);
        s.w[t] = _mm256_mul_ps(wab, ax[2].w[c]);
        if constexpr (GRAD) {
          s.dw[0][t] = _mm256_mul_ps(_mm256_mul_ps(ax[0].d[a], ax[1].w[b]), ax[2].w[c]);
          s.dw[1][t] = _mm256_mul_ps(_mm256_mul_ps(ax[0].w[a], ax[1].d[b]), ax[2].w[c]);
          s.dw[2][t] = _mm256_mul_ps(wab, ax[2].d[c]);
        }
      }
    }
}

// Linear taps of the contiguous axis as one pair of adjacent elements [p, p + 1], p in [0, n - 2]:
// both taps of a voxel then come from one 64-bit load (half the gathered elements). w[e] / d[e]
// weigh element p + e; a tap clamped onto the other element of the pair adds its weight there.
struct PairTaps8 {
  __m256i p;
  __m256 w[2], d[2];
};

template <int PAD>
MEDFAST_AVX2 inline PairTaps8 pair_taps8(__m256 x, int32_t n) {
  const Taps8<2> a = axis_taps8<2, PAD>(x, n);
  PairTaps8 r;
  // reflection: the two taps are still adjacent, in either order (a mirrored pair runs backwards)
  const __m256i first = PAD == kReflection ? _mm256_min_epi32(a.i[0], a.i[1]) : a.i[0];
  r.p = _mm256_min_epi32(first, _mm256_set1_epi32(n - 2));
  const __m256i one = _mm256_set1_epi32(1);
  const __m256 m0 = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_sub_epi32(a.i[0], r.p), one));
  const __m256 m1 = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_sub_epi32(a.i[1], r.p), one));
  r.w[0] = _mm256_add_ps(_mm256_andnot_ps(m0, a.w[0]), _mm256_andnot_ps(m1, a.w[1]));
  r.w[1] = _mm256_add_ps(_mm256_and_ps(m0, a.w[0]), _mm256_and_ps(m1, a.w[1]));
  r.d[0] = _mm256_add_ps(_mm256_andnot_ps(m0, a.d[0]), _mm256_andnot_ps(m1, a.d[1]));
  r.d[1] = _mm256_add_ps(_mm256_and_ps(m0, a.d[0]), _mm256_and_ps(m1, a.d[1]));
  return r;
}

// Lane shuffles between per-voxel vectors (v0..v7) and pair-interleaved halves (voxels 0-3 or 4-7,
// two floats each).
MEDFAST_AVX2 inline __m256 dup_lo(__m256 v) {
  return _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
}
MEDFAST_AVX2 inline __m256 dup_hi(__m256 v) {
  return _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7));
}
MEDFAST_AVX2 inline void interleave(__m256 e0, __m256 e1, __m256& lo, __m256& hi) {
  const __m256 a = _mm256_unpacklo_ps(e0, e1), b = _mm256_unpackhi_ps(e0, e1);
  lo = _mm256_permute2f128_ps(a, b, 0x20);
  hi = _mm256_permute2f128_ps(a, b, 0x31);
}
// (sum of each pair of lo, sum of each pair of hi) in voxel order.
MEDFAST_AVX2 inline __m256 pair_sums(__m256 lo, __m256 hi) {
  const __m256 h = _mm256_hadd_ps(lo, hi);  // v0 v1 v4 v5 | v2 v3 v6 v7
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(h), 0xD8));
}

// The pairs at float offsets off[0..7] as two pair-interleaved halves (voxels 0-3, 4-7), from plain
// 64-bit loads: on AMD Zen 4 a hardware gather of four pairs costs more than four loads and three
// shuffles (forward 1.25x faster measured, c1 and c4).
MEDFAST_AVX2 inline __m128 load_2pairs(const float* base, int32_t a, int32_t b) {
  // (movq: _mm_load_sd would read the pair through a misaligned double*, undefined behaviour)
  const __m128 lo = _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(base + a)));
  return _mm_loadh_pi(lo, reinterpret_cast<const __m64*>(base + b));
}
MEDFAST_AVX2 inline void load_pairs(const float* base, const int32_t* off, __m256& lo, __m256& hi) {
  lo = _mm256_set_m128(load_2pairs(base, off[2], off[3]), load_2pairs(base, off[0], off[1]));
  hi = _mm256_set_m128(load_2pairs(base, off[6], off[7]), load_2pairs(base, off[4], off[5]));
}

// A large displaced volume first touches most image lines at irregular places that the hardware
// prefetcher cannot predict (2x slower than an identity warp at 128^3, not at 64^3). The rows a
// sweep will need next are those kAheadRows further along axis 1: fetch them now.
constexpr int32_t kAheadRows = 4;  // best of 2, 4, 8 at 128^3
MEDFAST_AVX2 inline void prefetch_ahead1(const float* base, __m256i off, int32_t st1) {
  _mm_prefetch(reinterpret_cast<const char*>(base + _mm256_extract_epi32(off, 0) + kAheadRows * st1), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(base + _mm256_extract_epi32(off, 7) + kAheadRows * st1), _MM_HINT_T0);
}


// The 2 x 2 rows (axes 0, 1) times one pair (axis 2) of linear interpolation for eight voxels.
struct PairStencil8 {
  __m256i off[4];        // first element of each pair, in the image (image strides)
  __m256 w[4];           // axis 0 x axis 1 weight per voxel
  __m256 w2lo, w2hi;     // axis 2 weights, pair-interleaved
};

template <int PAD>
MEDFAST_AVX2 inline void pair_stencil8(const __m256* p, const int32_t* n, const int32_t* st, Taps8<2>* ax,
                                       PairTaps8& pt, PairStencil8& s) {
  for (int i = 0; i < 2; ++i) ax[i] = axis_taps8<2, PAD>(p[i], n[i]);
  pt = pair_taps8<PAD>(p[2], n[2]);
  int t = 0;
  for (int a = 0; a < 2; ++a) {
    const __m256i oa = _mm256_add_epi32(_mm256_mullo_epi32(ax[0].i[a], _mm256_set1_epi32(st[0])), pt.p);
    for (int b = 0; b < 2; ++b, ++t) {
      s.off[t] = _mm256_add_epi32(oa, _mm256_mullo_epi32(ax[1].i[b], _mm256_set1_epi32(st[1])));
      s.w[t] = _mm256_mul_ps(ax[0].w[a], ax[1].w[b]);
    }
  }
  interleave(pt.w[0], pt.w[1], s.w2lo, s.w2hi);
}

// Results (output, position gradient) are written once and not read again here: streaming stores
// skip reading each line before writing it. Callers end with _mm_sfence (weakly ordered stores).
MEDFAST_AVX2 inline void store_result(float* p, __m256 v) {
  if ((reinterpret_cast<uintptr_t>(p) & 31) == 0) _mm256_stream_ps(p, v);
  else _mm256_storeu_ps(p, v);
}

// A PairStencil8 kept for a later pass over the channels, with the offsets in memory.
struct RowStencil {
  alignas(32) int32_t off[4][8];
  __m256 w[4], w2lo, w2hi;
};

MEDFAST_AVX2 inline void store_row_stencil(const PairStencil8& s, RowStencil& rs) {
  for (int t = 0; t < 4; ++t) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(rs.off[t]), s.off[t]);
    rs.w[t] = s.w[t];
  }
  rs.w2lo = s.w2lo;
  rs.w2hi = s.w2hi;
}

// The eight lanes' weight sums of a stencil (for redo_nan_grads).
template <int K>
MEDFAST_AVX2 inline __m256 stencil_weight_sum(const Stencil8<K>& s) {
  __m256 sum = s.w[0];
  for (int t = 1; t < Stencil8<K>::N; ++t) sum = _mm256_add_ps(sum, s.w[t]);
  return sum;
}

// The eight lanes' weight sums of a pair stencil (for redo_nan_grads): the axis-0 x axis-1 weights times
// the axis-2 pair's.
MEDFAST_AVX2 inline __m256 pair_weight_sum(const RowStencil& rs) {
  const __m256 rows = _mm256_add_ps(_mm256_add_ps(rs.w[0], rs.w[1]), _mm256_add_ps(rs.w[2], rs.w[3]));
  return _mm256_mul_ps(rows, pair_sums(rs.w2lo, rs.w2hi));
}

// Linear pairs: the rows of the larger axis-1 tap (rows 1 and 3), first and last lane.
MEDFAST_AVX2 inline void prefetch_ahead(const float* base, const int32_t (*off)[8], int32_t st1) {
  for (int t = 1; t < 4; t += 2)
    for (int l = 0; l < 8; l += 7)
      _mm_prefetch(reinterpret_cast<const char*>(base + off[t][l] + kAheadRows * st1), _MM_HINT_T0);
}

// forward_planes' sum of one channel plane over the taps with a weight only (for redo_nan_lanes).
MEDFAST_AVX2 inline __m256 weighted_pair_sum(const RowStencil& rs, const float* ic) {
  __m256 lo = _mm256_setzero_ps(), hi = lo;
  for (int t = 0; t < 4; ++t) {
    __m256 glo, ghi;
    load_pairs(ic, rs.off[t], glo, ghi);
    const __m256 wl = dup_lo(rs.w[t]), wh = dup_hi(rs.w[t]);
    lo = _mm256_fmadd_ps(wl, where_weighted(_mm256_mul_ps(wl, rs.w2lo), glo), lo);
    hi = _mm256_fmadd_ps(wh, where_weighted(_mm256_mul_ps(wh, rs.w2hi), ghi), hi);
  }
  return pair_sums(_mm256_mul_ps(lo, rs.w2lo), _mm256_mul_ps(hi, rs.w2hi));
}

// Linear pairs, forward: NC channel planes (image stride sc, output stride oc) of a row's groups.
template <int NC, int PAD>
MEDFAST_AVX2 inline void forward_planes(const RowStencil* rowbuf, int64_t groups, const float* img, int64_t sc,
                                        float* out, int64_t oc, int32_t st1) {
  for (int64_t k = 0; k < groups; ++k) {
    const RowStencil& rs = rowbuf[k];
    for (int c = 0; c < NC; ++c) prefetch_ahead(img + c * sc, rs.off, st1);
    __m256 lo[NC], hi[NC];
    for (int c = 0; c < NC; ++c) lo[c] = hi[c] = _mm256_setzero_ps();
    for (int t = 0; t < 4; ++t) {
      const int32_t* of = rs.off[t];
      const __m256 wl = dup_lo(rs.w[t]), wh = dup_hi(rs.w[t]);
      for (int c = 0; c < NC; ++c) {
        __m256 glo, ghi;
        load_pairs(img + c * sc, of, glo, ghi);
        lo[c] = _mm256_fmadd_ps(wl, glo, lo[c]);
        hi[c] = _mm256_fmadd_ps(wh, ghi, hi[c]);
      }
    }
    for (int c = 0; c < NC; ++c)
      store_result(out + c * oc + 8 * k,
                   redo_nan_lanes(pair_sums(_mm256_mul_ps(lo[c], rs.w2lo), _mm256_mul_ps(hi[c], rs.w2hi)),
                                  [&]() MEDFAST_AVX2 { return weighted_pair_sum(rs, img + c * sc); }));
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

// Pairs need a contiguous last image axis of at least two elements.
inline bool use_pairs(const WarpArgs<float, float, 3>& A) { return A.image_st[2] == 1 && A.in_size[2] >= 2; }

// Output rows of the slices [s0, s1) of each batch (s1 < 0: all slices) in order: row r -> (b, x0, x1).
struct RowOrder {
  int64_t D, H, s0;
  RowOrder(const WarpArgs<float, float, 3>& A, int64_t s0_ = 0, int64_t s1 = -1)
      : D((s1 < 0 ? A.out_size[0] : s1) - s0_), H(A.out_size[1]), s0(s0_) {}
  void operator()(int64_t r, int64_t& b, int64_t& x0, int64_t& x1) const {
    b = r / (D * H);
    const int64_t k = r - b * D * H;
    x0 = s0 + k / H;
    x1 = k - (k / H) * H;
  }
};

template <int MODE, int PAD>
MEDFAST_AVX2 void forward_rows(const WarpArgs<float, float, 3>& A, float* out, const int32_t* st, int64_t r0,
                               int64_t r1) {
  const int64_t W = A.out_size[2];
  const int32_t n[3] = {int32_t(A.in_size[0]), int32_t(A.in_size[1]), int32_t(A.in_size[2])};
  const bool pairs = use_pairs(A);
  const RowOrder order(A);
  std::vector<RowStencil> rowbuf(MODE == kLinear && pairs ? W / 8 : 0);
  for (int64_t r = r0; r < r1; ++r) {
    int64_t b, xi[3] = {0, 0, 0};
    order(r, b, xi[0], xi[1]);
    const int64_t row = xi[0] * A.out_size[1] * W + xi[1] * W;
    const float* img = A.image + b * A.image_sb;
    float* o = out + b * A.channels * A.out_numel + row;
    int64_t w = 0;
    if constexpr (MODE == kLinear) {
      if (pairs) {
        // The stencils of the whole row first, then one channel plane at a time: each plane is then
        // read as a c1 warp reads it (few streams at a time), while the stencil is computed once.
        int64_t groups = 0;
        for (; w + 8 <= W; w += 8, ++groups) {
          __m256 p[3];
          if (!positions8(A, b, xi[0], xi[1], w, p)) break;
          Taps8<2> ax[2];
          PairTaps8 pt;
          PairStencil8 s;
          pair_stencil8<PAD>(p, n, st, ax, pt, s);
          store_row_stencil(s, rowbuf[groups]);
        }
        // Two planes per sweep: each offset and weight read serves both, and their loads are
        // independent (c2 forward 1.2x, c4 1.1x faster than one at a time; four at a time is slower).
        int64_t c = 0;
        for (; c + 2 <= A.channels; c += 2)
          forward_planes<2, PAD>(rowbuf.data(), groups, img + c * A.image_sc, A.image_sc, o + c * A.out_numel,
                                 A.out_numel, st[1]);
        if (c < A.channels)
          forward_planes<1, PAD>(rowbuf.data(), groups, img + c * A.image_sc, A.image_sc, o + c * A.out_numel,
                                 A.out_numel, st[1]);
      }
    }
    for (; w + 8 <= W; w += 8) {
      __m256 p[3];
      if (!positions8(A, b, xi[0], xi[1], w, p)) break;  // NaN: the scalar path handles the rest
      constexpr int K = taps_of<MODE>::value;
      Taps8<K> ax[3];
      for (int i = 0; i < 3; ++i) ax[i] = axis_taps8<K, PAD>(p[i], int32_t(A.in_size[i]));
      Stencil8<K> s;
      stencil8<K, false>(ax, st, s);
      // nearest: the one weight is 1 inside, 0 outside; a gather masked by it reads no outside lane
      const __m256 inside = _mm256_cmp_ps(s.w[0], _mm256_setzero_ps(), _CMP_NEQ_OQ);
      for (int64_t c = 0; c < A.channels; ++c) {
        const float* ic = img + c * A.image_sc;
        for (int a = 0; a < K; ++a) prefetch_ahead1(ic, s.off[a * K * K + (K - 1) * K], st[1]);
        if constexpr (K == 1) {
          _mm256_storeu_ps(o + c * A.out_numel + w,
                           _mm256_mask_i32gather_ps(_mm256_setzero_ps(), ic, s.off[0], inside, 4));
          continue;
        }
        __m256 acc = _mm256_mul_ps(s.w[0], _mm256_i32gather_ps(ic, s.off[0], 4));
        for (int t = 1; t < Stencil8<K>::N; ++t)
          acc = _mm256_fmadd_ps(s.w[t], _mm256_i32gather_ps(ic, s.off[t], 4), acc);
        const auto weighted = [&]() MEDFAST_AVX2 {
          __m256 r = _mm256_setzero_ps();
          for (int t = 0; t < Stencil8<K>::N; ++t)
            r = _mm256_fmadd_ps(s.w[t], where_weighted(s.w[t], _mm256_i32gather_ps(ic, s.off[t], 4)), r);
          return r;
        };
        _mm256_storeu_ps(o + c * A.out_numel + w, redo_nan_lanes(acc, weighted));
      }
    }
    for (; w < W; ++w) {
      xi[2] = w;
      forward_voxel<MODE, PAD>(A, out, b, xi, row + w);
    }
  }
  _mm_sfence();
}

template <int MODE, int PAD>
void forward_avx2(const WarpArgs<float, float, 3>& A, float* out, const int32_t* st) {
  const int64_t rows = A.batch * A.out_size[0] * A.out_size[1];
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / A.out_size[2]),
                   [&](int64_t r0, int64_t r1) { forward_rows<MODE, PAD>(A, out, st, r0, r1); });
}

// What the backward of one group of eight voxels needs for every channel (see backward_pairs).
struct RowStencilBwd {
  RowStencil s;
  alignas(32) int32_t lin[4][8];  // pair offsets in the contiguous gradient buffer
  __m256 u0[4], u1[4];            // d (axis 0 x axis 1 weight) / d position 0 and 1
  __m256 d2lo, d2hi;              // d axis-2 weights / d position 2, pair-interleaved
  __m256 gp[3];                   // d loss / d position, summed over channels
};

// backward_pairs' position gradient of one group over channels [c0, c1) (image planes img + c sc,
// upstream gradients g + c oc) over the taps with a coefficient only (for redo_nan_grads).
MEDFAST_AVX2 void weighted_pair_grad(const RowStencilBwd& r, const float* img, int64_t sc, const float* g,
                                     int64_t oc, int64_t c0, int64_t c1, __m256* gp) {
  for (int i = 0; i < 3; ++i) gp[i] = _mm256_setzero_ps();
  for (int64_t c = c0; c < c1; ++c) {
    __m256 lo[3] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()}, hi[3] = {lo[0], lo[0], lo[0]};
    for (int t = 0; t < 4; ++t) {
      __m256 glo, ghi;
      load_pairs(img + c * sc, r.s.off[t], glo, ghi);
      // the coefficient of each pair element along each axis: (d) axis-0 x axis-1 weight x (d) axis-2 weight
      const __m256 ul[3] = {dup_lo(r.u0[t]), dup_lo(r.u1[t]), dup_lo(r.s.w[t])};
      const __m256 uh[3] = {dup_hi(r.u0[t]), dup_hi(r.u1[t]), dup_hi(r.s.w[t])};
      const __m256 el[3] = {r.s.w2lo, r.s.w2lo, r.d2lo}, eh[3] = {r.s.w2hi, r.s.w2hi, r.d2hi};
      for (int i = 0; i < 3; ++i) {
        lo[i] = _mm256_fmadd_ps(ul[i], where_weighted(_mm256_mul_ps(ul[i], el[i]), glo), lo[i]);
        hi[i] = _mm256_fmadd_ps(uh[i], where_weighted(_mm256_mul_ps(uh[i], eh[i]), ghi), hi[i]);
      }
    }
    const __m256 gc = _mm256_loadu_ps(g + c * oc);
    const __m256 el[3] = {r.s.w2lo, r.s.w2lo, r.d2lo}, eh[3] = {r.s.w2hi, r.s.w2hi, r.d2hi};
    for (int i = 0; i < 3; ++i)
      gp[i] = _mm256_fmadd_ps(
          gc, where_weighted(gc, pair_sums(_mm256_mul_ps(lo[i], el[i]), _mm256_mul_ps(hi[i], eh[i]))), gp[i]);
  }
}

// Backward of linear interpolation over one row with pairs (see forward_rows): the stencils of the
// row first, then one channel plane at a time. Returns the first voxel it did not handle (a NaN
// position, or the row's last W % 8 voxels).
template <int PAD>
MEDFAST_AVX2 int64_t backward_pairs(const WarpArgs<float, float, 3>& A, const float* g, float* grad_pos, float* buf,
                                    const int32_t* st, const int32_t* lin_st, const int32_t* n, int64_t b,
                                    const int64_t* xi, int64_t row, int64_t gbase, int64_t c0, int64_t c1,
                                    RowStencilBwd* rowbuf) {
  const int64_t W = A.out_size[2], in_numel = int64_t(n[0]) * n[1] * n[2];
  const float* img = A.image + b * A.image_sb;
  int64_t w = 0, groups = 0;
  for (; w + 8 <= W; w += 8, ++groups) {
    __m256 p[3];
    if (!positions8(A, b, xi[0], xi[1], w, p)) break;
    Taps8<2> ax[2];
    PairTaps8 pt;
    PairStencil8 ps;
    pair_stencil8<PAD>(p, n, st, ax, pt, ps);
    RowStencilBwd& r = rowbuf[groups];
    store_row_stencil(ps, r.s);
    if (grad_pos != nullptr) {
      interleave(pt.d[0], pt.d[1], r.d2lo, r.d2hi);
      for (int t = 0; t < 4; ++t) {
        const int a = t >> 1, bb = t & 1;
        r.u0[t] = _mm256_mul_ps(ax[0].d[a], ax[1].w[bb]);
        r.u1[t] = _mm256_mul_ps(ax[0].w[a], ax[1].d[bb]);
      }
      for (int i = 0; i < 3; ++i) r.gp[i] = _mm256_setzero_ps();
    }
    if (buf != nullptr) {
      int t = 0;
      for (int a = 0; a < 2; ++a)
        for (int c = 0; c < 2; ++c, ++t) {
          const __m256i o = _mm256_add_epi32(_mm256_mullo_epi32(ax[0].i[a], _mm256_set1_epi32(lin_st[0])),
                                             _mm256_mullo_epi32(ax[1].i[c], _mm256_set1_epi32(lin_st[1])));
          _mm256_store_si256(reinterpret_cast<__m256i*>(r.lin[t]), _mm256_add_epi32(o, pt.p));
        }
    }
  }
  for (int64_t c = c0; c < c1; ++c) {
    const float* ic = img + c * A.image_sc;
    const float* gch = g + c * A.out_numel;
    float* cb = buf != nullptr ? buf + gbase + c * in_numel : nullptr;
    for (int64_t k = 0; k < groups; ++k) {
      RowStencilBwd& r = rowbuf[k];
      const __m256 gc = _mm256_loadu_ps(gch + 8 * k);
      if (grad_pos != nullptr) {
        prefetch_ahead(ic, r.s.off, st[1]);
        __m256 a0l = _mm256_setzero_ps(), a0h = a0l, a1l = a0l, a1h = a0l, a2l = a0l, a2h = a0l;
        for (int t = 0; t < 4; ++t) {
          __m256 glo, ghi;
          load_pairs(ic, r.s.off[t], glo, ghi);
          a0l = _mm256_fmadd_ps(dup_lo(r.u0[t]), glo, a0l);
          a0h = _mm256_fmadd_ps(dup_hi(r.u0[t]), ghi, a0h);
          a1l = _mm256_fmadd_ps(dup_lo(r.u1[t]), glo, a1l);
          a1h = _mm256_fmadd_ps(dup_hi(r.u1[t]), ghi, a1h);
          a2l = _mm256_fmadd_ps(dup_lo(r.s.w[t]), glo, a2l);
          a2h = _mm256_fmadd_ps(dup_hi(r.s.w[t]), ghi, a2h);
        }
        r.gp[0] = _mm256_fmadd_ps(gc, pair_sums(_mm256_mul_ps(a0l, r.s.w2lo), _mm256_mul_ps(a0h, r.s.w2hi)), r.gp[0]);
        r.gp[1] = _mm256_fmadd_ps(gc, pair_sums(_mm256_mul_ps(a1l, r.s.w2lo), _mm256_mul_ps(a1h, r.s.w2hi)), r.gp[1]);
        r.gp[2] = _mm256_fmadd_ps(gc, pair_sums(_mm256_mul_ps(a2l, r.d2lo), _mm256_mul_ps(a2h, r.d2hi)), r.gp[2]);
      }
      if (cb != nullptr) {
        alignas(32) float v[4][16];  // the pair values of voxel l at v[t][2l], v[t][2l + 1]
        const bool finite = all_finite(gc);
        for (int t = 0; t < 4; ++t) {
          const __m256 gw = _mm256_mul_ps(gc, r.s.w[t]);
          __m256 vlo = _mm256_mul_ps(dup_lo(gw), r.s.w2lo), vhi = _mm256_mul_ps(dup_hi(gw), r.s.w2hi);
          if (!finite) {  // inf or NaN x a weight 0: such taps get nothing (warp.h tap_product)
            vlo = where_weighted(_mm256_mul_ps(dup_lo(r.s.w[t]), r.s.w2lo), vlo);
            vhi = where_weighted(_mm256_mul_ps(dup_hi(r.s.w[t]), r.s.w2hi), vhi);
          }
          _mm256_store_ps(v[t], vlo);
          _mm256_store_ps(v[t] + 8, vhi);
        }
        for (int t = 1; t < 4; t += 2) {
          _mm_prefetch(reinterpret_cast<const char*>(cb + r.lin[t][0] + kAheadRows * lin_st[1]), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(cb + r.lin[t][7] + kAheadRows * lin_st[1]), _MM_HINT_T0);
        }
        // Adjacent lanes' pairs usually overlap by one float, and a load that partly overlaps a pending
        // store waits for it: visit odd lanes, then even ones (1.25x faster scatter measured).
        for (int k2 = 0; k2 < 8; ++k2)
          for (int t = 0; t < 4; ++t) {
            const int l = k2 < 4 ? 2 * k2 + 1 : 2 * (k2 - 4);
            __m64* q = reinterpret_cast<__m64*>(cb + r.lin[t][l]);
            const __m128 add = _mm_loadl_pi(_mm_setzero_ps(), reinterpret_cast<const __m64*>(v[t] + 2 * l));
            _mm_storel_pi(q, _mm_add_ps(_mm_loadl_pi(_mm_setzero_ps(), q), add));
          }
      }
    }
  }
  if (grad_pos != nullptr)
    for (int64_t k = 0; k < groups; ++k) {
      RowStencilBwd& r = rowbuf[k];
      const auto weighted = [&](__m256* gp) MEDFAST_AVX2 {
        weighted_pair_grad(r, img, A.image_sc, g + 8 * k, A.out_numel, c0, c1, gp);
      };
      redo_nan_grads<PAD>(r.gp, weighted, [&]() MEDFAST_AVX2 { return pair_weight_sum(r.s); });
      for (int i = 0; i < 3; ++i) store_result(grad_pos + (b * 3 + i) * A.out_numel + row + 8 * k, r.gp[i]);
    }
  return w;
}

// Backward of rows [r0, r1), image gradient added into buf (nullptr: none).
template <int MODE, int PAD>
MEDFAST_AVX2 void backward_rows(const WarpArgs<float, float, 3>& A, const float* gout, float* grad_pos, float* buf,
                                const int32_t* st, int64_t r0, int64_t r1, int64_t c0, int64_t c1, int64_t s0 = 0,
                                int64_t s1 = -1) {
  const int64_t W = A.out_size[2];
  const int64_t in_numel = A.in_size[0] * A.in_size[1] * A.in_size[2];
  const int32_t lin_st[3] = {int32_t(A.in_size[1] * A.in_size[2]), int32_t(A.in_size[2]), 1};
  const int32_t n[3] = {int32_t(A.in_size[0]), int32_t(A.in_size[1]), int32_t(A.in_size[2])};
  const bool pairs = use_pairs(A);
  auto add = [buf](int64_t off, float val) { buf[off] += val; };
  const RowOrder order(A, s0, s1);
  std::vector<RowStencilBwd> rowbuf(MODE == kLinear && pairs ? W / 8 : 0);
  for (int64_t r = r0; r < r1; ++r) {
    int64_t b, xi[3] = {0, 0, 0};
    order(r, b, xi[0], xi[1]);
    const int64_t row = xi[0] * A.out_size[1] * W + xi[1] * W;
    const float* img = A.image + b * A.image_sb;
    const float* g = gout + b * A.channels * A.out_numel + row;
    const int64_t gbase = (A.image_batch == 1 ? 0 : b) * A.channels * in_numel;
    int64_t w = 0;
    if constexpr (MODE == kLinear) {
      if (pairs) w = backward_pairs<PAD>(A, g, grad_pos, buf, st, lin_st, n, b, xi, row, gbase, c0, c1, rowbuf.data());
    }
    for (; w + 8 <= W; w += 8) {
      __m256 p[3];
      if (!positions8(A, b, xi[0], xi[1], w, p)) break;
      constexpr int K = taps_of<MODE>::value, N = Stencil8<K>::N;
      constexpr bool kPosGrad = MODE != kNearest;  // nearest: zero gradient w.r.t. positions
      Taps8<K> ax[3];
      for (int i = 0; i < 3; ++i) ax[i] = axis_taps8<K, PAD>(p[i], int32_t(A.in_size[i]));
      Stencil8<K> s;
      stencil8<K, kPosGrad>(ax, st, s);
      __m256 gp[3] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      alignas(32) int32_t lin[N][8];
      if (buf != nullptr) {
        Stencil8<K> l;  // tap offsets in the contiguous gradient buffer
        stencil8<K, false>(ax, lin_st, l);
        for (int t = 0; t < N; ++t) _mm256_store_si256(reinterpret_cast<__m256i*>(lin[t]), l.off[t]);
      }
      for (int64_t c = c0; c < c1; ++c) {
        const __m256 gc = _mm256_loadu_ps(g + c * A.out_numel + w);
        if (kPosGrad && grad_pos != nullptr) {
          const float* ic = img + c * A.image_sc;
          for (int t = 0; t < N; ++t) {
            const __m256 v = _mm256_mul_ps(gc, _mm256_i32gather_ps(ic, s.off[t], 4));
            for (int i = 0; i < 3; ++i) gp[i] = _mm256_fmadd_ps(s.dw[i][t], v, gp[i]);
          }
        }
        if (buf != nullptr) {
          alignas(32) float gw[N][8];
          const bool finite = all_finite(gc);  // else a weight 0 x inf or NaN: such taps get nothing
          for (int t = 0; t < N; ++t) {
            const __m256 v = _mm256_mul_ps(gc, s.w[t]);
            _mm256_store_ps(gw[t], finite ? v : where_weighted(s.w[t], v));
          }
          float* cb = buf + gbase + c * in_numel;
          for (int lane = 0; lane < 8; ++lane)
            for (int t = 0; t < N; ++t) cb[lin[t][lane]] += gw[t][lane];
        }
      }
      if (grad_pos != nullptr) {
        if constexpr (kPosGrad) {
          const auto weighted = [&](__m256* redo) MEDFAST_AVX2 {  // the sum above over the taps with a coefficient
            for (int i = 0; i < 3; ++i) redo[i] = _mm256_setzero_ps();
            for (int64_t c = c0; c < c1; ++c) {
              const __m256 gc = _mm256_loadu_ps(g + c * A.out_numel + w);
              for (int t = 0; t < N; ++t) {
                const __m256 v = where_weighted(gc, _mm256_mul_ps(gc, _mm256_i32gather_ps(img + c * A.image_sc,
                                                                                          s.off[t], 4)));
                for (int i = 0; i < 3; ++i)
                  redo[i] = _mm256_fmadd_ps(s.dw[i][t], where_weighted(s.dw[i][t], v), redo[i]);
              }
            }
          };
          redo_nan_grads<PAD>(gp, weighted, [&]() MEDFAST_AVX2 { return stencil_weight_sum(s); });
        }
        for (int i = 0; i < 3; ++i) _mm256_storeu_ps(grad_pos + (b * 3 + i) * A.out_numel + row + w, gp[i]);
      }
    }
    for (; w < W; ++w) {
      xi[2] = w;
      backward_voxel<MODE, PAD>(A, gout, grad_pos, buf != nullptr, in_numel, b, xi, row + w, add, c0, c1);
    }
  }
  _mm_sfence();
}

// Image slices (axis 0) that the taps of each output slice can touch, [lo, hi] (lo > hi: none),
// for batch 0. Linear taps floor(p), floor(p) + 1 and nearest ones, clamped as the kernels clamp, or
// mirrored (reflect).
MEDFAST_AVX2 void slice_targets(const WarpArgs<float, float, 3>& A, int64_t x0, bool reflect, int64_t& lo,
                                int64_t& hi) {
  const int64_t H = A.out_size[1], W = A.out_size[2];
  const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 mn = _mm256_set1_ps(INFINITY), mx = _mm256_set1_ps(-INFINITY);
  float smn = INFINITY, smx = -INFINITY;
  const float* th = A.theta;
  for (int64_t x1 = 0; x1 < H; ++x1) {
    const float base = th != nullptr ? th[0] * float(x0) + th[1] * float(x1) + th[3] : float(x0);
    const float* d = A.ddf != nullptr ? A.ddf + x0 * A.ddf_st[0] + x1 * A.ddf_st[1] : nullptr;
    int64_t w = 0;
    for (; w + 8 <= W; w += 8) {  // p0 as positions8 computes it; min/max skip NaN (second operand)
      const __m256 x2 = _mm256_add_ps(_mm256_set1_ps(float(w)), lane);
      __m256 p = th != nullptr ? _mm256_fmadd_ps(_mm256_set1_ps(th[2]), x2, _mm256_set1_ps(base))
                               : _mm256_set1_ps(base);
      if (d != nullptr) p = _mm256_add_ps(p, _mm256_loadu_ps(d + w));
      mn = _mm256_min_ps(p, mn);
      mx = _mm256_max_ps(p, mx);
    }
    for (; w < W; ++w) {
      float p = th != nullptr ? base + th[2] * float(w) : base;
      if (d != nullptr) p += d[w];
      smn = std::min(smn, p);
      smx = std::max(smx, p);
    }
  }
  alignas(32) float a[8], b[8];
  _mm256_store_ps(a, mn);
  _mm256_store_ps(b, mx);
  for (int l = 0; l < 8; ++l) {
    smn = std::min(smn, a[l]);
    smx = std::max(smx, b[l]);
  }
  const int64_t n = A.in_size[0];
  if (!(smn <= smx)) {  // every position NaN: no taps
    lo = n;
    hi = -1;
    return;
  }
  // One slice more on each side: the kernels round the affine part in another order.
  const float far = 4194304.0f;  // as axis_taps8
  const int64_t i0 = int64_t(std::floor(std::clamp(smn, -far, far))) - 1;
  const int64_t i1 = int64_t(std::floor(std::clamp(smx, -far, far))) + 2;
  lo = std::clamp<int64_t>(i0, 0, n - 1);
  hi = std::clamp<int64_t>(i1, 0, n - 1);
  if (reflect) {  // taps i in [i0, i1] mirror into [0, n - 1]: i < 0 onto [1, -i0], i > n - 1 onto [P - i1, n - 2]
    if (i0 < 0) hi = std::max(hi, std::min(-i0, n - 1));
    if (i1 > n - 1) lo = std::min(lo, std::max<int64_t>(2 * (n - 1) - i1, 0));
  }
}

// Splits the output slices of a single volume into 2 x threads blocks such that the image slices
// which the blocks of one parity scatter into do not overlap; false when the displacements are too
// large for that (or the volume too thin). begin has blocks + 1 entries.
bool disjoint_blocks(const WarpArgs<float, float, 3>& A, int64_t threads, bool reflect, std::vector<int64_t>& begin) {
  const int64_t D = A.out_size[0], blocks = 2 * threads;
  if (A.batch != 1 || D < 2 * blocks) return false;
  std::vector<int64_t> lo(D), hi(D);
  at::parallel_for(0, D, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t x0 = s0; x0 < s1; ++x0) slice_targets(A, x0, reflect, lo[x0], hi[x0]);
  });
  begin.resize(blocks + 1);
  std::vector<int64_t> blo(blocks, A.in_size[0]), bhi(blocks, -1);
  for (int64_t k = 0; k <= blocks; ++k) begin[k] = D * k / blocks;
  for (int64_t k = 0; k < blocks; ++k)
    for (int64_t x0 = begin[k]; x0 < begin[k + 1]; ++x0) {
      blo[k] = std::min(blo[k], lo[x0]);
      bhi[k] = std::max(bhi[k], hi[x0]);
    }
  for (int64_t i = 0; i < blocks; ++i)
    for (int64_t j = i + 2; j < blocks; j += 2)
      if (blo[i] <= bhi[j] && blo[j] <= bhi[i]) return false;
  return true;
}

// Same schemes as the generic launcher (warp_cpu.cpp): whole (batch, channel) planes per thread,
// or contiguous ranges of rows with one gradient buffer each, summed in a fixed order. Tried first
// (backward_avx2_one_sweep), two that make one sweep for both gradients (the stencil computed once,
// not once per pass, and no per-thread buffers): a single thread; or blocks of output slices whose
// scatter targets are disjoint, even blocks in parallel, then odd ones (each gradient element then
// gets its additions in a fixed order).
template <int MODE, int PAD>
void backward_avx2(const WarpArgs<float, float, 3>& A, const float* gout, float* grad_pos, float* grad_image,
                   float* extra, int64_t chunks, bool plane_parallel, const int32_t* st) {
  const int64_t plane = A.out_size[0] * A.out_size[1], rows = A.batch * plane, C = A.channels;
  const int64_t image_numel = A.image_batch * C * A.in_size[0] * A.in_size[1] * A.in_size[2];
  if (grad_image == nullptr || plane_parallel) {
    if (grad_pos != nullptr)
      at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / A.out_size[2]), [&](int64_t r0, int64_t r1) {
        backward_rows<MODE, PAD>(A, gout, grad_pos, nullptr, st, r0, r1, 0, C);
      });
    if (grad_image == nullptr) return;
    at::parallel_for(0, A.image_batch * C, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1;) {  // one sweep per run of channels of one image: one stencil each
        const int64_t bi = p / C, c = p - bi * C, c1 = std::min(C, c + p1 - p);
        const int64_t r0 = A.image_batch == 1 ? 0 : bi * plane, r1 = A.image_batch == 1 ? rows : r0 + plane;
        backward_rows<MODE, PAD>(A, gout, nullptr, grad_image, st, r0, r1, c, c1);
        p += c1 - c;
      }
    });
    return;
  }
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      float* buf = k == 0 ? grad_image : extra + (k - 1) * image_numel;
      backward_rows<MODE, PAD>(A, gout, grad_pos, buf, st, rows * k / chunks, rows * (k + 1) / chunks, 0, C);
    }
  });
  reduce_chunk_buffers(grad_image, extra, chunks, image_numel);
}

// Both gradients in one sweep (see above); false when the blocks' targets would overlap.
template <int MODE, int PAD>
bool backward_avx2_one_sweep(const WarpArgs<float, float, 3>& A, const float* gout, float* grad_pos,
                             float* grad_image, const int32_t* st) {
  const int64_t threads = at::get_num_threads(), rows = A.batch * A.out_size[0] * A.out_size[1];
  if (threads == 1) {
    backward_rows<MODE, PAD>(A, gout, grad_pos, grad_image, st, 0, rows, 0, A.channels);
    return true;
  }
  // Linear only: the scalar nearest taps (warp.h) put an outside "zeros" tap at index 0, not at the
  // nearest edge that slice_targets assumes.
  std::vector<int64_t> begin;
  if (MODE != kLinear || !disjoint_blocks(A, threads, PAD == kReflection, begin)) return false;
  for (int64_t parity = 0; parity < 2; ++parity)
    at::parallel_for(0, threads, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t s0 = begin[2 * k + parity], s1 = begin[2 * k + parity + 1];
        backward_rows<MODE, PAD>(A, gout, grad_pos, grad_image, st, 0, (s1 - s0) * A.out_size[1], 0, A.channels,
                                 s0, s1);
      }
    });
  return true;
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

// Axes of fewer than 2^22 samples: axis_taps8 and slice_targets clamp positions to +-2^22 ("far outside"),
// and reflection folds them through an int32 period (axis_taps8_reflect). Longer axes take the generic path.
bool applicable(const WarpArgs<float, float, 3>& A) {
  for (int i = 0; i < 3; ++i)
    if (A.in_size[i] >= (int64_t(1) << 22)) return false;
  return cpu_simd_available() && (A.ddf == nullptr || A.ddf_st[2] == 1);
}

// f.template operator()<MODE, PAD>() for a linear / nearest mode and any padding.
template <typename F>
auto dispatch8(int mode, int padding, F&& f) {
  auto pad = [&]<int MODE>() {
    if (padding == kZeros) return f.template operator()<MODE, kZeros>();
    if (padding == kBorder) return f.template operator()<MODE, kBorder>();
    return f.template operator()<MODE, kReflection>();
  };
  return mode == kLinear ? pad.template operator()<kLinear>() : pad.template operator()<kNearest>();
}

}  // namespace

bool try_forward_avx2(const WarpArgs<float, float, 3>& A, int mode, int padding, float* out) {
  int32_t st[3];
  if (!applicable(A) || !int32_strides(A, st)) return false;
  dispatch8(mode, padding, [&]<int MODE, int PAD>() { forward_avx2<MODE, PAD>(A, out, st); });
  return true;
}

bool try_backward_avx2_one_sweep(const WarpArgs<float, float, 3>& A, int mode, int padding, const float* gout,
                                 float* grad_pos, float* grad_image) {
  int32_t st[3];
  if (!applicable(A) || !int32_strides(A, st)) return false;
  return dispatch8(mode, padding, [&]<int MODE, int PAD>() {
    return backward_avx2_one_sweep<MODE, PAD>(A, gout, grad_pos, grad_image, st);
  });
}

bool try_backward_avx2(const WarpArgs<float, float, 3>& A, int mode, int padding, const float* gout,
                       float* grad_pos, float* grad_image, float* extra, int64_t chunks, bool plane_parallel) {
  int32_t st[3];
  if (!applicable(A) || !int32_strides(A, st)) return false;
  dispatch8(mode, padding, [&]<int MODE, int PAD>() {
    backward_avx2<MODE, PAD>(A, gout, grad_pos, grad_image, extra, chunks, plane_parallel, st);
  });
  return true;
}

}  // namespace medfast::warp

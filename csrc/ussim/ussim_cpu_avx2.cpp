// AVX2 specialization of the line march (march_line in ussim.h) for float32: eight consecutive samples
// of a sub-ray per vector. It is the arithmetic of march_line / eval_sample written for eight lanes:
//   - positions start + i * step, trilinear property weights (sharpened for the impedance) and the
//     scatter-grid weights are computed per lane;
//   - the corner values come from the same scalar CellCache / NoiseCache loads (load_cell,
//     noise_cell: same hash, same table rows). A block of 8 samples touches few cells (~10 samples
//     per voxel, ~2 per scatter cell), so each distinct cell's corners are broadcast and the lanes
//     in that cell blended in (no gathers);
//   - log(1 - R^2) and exp(log T) with polynomial vector logf / expf (Cephes, ~1 ulp), the running
//     log-transmission summed in double in sample order, as the scalar march.
// Results equal the generic path to float rounding (tests/test_ultrasound.py compares them with
// _set_cpu_simd(False)). Lines whose coordinates are huge or not finite take the generic path.
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>

#include "common/cpu_simd.h"
#include "ussim/ussim_launch.h"

namespace medfast::ussim {

namespace {

MEDFAST_AVX2 inline __m256 exp8(__m256 x) {
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3365447f)), _mm256_set1_ps(88.3762626f));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  // 2^fx in two factors, so that fx down to -126 stays a normal number each.
  const __m256i n = _mm256_cvtps_epi32(fx);
  const __m256i n1 = _mm256_srai_epi32(n, 1), n2 = _mm256_sub_epi32(n, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  y = _mm256_mul_ps(_mm256_mul_ps(y, p1), p2);
  return _mm256_blendv_ps(y, _mm256_set1_ps(NAN), nan);
}

// x > 0 normal (callers clamp to >= kMinTransmission).
MEDFAST_AVX2 inline __m256 log8(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)),
                                                 _mm256_set1_epi32(0x3f000000)));  // [0.5, 1)
  const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(small, _mm256_set1_ps(1.0f)));
  m = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(small, m)), _mm256_set1_ps(1.0f));
  const __m256 z = _mm256_mul_ps(m, m);
  __m256 y = _mm256_set1_ps(7.0376836292e-2f);
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.1514610310e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.1676998740e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.2420140846e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.4249322787e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.6668057665e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(2.0000714765e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-2.4999993993e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(3.3333331174e-1f));
  y = _mm256_mul_ps(_mm256_mul_ps(y, m), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(m, y));
}

// Lane mask (bit l = lane l) of the lanes whose three int32 cell indices equal lane l's.
MEDFAST_AVX2 inline int same_cell(__m256i a, __m256i b, __m256i c, const int32_t* ia, const int32_t* ib,
                                  const int32_t* ic, int l) {
  const __m256i eq = _mm256_and_si256(_mm256_and_si256(_mm256_cmpeq_epi32(a, _mm256_set1_epi32(ia[l])),
                                                       _mm256_cmpeq_epi32(b, _mm256_set1_epi32(ib[l]))),
                                      _mm256_cmpeq_epi32(c, _mm256_set1_epi32(ic[l])));
  return _mm256_movemask_ps(_mm256_castsi256_ps(eq));
}

MEDFAST_AVX2 inline __m256 lane_mask(int m) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(m), bit), bit));
}

// The 8 trilinear corner weights of fractions (a, b, c), in the corner order of ussim.h
// (corner = 4 a + 2 b + c), as (w_a w_b) w_c like the scalar code.
MEDFAST_AVX2 inline void corner_weights(__m256 ta, __m256 tb, __m256 tc, __m256* w) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 ua = _mm256_sub_ps(one, ta), ub = _mm256_sub_ps(one, tb), uc = _mm256_sub_ps(one, tc);
  const __m256 ab[4] = {_mm256_mul_ps(ua, ub), _mm256_mul_ps(ua, tb), _mm256_mul_ps(ta, ub), _mm256_mul_ps(ta, tb)};
  for (int k = 0; k < 4; ++k) {
    w[2 * k] = _mm256_mul_ps(ab[k], uc);
    w[2 * k + 1] = _mm256_mul_ps(ab[k], tc);
  }
}

MEDFAST_AVX2 inline __m256 sharpen8(__m256 t, __m256 k) {
  const __m256 half = _mm256_set1_ps(0.5f);
  const __m256 u = _mm256_fmadd_ps(_mm256_sub_ps(t, half), k, half);
  return _mm256_min_ps(_mm256_max_ps(u, _mm256_setzero_ps()), _mm256_set1_ps(1.0f));
}

// Inclusive prefix sum of the four lanes.
MEDFAST_AVX2 inline __m256d scan4(__m256d x) {
  const __m256d z = _mm256_setzero_pd();
  x = _mm256_add_pd(x, _mm256_blend_pd(_mm256_permute4x64_pd(x, 0x90), z, 1));  // + (0, x0, x1, x2)
  return _mm256_add_pd(x, _mm256_blend_pd(_mm256_permute4x64_pd(x, 0x40), z, 3));  // + (0, 0, x0, x1)
}

// Corner rows of one scatter-grid cell.
struct NoiseRows {
  int32_t c[3];
  const float* r[8];
};

// Voxel positions of a line stay in this range (int32 cells, exact float steps), or the line takes
// the generic path.
constexpr double kMaxCoord = 1 << 22;

bool line_in_range(const float* start, const float* step, int64_t E, const Params& P) {
  for (int64_t e = 0; e < E; ++e)
    for (int end = 0; end < 2; ++end) {
      double p[3];
      for (int k = 0; k < 3; ++k) {
        p[k] = static_cast<double>(start[3 * e + k]) + (end ? static_cast<double>(P.S - 1) * step[k] : 0.0);
        if (!(std::fabs(p[k]) < kMaxCoord)) return false;
      }
      for (int r = 0; r < 3; ++r) {
        const double q = P.G[4 * r] * p[0] + P.G[4 * r + 1] * p[1] + P.G[4 * r + 2] * p[2] + P.G[4 * r + 3];
        if (!(std::fabs(q) < kMaxCoord)) return false;
      }
    }
  return true;
}

// One sub-ray (origin o, step st), echoes weighted by wT (3, S) and added into out (3, S) (first:
// written). Blocks of 8 samples.
MEDFAST_AVX2 void march_subray8(const float* vol, const float* table, const Params& P, const float* o,
                                const float* st, const float* wT, bool first, float* out) {
  const int64_t S = P.S;
  CellCache<float> cell{};
  const float* cp[8] = {};  // the 8 corner property rows of the cell in `cell`
  int64_t corner_off[8];
  for (int corner = 0; corner < 8; ++corner)
    corner_off[corner] = (((corner >> 2) * P.H + ((corner >> 1) & 1)) * P.W + (corner & 1)) * kProps;
  NoiseRows last{}, cells[8];
  bool have_last = false;
  const __m256 sharp = _mm256_set1_ps(static_cast<float>(P.sharp));
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  const __m256 o0 = _mm256_set1_ps(o[0]), o1 = _mm256_set1_ps(o[1]), o2 = _mm256_set1_ps(o[2]);
  const __m256 s0 = _mm256_set1_ps(st[0]), s1 = _mm256_set1_ps(st[1]), s2v = _mm256_set1_ps(st[2]);
  const __m256 iota = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i shift_idx = _mm256_setr_epi32(0, 0, 1, 2, 3, 4, 5, 6);
  const bool speckle = P.noise_mask != 0;
  __m256d logT = _mm256_setzero_pd();  // log transmission down to the block, in every lane
  float Zlast = 1.0f;
  alignas(32) int32_t ci[3][8];
  for (int64_t i0 = 0; i0 < S; i0 += 8) {
    const int nv = S - i0 < 8 ? static_cast<int>(S - i0) : 8;
    const int valid = (1 << nv) - 1;
    const __m256 fi = _mm256_add_ps(_mm256_set1_ps(static_cast<float>(i0)), iota);
    // (one rounding: may differ from the generic path by an ulp of the position)
    const __m256 p[3] = {_mm256_fmadd_ps(fi, s0, o0), _mm256_fmadd_ps(fi, s1, o1), _mm256_fmadd_ps(fi, s2v, o2)};

    // ---- properties: trilinear (impedance: sharpened weights), per distinct voxel cell.
    __m256 t[3], wt[8], wz[8], v[kProps] = {zero, zero, zero, zero, zero};
    __m256i cell_i[3];
    for (int k = 0; k < 3; ++k) {
      const __m256 f = _mm256_floor_ps(p[k]);
      t[k] = _mm256_sub_ps(p[k], f);
      cell_i[k] = _mm256_cvttps_epi32(f);
      _mm256_store_si256(reinterpret_cast<__m256i*>(ci[k]), cell_i[k]);
    }
    corner_weights(t[0], t[1], t[2], wt);
    corner_weights(sharpen8(t[0], sharp), sharpen8(t[1], sharp), sharpen8(t[2], sharp), wz);
    for (int todo = valid; todo;) {
      const int l = __builtin_ctz(todo);
      const int m = same_cell(cell_i[0], cell_i[1], cell_i[2], ci[0], ci[1], ci[2], l) & todo;
      if (!cell.valid || cell.i0 != ci[0][l] || cell.j0 != ci[1][l] || cell.k0 != ci[2][l]) {
        cell.i0 = ci[0][l];
        cell.j0 = ci[1][l];
        cell.k0 = ci[2][l];
        cell.valid = true;
        // Inside the volume the corners are read in place (no copy into the cache); at the border
        // load_cell fills in the background values.
        if (cell_inside(P, cell.i0, cell.j0, cell.k0)) {
          const float* base = vol + ((cell.i0 * P.H + cell.j0) * P.W + cell.k0) * kProps;
          for (int corner = 0; corner < 8; ++corner) cp[corner] = base + corner_off[corner];
        } else {
          load_cell<float, float>(vol, P, cell.i0, cell.j0, cell.k0, cell.val);
          for (int corner = 0; corner < 8; ++corner) cp[corner] = cell.val[corner];
        }
      }
      __m256 acc[kProps];
      for (int c = 0; c < kProps; ++c) acc[c] = zero;
      for (int corner = 0; corner < 8; ++corner) {
        acc[0] = _mm256_fmadd_ps(wz[corner], _mm256_set1_ps(cp[corner][0]), acc[0]);
        for (int c = 1; c < kProps; ++c) acc[c] = _mm256_fmadd_ps(wt[corner], _mm256_set1_ps(cp[corner][c]), acc[c]);
      }
      if (todo == valid && m == valid) {
        for (int c = 0; c < kProps; ++c) v[c] = acc[c];
      } else {
        const __m256 mk = lane_mask(m);
        for (int c = 0; c < kProps; ++c) v[c] = todo == valid ? acc[c] : _mm256_blendv_ps(v[c], acc[c], mk);
      }
      todo &= ~m;
    }

    // ---- scatter noise: trilinear in the scatter grid, normalised by the weights' norm.
    __m256 n[3] = {zero, zero, zero};
    if (!speckle) {
      for (int c = 0; c < 3; ++c) n[c] = _mm256_set1_ps(table[c]);
    } else {
      __m256 tq[3];
      __m256i cq[3];
      for (int r = 0; r < 3; ++r) {
        __m128 tf[2];
        __m128i cf[2];
        for (int h = 0; h < 2; ++h) {
          const __m256d d = _mm256_cvtps_pd(h ? _mm256_extractf128_ps(p[0], 1) : _mm256_castps256_ps128(p[0]));
          const __m256d hh = _mm256_cvtps_pd(h ? _mm256_extractf128_ps(p[1], 1) : _mm256_castps256_ps128(p[1]));
          const __m256d w = _mm256_cvtps_pd(h ? _mm256_extractf128_ps(p[2], 1) : _mm256_castps256_ps128(p[2]));
          __m256d q = _mm256_fmadd_pd(_mm256_set1_pd(P.G[4 * r]), d, _mm256_set1_pd(P.G[4 * r + 3]));
          q = _mm256_fmadd_pd(_mm256_set1_pd(P.G[4 * r + 1]), hh, q);
          q = _mm256_fmadd_pd(_mm256_set1_pd(P.G[4 * r + 2]), w, q);
          const __m256d f = _mm256_floor_pd(q);
          tf[h] = _mm256_cvtpd_ps(_mm256_sub_pd(q, f));
          cf[h] = _mm256_cvttpd_epi32(f);
        }
        tq[r] = _mm256_set_m128(tf[1], tf[0]);
        cq[r] = _mm256_set_m128i(cf[1], cf[0]);
        _mm256_store_si256(reinterpret_cast<__m256i*>(ci[r]), cq[r]);
      }
      __m256 wq[8];
      corner_weights(tq[0], tq[1], tq[2], wq);
      __m256 ss = zero;
      for (int corner = 0; corner < 8; ++corner) ss = _mm256_fmadd_ps(wq[corner], wq[corner], ss);
      const __m256 inv = _mm256_div_ps(one, _mm256_sqrt_ps(ss));
      // Pass 1: the distinct cells of the block (lanes in sample order) and their corner rows. Pass 2:
      // the sums. (No software prefetch of the rows: the table stays in L2, and the 8 prefetches per
      // cell cost more than they saved, ~0.5 ms per frame.)
      int ncell = 0, cmask[8];
      for (int todo = valid; todo;) {
        const int l = __builtin_ctz(todo);
        const int m = same_cell(cq[0], cq[1], cq[2], ci[0], ci[1], ci[2], l) & todo;
        NoiseRows& nr = ncell == 0 ? last : cells[ncell];
        if (!(ncell == 0 && have_last && last.c[0] == ci[0][l] && last.c[1] == ci[1][l] && last.c[2] == ci[2][l])) {
          nr.c[0] = ci[0][l];
          nr.c[1] = ci[1][l];
          nr.c[2] = ci[2][l];
          noise_corner_rows(table, P, nr.c[0], nr.c[1], nr.c[2], nr.r);
        }
        cmask[ncell++] = m;
        todo &= ~m;
      }
      for (int k = 0; k < ncell; ++k) {
        const NoiseRows& nr = k == 0 ? last : cells[k];
        __m256 acc[3] = {zero, zero, zero};
        for (int corner = 0; corner < 8; ++corner)
          for (int c = 0; c < 3; ++c) acc[c] = _mm256_fmadd_ps(wq[corner], _mm256_set1_ps(nr.r[corner][c]), acc[c]);
        if (k == 0) {
          for (int c = 0; c < 3; ++c) n[c] = acc[c];
        } else {
          const __m256 mk = lane_mask(cmask[k]);
          for (int c = 0; c < 3; ++c) n[c] = _mm256_blendv_ps(n[c], acc[c], mk);
        }
      }
      if (ncell > 1) last = cells[ncell - 1];  // the next block usually starts in this cell
      have_last = true;
      for (int c = 0; c < 3; ++c) n[c] = _mm256_mul_ps(n[c], inv);
    }

    // ---- echoes and transmission (eval_sample + march_ray_fn).
    const __m256 zmin = _mm256_set1_ps(static_cast<float>(kMinImpedance));
    const __m256 Z = _mm256_blendv_ps(v[0], zmin, _mm256_cmp_ps(v[0], zmin, _CMP_LT_OQ));
    __m256 Zp = _mm256_permutevar8x32_ps(Z, shift_idx);
    Zp = _mm256_blend_ps(Zp, _mm256_set1_ps(Zlast), 1);
    __m256 R = _mm256_div_ps(_mm256_sub_ps(Z, Zp), _mm256_add_ps(Z, Zp));
    if (i0 == 0) R = _mm256_blend_ps(R, zero, 1);  // R_0 = 0
    const __m256 rho = _mm256_and_ps(v[2], _mm256_cmp_ps(v[2], zero, _CMP_GT_OQ));
    const __m256 amp = _mm256_mul_ps(_mm256_sqrt_ps(rho), _mm256_fmadd_ps(v[4], n[2], v[3]));
    const __m256 tr = _mm256_fnmadd_ps(R, R, one);
    const __m256 lt = log8(_mm256_max_ps(tr, _mm256_set1_ps(static_cast<float>(kMinTransmission))));
    // u = log(1 - R^2) - att alpha in double; T_i = exp(sum_{j < i} u_j): an exclusive prefix sum in
    // double over the block (log-step scan; differs from the sequential sum by double rounding only).
    const __m256d att = _mm256_set1_pd(P.att), zd = _mm256_setzero_pd();
    const __m256d ulo = _mm256_fnmadd_pd(att, _mm256_cvtps_pd(_mm256_castps256_ps128(v[1])),
                                         _mm256_cvtps_pd(_mm256_castps256_ps128(lt)));
    const __m256d uhi = _mm256_fnmadd_pd(att, _mm256_cvtps_pd(_mm256_extractf128_ps(v[1], 1)),
                                         _mm256_cvtps_pd(_mm256_extractf128_ps(lt, 1)));
    // u shifted up one lane (lane 0: 0), then inclusive scans of its two halves.
    const __m256d xlo = _mm256_blend_pd(_mm256_permute4x64_pd(ulo, 0x90), zd, 1);
    const __m256d xhi = _mm256_blend_pd(_mm256_permute4x64_pd(uhi, 0x90), _mm256_permute4x64_pd(ulo, 0xFF), 1);
    const __m256d slo = scan4(xlo), shi = scan4(xhi);
    const __m256d Tlo = _mm256_add_pd(logT, slo);
    const __m256d Thi = _mm256_add_pd(_mm256_add_pd(logT, _mm256_permute4x64_pd(slo, 0xFF)), shi);
    logT = _mm256_permute4x64_pd(_mm256_add_pd(Thi, uhi), 0xFF);  // (only a full block is followed by another)
    const __m256 T = exp8(_mm256_set_m128(_mm256_cvtpd_ps(Thi), _mm256_cvtpd_ps(Tlo)));
    const __m256 TA = _mm256_mul_ps(T, amp);
    const __m256 e[3] = {_mm256_mul_ps(T, R), _mm256_mul_ps(TA, n[0]), _mm256_mul_ps(TA, n[1])};
    if (nv == 8) {
      for (int c = 0; c < 3; ++c) {
        const __m256 val = _mm256_mul_ps(_mm256_loadu_ps(wT + c * S + i0), e[c]);
        float* dst = out + c * S + i0;
        _mm256_storeu_ps(dst, first ? val : _mm256_add_ps(_mm256_loadu_ps(dst), val));
      }
    } else {
      const __m256i mk = _mm256_castps_si256(lane_mask(valid));
      for (int c = 0; c < 3; ++c) {
        const __m256 val = _mm256_mul_ps(_mm256_maskload_ps(wT + c * S + i0, mk), e[c]);
        float* dst = out + c * S + i0;
        _mm256_maskstore_ps(dst, mk, first ? val : _mm256_add_ps(_mm256_maskload_ps(dst, mk), val));
      }
    }
    alignas(32) float zs[8];
    _mm256_store_ps(zs, Z);
    Zlast = zs[7];
  }
}

}  // namespace

bool march_lines_avx2_applies(const Params& P) { return cpu_simd_available() && P.S > 0; }

// Lines [begin, end) of march_lines_cpu for float32; wT (E, 3, S) the channel-major weights.
void march_lines_avx2(const float* vol, int64_t vol_stride, int64_t Bv, const float* table, const Params& P,
                      const float* st, const float* sp, const float* w, const float* wT, int64_t L, int64_t E,
                      float* o, int64_t begin, int64_t end) {
  const int64_t S = P.S;
  for (int64_t line = begin; line < end; ++line) {
    const int64_t b = line / L;
    const float* v = vol + (Bv == 1 ? 0 : b) * vol_stride;
    const float* start = st + line * E * 3;
    const float* step = sp + line * 3;
    float* out = o + line * 3 * S;
    if (!line_in_range(start, step, E, P)) {
      march_line<float, float, true>(v, table, P, start, step, w, E, out, S);
      continue;
    }
    for (int64_t e = 0; e < E; ++e) march_subray8(v, table, P, start + 3 * e, step, wT + e * 3 * S, e == 0, out);
  }
}

}  // namespace medfast::ussim

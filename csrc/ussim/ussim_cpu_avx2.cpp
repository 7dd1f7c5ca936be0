// AVX2 specialization of the line march (march_line in ussim.h) for float32: eight consecutive samples
// of a sub-ray per vector. It is the arithmetic of march_line / eval_sample written for eight lanes,
// in passes over a sub-ray (march_subray8; each pass a short loop whose blocks overlap in the core):
//   1. properties: positions start + i * step, trilinear weights per lane (sharpened for the
//      impedance); a block of 8 samples touches ~2 voxel cells (~10 samples per voxel), so each
//      distinct cell's corners are read in place (load_cell at the border), broadcast and blended
//      into the lanes in that cell;
//   2. scatter noise: scatter-grid weights per lane; the 8 corner rows of every lane hashed in 32-bit
//      vector arithmetic (cell_row / hash32 of ussim.h, 8 lanes per instruction), loaded and
//      transposed to one vector per channel;
//   3.-5. R, log(1 - R^2) and exp(log T) with polynomial vector logf / expf (Cephes, ~1 ulp), the
//      running log-transmission summed in double in sample order, as the scalar march; the echoes.
// Results equal the generic path to float rounding (tests/test_ultrasound.py compares them with
// _set_cpu_simd(False)). Lines whose coordinates are huge or not finite take the generic path.
// The float32 backward (march_backward_avx2: the property and / or the position gradient) is written
// the same way, see backward_ray8.
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <vector>

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

// hash32 (ussim.h) of eight 32-bit keys.
MEDFAST_AVX2 inline __m256i hash32x8(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0x846ca68bU)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

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

// The noise-table rows (N re, N im, M re, M im; ussim.h) at the float offsets rc[0..7] of the 8 lanes,
// transposed to one vector per channel r[0..3].
MEDFAST_AVX2 inline void table_rows8(const float* table, const int32_t* rc, __m256* r) {
  static_assert(kNoise == 4, "one 128-bit load per row");
  __m256 v[4];
  for (int l = 0; l < 4; ++l)
    v[l] = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(table + rc[l])), _mm_loadu_ps(table + rc[l + 4]), 1);
  const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
  const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
  r[0] = _mm256_shuffle_ps(t0, t2, 0x44);
  r[1] = _mm256_shuffle_ps(t0, t2, 0xEE);
  r[2] = _mm256_shuffle_ps(t1, t3, 0x44);
  r[3] = _mm256_shuffle_ps(t1, t3, 0xEE);
}

// The scatter echo of ussim.h's eval_sample, sqrt(rho) (mu N + sigma M), real (re) and imaginary (im) part.
MEDFAST_AVX2 inline void scatter_echo8(__m256 sq, __m256 mu, __m256 sd, const __m256* n, __m256* re, __m256* im) {
  *re = _mm256_mul_ps(sq, _mm256_fmadd_ps(sd, n[2], _mm256_mul_ps(mu, n[0])));
  *im = _mm256_mul_ps(sq, _mm256_fmadd_ps(sd, n[3], _mm256_mul_ps(mu, n[1])));
}

// The later steps of monotone runs (ussim.h, Run): f(i, r) for each step i that continues the previous step's
// strict direction, r the sample its run starts at. A step's "later" flag needs only its and the previous step's
// directions, so 8 at a time by vector compares (a branch per sample on data-dependent directions mispredicted:
// ~1 ns per sample); the few set lanes in order, the run start carried (a later step right after another is in
// its run; else the step before it began the run, at sample i - 2). Z[-2] and Z[-1] must be readable.
template <typename F>
MEDFAST_AVX2 inline void for_each_later_step(const float* Z, int64_t S, F f) {
  int64_t prev = -2, r = 0;
  for (int64_t i0 = 0; i0 < S; i0 += 8) {
    const __m256 z = _mm256_loadu_ps(Z + i0), zp = _mm256_loadu_ps(Z + i0 - 1), zpp = _mm256_loadu_ps(Z + i0 - 2);
    const __m256 up = _mm256_and_ps(_mm256_cmp_ps(z, zp, _CMP_GT_OQ), _mm256_cmp_ps(zp, zpp, _CMP_GT_OQ));
    const __m256 dn = _mm256_and_ps(_mm256_cmp_ps(z, zp, _CMP_LT_OQ), _mm256_cmp_ps(zp, zpp, _CMP_LT_OQ));
    unsigned m = static_cast<unsigned>(_mm256_movemask_ps(_mm256_or_ps(up, dn)));
    if (i0 == 0) m &= ~3u;  // sample 0 is no step, and step 1 follows none
    if (S - i0 < 8) m &= (1u << (S - i0)) - 1u;
    while (m) {
      const int64_t i = i0 + __builtin_ctz(m);
      m &= m - 1;
      if (i - 1 != prev) r = i - 2;
      prev = i;
      f(i, r);
    }
  }
}

// lt[i] = log(1 - R_i^2) of the vector pass holds for a run's first step; a later step takes the run's telescoping
// difference (run_step_loss of ussim.h).
MEDFAST_AVX2 inline void run_log_transmissions(const float* Z, int64_t S, float* lt) {
  for_each_later_step(Z, S, [&](int64_t i, int64_t r) { lt[i] = run_step_loss<float>(Z[r], Z[i - 1], Z[i]); });
}

// Scratch values of one sub-ray per sample (march_subray8), channel-major, Sp = S rounded up to 8.
struct SubrayBuffer {
  std::vector<float> data;
  std::vector<int32_t> rows;  // [block][corner][lane]: float offsets of the noise-table rows
  int64_t Sp;
  explicit SubrayBuffer(int64_t S)
      : data(9 * ((S + 7) & ~int64_t(7)) + 8), rows(8 * ((S + 7) & ~int64_t(7))), Sp((S + 7) & ~int64_t(7)) {}
  float* Z() { return data.data() + 8; }  // impedance (clamped); Z()[-1] is readable (R_0 = 0 anyway)
  float* alpha() { return Z() + Sp; }  // alpha; then the log-transmission down to the sample
  float* sq() { return Z() + 2 * Sp; }   // sqrt(rho); then the scatter echo's real part
  float* mu() { return Z() + 3 * Sp; }   // mu; then the scatter echo's imaginary part
  float* sd() { return Z() + 4 * Sp; }   // sigma; then log(1 - R^2)
  float* R() { return Z() + 5 * Sp; }    // reflection coefficient
  float* tq() { return Z() + 6 * Sp; }   // 3 x Sp: fractions of the scatter-grid positions
};

// One sub-ray (origin o, step st), echoes weighted by wT (3, S) and added into out (3, S) (first:
// written). Three passes over blocks of 8 samples, each keeping its per-sample results in buf:
// properties (branchy: per distinct voxel cell), scatter noise (straight-line), transmission and
// echoes (straight-line, the running log-transmission its only carried value). Split, the blocks of
// each pass overlap in the out-of-order core (one fused loop is bound by its long dependency chains).
// A tail block's extra lanes hold finite values of positions past the ray's end, never stored to out.
MEDFAST_AVX2 void march_subray8(const float* vol, const float* table, const Params& P, const float* o,
                                const float* st, const float* wT, bool first, float* out, SubrayBuffer& buf) {
  const int64_t S = P.S;
  float *bZ = buf.Z(), *bA = buf.alpha(), *bSq = buf.sq(), *bMu = buf.mu(), *bSd = buf.sd();
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();

  // ---- Pass 1: properties, trilinear (impedance: sharpened weights), per distinct voxel cell.
  {
    CellCache<float> cell{};
    const float* cp[8] = {};  // the 8 corner property rows of the cell in `cell`
    int64_t corner_off[8];
    for (int corner = 0; corner < 8; ++corner)
      corner_off[corner] = (((corner >> 2) * P.H + ((corner >> 1) & 1)) * P.W + (corner & 1)) * kProps;
    const __m256 sharp[3] = {_mm256_set1_ps(static_cast<float>(P.sharp[0])),
                             _mm256_set1_ps(static_cast<float>(P.sharp[1])),
                             _mm256_set1_ps(static_cast<float>(P.sharp[2]))};  // per voxel axis
    const __m256 o0 = _mm256_set1_ps(o[0]), o1 = _mm256_set1_ps(o[1]), o2 = _mm256_set1_ps(o[2]);
    const __m256 s0 = _mm256_set1_ps(st[0]), s1 = _mm256_set1_ps(st[1]), s2 = _mm256_set1_ps(st[2]);
    const __m256 iota = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 zmin = _mm256_set1_ps(static_cast<float>(kMinImpedance));
    alignas(32) int32_t ci[3][8];
    for (int64_t i0 = 0; i0 < S; i0 += 8) {
      const int nv = S - i0 < 8 ? static_cast<int>(S - i0) : 8;
      const int valid = (1 << nv) - 1;
      const __m256 fi = _mm256_add_ps(_mm256_set1_ps(static_cast<float>(i0)), iota);
      // (one rounding: may differ from the generic path by an ulp of the position)
      const __m256 p[3] = {_mm256_fmadd_ps(fi, s0, o0), _mm256_fmadd_ps(fi, s1, o1), _mm256_fmadd_ps(fi, s2, o2)};
      __m256 t[3], wt[8], wz[8], v[kProps] = {zero, zero, zero, zero, zero};
      __m256i cell_i[3];
      for (int k = 0; k < 3; ++k) {
        const __m256 f = _mm256_floor_ps(p[k]);
        t[k] = _mm256_sub_ps(p[k], f);
        cell_i[k] = _mm256_cvttps_epi32(f);
        _mm256_store_si256(reinterpret_cast<__m256i*>(ci[k]), cell_i[k]);
      }
      {
        // Prefetch the corner rows of the cell 64 samples (~6 voxels) ahead: the next cells' rows
        // come from L2/L3 (~0.3 ms per frame less).
        const float fa = static_cast<float>(i0 + 64);
        const int64_t ai = static_cast<int64_t>(std::floor(o[0] + fa * st[0]));
        const int64_t aj = static_cast<int64_t>(std::floor(o[1] + fa * st[1]));
        const int64_t ak = static_cast<int64_t>(std::floor(o[2] + fa * st[2]));
        if (cell_inside(P, ai, aj, ak)) {
          const char* base = reinterpret_cast<const char*>(vol + ((ai * P.H + aj) * P.W + ak) * kProps);
          for (int corner = 0; corner < 8; corner += 2) {  // (corners e = 0, 1: 40 bytes, up to 2 lines)
            _mm_prefetch(base + corner_off[corner] * sizeof(float), _MM_HINT_T0);
            _mm_prefetch(base + corner_off[corner] * sizeof(float) + 2 * kProps * sizeof(float) - 1, _MM_HINT_T0);
          }
        }
      }
      corner_weights(t[0], t[1], t[2], wt);
      corner_weights(sharpen8(t[0], sharp[0]), sharpen8(t[1], sharp[1]), sharpen8(t[2], sharp[2]), wz);
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
          for (int c = 0; c < kProps; ++c)
            acc[c] = _mm256_fmadd_ps(c < kSharpProps ? wz[corner] : wt[corner], _mm256_set1_ps(cp[corner][c]), acc[c]);
        }
        if (todo == valid && m == valid) {
          for (int c = 0; c < kProps; ++c) v[c] = acc[c];
        } else {
          const __m256 mk = lane_mask(m);
          for (int c = 0; c < kProps; ++c) v[c] = todo == valid ? acc[c] : _mm256_blendv_ps(v[c], acc[c], mk);
        }
        todo &= ~m;
      }
      _mm256_storeu_ps(bZ + i0, _mm256_blendv_ps(v[0], zmin, _mm256_cmp_ps(v[0], zmin, _CMP_LT_OQ)));
      _mm256_storeu_ps(bA + i0, v[1]);
      _mm256_storeu_ps(bSq + i0, _mm256_sqrt_ps(_mm256_and_ps(v[2], _mm256_cmp_ps(v[2], zero, _CMP_GT_OQ))));
      _mm256_storeu_ps(bMu + i0, v[3]);
      _mm256_storeu_ps(bSd + i0, v[4]);
    }
  }

  // ---- Pass 2: scatter noise, trilinear in the scatter grid, normalised by the weights' norm; then
  // the scatter echo sqrt(rho) (mu N + sigma M) (in place of sqrt(rho), mu).
  {
    const bool speckle = P.noise_mask != 0;
    __m256d qo[3], qs[3];
    for (int r = 0; r < 3; ++r) {
      const double* g = P.G + 4 * r;
      qo[r] = _mm256_set1_pd(g[0] * o[0] + g[1] * o[1] + g[2] * o[2] + g[3]);
      qs[r] = _mm256_set1_pd(g[0] * st[0] + g[1] * st[1] + g[2] * st[2]);
    }
    const __m256i seedv = _mm256_set1_epi32(static_cast<int>(seed32(P)));
    const __m256i maskv = _mm256_set1_epi32(static_cast<int>(P.noise_mask));
    const __m256i mul0 = _mm256_set1_epi32(static_cast<int>(kCellMul0));
    const __m256i mul1 = _mm256_set1_epi32(static_cast<int>(kCellMul1));
    const __m256i mul2 = _mm256_set1_epi32(static_cast<int>(kCellMul2));
    float* btq = buf.tq();
    int32_t* brows = buf.rows.data();
    // 2a: scatter-grid cells and fractions, the corner rows of every lane's cell: cell_row (ussim.h)
    // in 32-bit vector arithmetic (one hash per lane and corner, no per-cell branches).
    if (speckle)
      for (int64_t i0 = 0; i0 < S; i0 += 8) {
        // Scatter-grid position q = G (p, 1) of sample i = qo + i qs in double (one rounding; the
        // generic path maps the float position p, so the two differ by about an ulp of p).
        __m256i cq[3];
        const __m256d ilo = _mm256_add_pd(_mm256_set1_pd(static_cast<double>(i0)), _mm256_setr_pd(0, 1, 2, 3));
        const __m256d ihi = _mm256_add_pd(ilo, _mm256_set1_pd(4.0));
        for (int r = 0; r < 3; ++r) {
          const __m256d qlo = _mm256_fmadd_pd(ilo, qs[r], qo[r]), qhi = _mm256_fmadd_pd(ihi, qs[r], qo[r]);
          const __m256d flo = _mm256_floor_pd(qlo), fhi = _mm256_floor_pd(qhi);
          _mm256_storeu_ps(btq + r * buf.Sp + i0, _mm256_set_m128(_mm256_cvtpd_ps(_mm256_sub_pd(qhi, fhi)),
                                                                 _mm256_cvtpd_ps(_mm256_sub_pd(qlo, flo))));
          cq[r] = _mm256_set_m128i(_mm256_cvttpd_epi32(fhi), _mm256_cvttpd_epi32(flo));
        }
        const __m256i A0 = _mm256_mullo_epi32(cq[0], mul0), B0 = _mm256_mullo_epi32(cq[1], mul1);
        const __m256i C0 = _mm256_mullo_epi32(cq[2], mul2);
        const __m256i Av[2] = {A0, _mm256_add_epi32(A0, mul0)}, Bv[2] = {B0, _mm256_add_epi32(B0, mul1)};
        const __m256i Cv[2] = {_mm256_xor_si256(C0, seedv), _mm256_xor_si256(_mm256_add_epi32(C0, mul2), seedv)};
        for (int corner = 0; corner < 8; ++corner) {
          const __m256i key = _mm256_xor_si256(_mm256_xor_si256(Av[corner >> 2], Bv[(corner >> 1) & 1]), Cv[corner & 1]);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(brows + 8 * i0 + 8 * corner),
                              _mm256_slli_epi32(_mm256_and_si256(hash32x8(key), maskv), 2));  // * kNoise
        }
      }
    // 2b: the trilinear sums (rows gathered and transposed), normalised; the scatter echo.
    for (int64_t i0 = 0; i0 < S; i0 += 8) {
      __m256 n[kNoise] = {zero, zero, zero, zero};
      __m256 sq = _mm256_loadu_ps(bSq + i0);
      if (!speckle) {
        for (int c = 0; c < kNoise; ++c) n[c] = _mm256_set1_ps(table[c]);
      } else {
        __m256 wq[8];
        corner_weights(_mm256_loadu_ps(btq + i0), _mm256_loadu_ps(btq + buf.Sp + i0),
                       _mm256_loadu_ps(btq + 2 * buf.Sp + i0), wq);
        __m256 ss = zero;
        for (int corner = 0; corner < 8; ++corner) ss = _mm256_fmadd_ps(wq[corner], wq[corner], ss);
        for (int corner = 0; corner < 8; ++corner) {
          __m256 r[kNoise];
          table_rows8(table, brows + 8 * i0 + 8 * corner, r);
          for (int c = 0; c < kNoise; ++c) n[c] = _mm256_fmadd_ps(wq[corner], r[c], n[c]);
        }
        sq = _mm256_div_ps(sq, _mm256_sqrt_ps(ss));  // the field's normalisation folded into sqrt(rho)
      }
      __m256 re, im;
      scatter_echo8(sq, _mm256_loadu_ps(bMu + i0), _mm256_loadu_ps(bSd + i0), n, &re, &im);
      _mm256_storeu_ps(bSq + i0, re);
      _mm256_storeu_ps(bMu + i0, im);
    }
  }

  // ---- Pass 3: reflection coefficients and their transmission losses log(1 - R^2).
  float* bR = buf.R();
  const __m256 tmin = _mm256_set1_ps(static_cast<float>(kMinTransmission));
  for (int64_t i0 = 0; i0 < S; i0 += 8) {
    const __m256 Z = _mm256_loadu_ps(bZ + i0), Zp = _mm256_loadu_ps(bZ + i0 - 1);
    __m256 R = _mm256_div_ps(_mm256_sub_ps(Z, Zp), _mm256_add_ps(Z, Zp));
    if (i0 == 0) R = _mm256_blend_ps(R, zero, 1);  // R_0 = 0
    _mm256_storeu_ps(bR + i0, R);
    _mm256_storeu_ps(bSd + i0, log8(_mm256_max_ps(_mm256_fnmadd_ps(R, R, one), tmin)));
  }
  run_log_transmissions(bZ, S, bSd);

  // ---- Pass 4: u = log(1 - R^2) - att alpha in double; log T_i = sum_{j < i} u_j: an exclusive prefix
  // sum in double over each block (log-step scan; differs from the sequential sum by double rounding
  // only), written as float in place of alpha.
  {
    const __m256d att = _mm256_set1_pd(P.att), zd = _mm256_setzero_pd();
    __m256d logT = _mm256_setzero_pd();  // log transmission down to the block, in every lane
    for (int64_t i0 = 0; i0 < S; i0 += 8) {
      const __m256 alpha = _mm256_loadu_ps(bA + i0), lt = _mm256_loadu_ps(bSd + i0);
      const __m256d ulo = _mm256_fnmadd_pd(att, _mm256_cvtps_pd(_mm256_castps256_ps128(alpha)),
                                           _mm256_cvtps_pd(_mm256_castps256_ps128(lt)));
      const __m256d uhi = _mm256_fnmadd_pd(att, _mm256_cvtps_pd(_mm256_extractf128_ps(alpha, 1)),
                                           _mm256_cvtps_pd(_mm256_extractf128_ps(lt, 1)));
      // u shifted up one lane (lane 0: 0), then inclusive scans of its two halves.
      const __m256d xlo = _mm256_blend_pd(_mm256_permute4x64_pd(ulo, 0x90), zd, 1);
      const __m256d xhi = _mm256_blend_pd(_mm256_permute4x64_pd(uhi, 0x90), _mm256_permute4x64_pd(ulo, 0xFF), 1);
      const __m256d slo = scan4(xlo), shi = scan4(xhi);
      const __m256d Tlo = _mm256_add_pd(logT, slo);
      const __m256d Thi = _mm256_add_pd(_mm256_add_pd(logT, _mm256_permute4x64_pd(slo, 0xFF)), shi);
      logT = _mm256_permute4x64_pd(_mm256_add_pd(Thi, uhi), 0xFF);  // (only a full block is followed by another)
      _mm256_storeu_ps(bA + i0, _mm256_set_m128(_mm256_cvtpd_ps(Thi), _mm256_cvtpd_ps(Tlo)));
    }
  }

  // ---- Pass 5: echoes E_i (R_i, c0_i, c1_i) (c the scatter echo of pass 2), weighted and summed into out.
  for (int64_t i0 = 0; i0 < S; i0 += 8) {
    const int nv = S - i0 < 8 ? static_cast<int>(S - i0) : 8;
    const __m256 T = exp8(_mm256_loadu_ps(bA + i0));
    const __m256 e[3] = {_mm256_mul_ps(T, _mm256_loadu_ps(bR + i0)), _mm256_mul_ps(T, _mm256_loadu_ps(bSq + i0)),
                         _mm256_mul_ps(T, _mm256_loadu_ps(bMu + i0))};
    if (nv == 8) {
      for (int c = 0; c < 3; ++c) {
        const __m256 val = _mm256_mul_ps(_mm256_loadu_ps(wT + c * S + i0), e[c]);
        float* dst = out + c * S + i0;
        _mm256_storeu_ps(dst, first ? val : _mm256_add_ps(_mm256_loadu_ps(dst), val));
      }
    } else {
      const __m256i mk = _mm256_castps_si256(lane_mask((1 << nv) - 1));
      for (int c = 0; c < 3; ++c) {
        const __m256 val = _mm256_mul_ps(_mm256_maskload_ps(wT + c * S + i0, mk), e[c]);
        float* dst = out + c * S + i0;
        _mm256_maskstore_ps(dst, mk, first ? val : _mm256_add_ps(_mm256_maskload_ps(dst, mk), val));
      }
    }
  }
}


// ---------------------------------------------------------------------------------------------------
// Backward of one ray (march_ray_backward of ussim.h): the property gradient (kRec) and / or the
// position gradient (kCoords), float32, eight consecutive samples per vector, in passes like the
// forward (march_subray8):
//   0. positions and output gradients (S, 3) -> channel-major scratch;
//   1. properties at the positions (as the forward's pass 1);
//   2. scatter noise (as the forward's pass 2, scatter-grid positions from the float positions);
//   3. R and log(1 - R^2);
//   4. log T (exclusive scan in double), E = exp(log T), h E (h of ussim.h) and its total in double;
//   5. W_i = total - sum_{k <= i} h_k E_k (inclusive scan in double), dL/dR_i and the two impedance
//      terms of R_i (dR_i/dZ_i and dR_i/dZ_{i-1} times dL/dR_i);
//   6. the per-sample property gradients, weighted by the corner weights and summed per run of samples
//      in one voxel cell (in sample order) into the ray's cell records (CellRecords); and / or the
//      position gradient: the property gradients times the trilinear derivatives of the properties
//      (per distinct voxel cell of a block, contracted over the properties at the corners first), plus
//      the scatter field's derivative (the corner rows of pass 2 loaded again).
// The same arithmetic as the generic path up to float rounding (exp / log polynomials, FMA, sum order).

// Appends the record of cell cur with the sums acc[c] (the 8 corners of property c).
MEDFAST_AVX2 inline void flush_record(CellRecords<float>& rec, const int32_t* cur, const __m256* acc) {
  alignas(32) float sums[8 * kProps];
  for (int c = 0; c < kProps; ++c) _mm256_store_ps(sums + 8 * c, acc[c]);
  rec.append(cur[0], cur[1], cur[2], sums);
}

// out[l] = (in[0][l], ..., in[7][l]): 8 x 8 transpose.
MEDFAST_AVX2 inline void transpose8x8(const __m256* in, __m256* out) {
  const __m256 t0 = _mm256_unpacklo_ps(in[0], in[1]), t1 = _mm256_unpackhi_ps(in[0], in[1]);
  const __m256 t2 = _mm256_unpacklo_ps(in[2], in[3]), t3 = _mm256_unpackhi_ps(in[2], in[3]);
  const __m256 t4 = _mm256_unpacklo_ps(in[4], in[5]), t5 = _mm256_unpackhi_ps(in[4], in[5]);
  const __m256 t6 = _mm256_unpacklo_ps(in[6], in[7]), t7 = _mm256_unpackhi_ps(in[6], in[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  out[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  out[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  out[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  out[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  out[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  out[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  out[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  out[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// The position gradient's helpers. Edge weights of fractions (a, b, c): for each axis the 4 bilinear
// weights of the other two (w[0..3]: (b, c) for axis a, index 2 b + c; w[4..7]: (a, c) for axis b;
// w[8..11]: (a, b) for axis c; 1 - t for a 0 index, t for a 1 index).
MEDFAST_AVX2 inline void edge_weights(__m256 ta, __m256 tb, __m256 tc, __m256* w) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 ua = _mm256_sub_ps(one, ta), ub = _mm256_sub_ps(one, tb), uc = _mm256_sub_ps(one, tc);
  w[0] = _mm256_mul_ps(ub, uc);
  w[1] = _mm256_mul_ps(ub, tc);
  w[2] = _mm256_mul_ps(tb, uc);
  w[3] = _mm256_mul_ps(tb, tc);
  w[4] = _mm256_mul_ps(ua, uc);
  w[5] = _mm256_mul_ps(ua, tc);
  w[6] = _mm256_mul_ps(ta, uc);
  w[7] = _mm256_mul_ps(ta, tc);
  w[8] = _mm256_mul_ps(ua, ub);
  w[9] = _mm256_mul_ps(ua, tb);
  w[10] = _mm256_mul_ps(ta, ub);
  w[11] = _mm256_mul_ps(ta, tb);
}

// The derivative w.r.t. the three fractions of the trilinear interpolation of the corner values y
// (corner = 4 a + 2 b + c), with the edge weights w of the fractions: per axis the bilinear
// interpolation of the differences along the axis (sum over corners of the signed weight derivatives
// times y, as sample_props of ussim.h, summed in another order).
MEDFAST_AVX2 inline void trilinear_grad(const __m256* y, const __m256* w, __m256* g) {
  g[0] = _mm256_fmadd_ps(w[3], _mm256_sub_ps(y[7], y[3]),
                         _mm256_fmadd_ps(w[2], _mm256_sub_ps(y[6], y[2]),
                                         _mm256_fmadd_ps(w[1], _mm256_sub_ps(y[5], y[1]),
                                                         _mm256_mul_ps(w[0], _mm256_sub_ps(y[4], y[0])))));
  g[1] = _mm256_fmadd_ps(w[7], _mm256_sub_ps(y[7], y[5]),
                         _mm256_fmadd_ps(w[6], _mm256_sub_ps(y[6], y[4]),
                                         _mm256_fmadd_ps(w[5], _mm256_sub_ps(y[3], y[1]),
                                                         _mm256_mul_ps(w[4], _mm256_sub_ps(y[2], y[0])))));
  g[2] = _mm256_fmadd_ps(w[11], _mm256_sub_ps(y[7], y[6]),
                         _mm256_fmadd_ps(w[10], _mm256_sub_ps(y[5], y[4]),
                                         _mm256_fmadd_ps(w[9], _mm256_sub_ps(y[3], y[2]),
                                                         _mm256_mul_ps(w[8], _mm256_sub_ps(y[1], y[0])))));
}

// Stores the first n lanes of (x, y, z) = v[0..2] interleaved: dst[3 l + k] = v[k][l].
MEDFAST_AVX2 inline void store_xyz8(const __m256* v, int n, float* dst) {
  if (n == 8) {
    const __m256i i0 = _mm256_setr_epi32(0, 0, 0, 1, 1, 1, 2, 2), i1 = _mm256_setr_epi32(2, 3, 3, 3, 4, 4, 4, 5);
    const __m256i i2 = _mm256_setr_epi32(5, 5, 6, 6, 6, 7, 7, 7);
    const __m256 x0 = _mm256_permutevar8x32_ps(v[0], i0), y0 = _mm256_permutevar8x32_ps(v[1], i0);
    const __m256 z0 = _mm256_permutevar8x32_ps(v[2], i0);
    const __m256 x1 = _mm256_permutevar8x32_ps(v[0], i1), y1 = _mm256_permutevar8x32_ps(v[1], i1);
    const __m256 z1 = _mm256_permutevar8x32_ps(v[2], i1);
    const __m256 x2 = _mm256_permutevar8x32_ps(v[0], i2), y2 = _mm256_permutevar8x32_ps(v[1], i2);
    const __m256 z2 = _mm256_permutevar8x32_ps(v[2], i2);
    // (x y z x y z x y | z x y z x y z x | y z x y z x y z)
    _mm256_storeu_ps(dst, _mm256_blend_ps(_mm256_blend_ps(x0, y0, 0x92), z0, 0x24));
    _mm256_storeu_ps(dst + 8, _mm256_blend_ps(_mm256_blend_ps(z1, x1, 0x92), y1, 0x24));
    _mm256_storeu_ps(dst + 16, _mm256_blend_ps(_mm256_blend_ps(y2, z2, 0x92), x2, 0x24));
    return;
  }
  alignas(32) float o[3][8];
  for (int k = 0; k < 3; ++k) _mm256_store_ps(o[k], v[k]);
  for (int l = 0; l < n; ++l)
    for (int k = 0; k < 3; ++k) dst[3 * l + k] = o[k][l];
}

// The 8 corner property rows of the last voxel cell asked for: in place inside the volume, else (at
// the border) load_cell's copy with the background values (as pass 1).
struct CellCorners {
  int64_t off[8];
  CellCache<float> cell{};
  const float* cp[8] = {};
  explicit CellCorners(const Params& P) {
    cell.valid = false;
    for (int corner = 0; corner < 8; ++corner)
      off[corner] = (((corner >> 2) * P.H + ((corner >> 1) & 1)) * P.W + (corner & 1)) * kProps;
  }
  CellCorners(const CellCorners&) = delete;  // (cp may point into cell)
  const float* const* at(const float* vol, const Params& P, int64_t i0, int64_t j0, int64_t k0) {
    if (cell.valid && cell.i0 == i0 && cell.j0 == j0 && cell.k0 == k0) return cp;
    cell.i0 = i0;
    cell.j0 = j0;
    cell.k0 = k0;
    cell.valid = true;
    if (cell_inside(P, i0, j0, k0)) {
      const float* base = vol + ((i0 * P.H + j0) * P.W + k0) * kProps;
      for (int corner = 0; corner < 8; ++corner) cp[corner] = base + off[corner];
    } else {
      load_cell<float, float>(vol, P, i0, j0, k0, cell.val);
      for (int corner = 0; corner < 8; ++corner) cp[corner] = cell.val[corner];
    }
    return cp;
  }
};

// Scratch arrays of one ray, Sp = S rounded up to 8; each array has 8 readable floats before it and
// after its Sp values.
struct BackwardBuffer {
  enum { kPx, kPy, kPz, kG0, kG1, kG2, kV0, kZ, kAlpha, kSq, kMu, kSd, kN0, kN1, kN2, kN3, kR, kLt, kE, kW, kGa,
         kGb, kTq0, kTq1, kTq2, kArrays };
  int64_t Sp, stride;
  std::vector<float> data;
  std::vector<int32_t> rows;  // [block][corner][lane]: float offsets of the noise-table rows
  explicit BackwardBuffer(int64_t S)
      : Sp((S + 7) & ~int64_t(7)), stride(Sp + 16), data(kArrays * stride, 0.0f), rows(8 * Sp) {}
  float* operator[](int k) { return data.data() + k * stride + 8; }
};

// Whether the vector path takes the ray (int32 voxel and scatter-grid cells, exact float positions):
// all coordinates finite and small, and so the scatter-grid coordinates. Copies the positions into
// px, py, pz.
MEDFAST_AVX2 bool ray_in_range(const float* coords, int64_t S, const Params& P, float* px, float* py, float* pz) {
  for (int64_t i = 0; i < S; ++i) {
    px[i] = coords[3 * i];
    py[i] = coords[3 * i + 1];
    pz[i] = coords[3 * i + 2];
  }
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 m = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= 3 * S; k += 8) {
    const __m256 x = _mm256_loadu_ps(coords + k);
    m = _mm256_max_ps(m, _mm256_and_ps(x, abs_mask));
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float big = 0.0f;
  bool finite = _mm256_movemask_ps(nan) == 0;
  for (int l = 0; l < 8; ++l) big = lanes[l] > big ? lanes[l] : big;
  for (; k < 3 * S; ++k) {
    const float a = std::fabs(coords[k]);
    finite &= a == a;
    big = a > big ? a : big;
  }
  if (!finite || !(big < static_cast<float>(kMaxCoord))) return false;
  for (int r = 0; r < 3; ++r) {
    const double bound = (std::fabs(P.G[4 * r]) + std::fabs(P.G[4 * r + 1]) + std::fabs(P.G[4 * r + 2])) * big +
                         std::fabs(P.G[4 * r + 3]);
    if (!(bound < kMaxCoord)) return false;
  }
  return true;
}

template <bool kRec, bool kCoords>
MEDFAST_AVX2 void backward_ray8(const float* vol, const float* table, const Params& P, const float* grad,
                                BackwardBuffer& buf, CellRecords<float>* rec, float* gc) {
  const int64_t S = P.S, Sp = buf.Sp;
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  const __m256 zmin = _mm256_set1_ps(static_cast<float>(kMinImpedance));
  float *px = buf[BackwardBuffer::kPx], *py = buf[BackwardBuffer::kPy], *pz = buf[BackwardBuffer::kPz];
  float *g0 = buf[BackwardBuffer::kG0], *g1 = buf[BackwardBuffer::kG1], *g2 = buf[BackwardBuffer::kG2];
  float *bV0 = buf[BackwardBuffer::kV0], *bZ = buf[BackwardBuffer::kZ], *bA = buf[BackwardBuffer::kAlpha];
  float *bSq = buf[BackwardBuffer::kSq], *bMu = buf[BackwardBuffer::kMu], *bSd = buf[BackwardBuffer::kSd];
  float* bN[kNoise] = {buf[BackwardBuffer::kN0], buf[BackwardBuffer::kN1], buf[BackwardBuffer::kN2],
                       buf[BackwardBuffer::kN3]};
  float *bR = buf[BackwardBuffer::kR], *bLt = buf[BackwardBuffer::kLt], *bE = buf[BackwardBuffer::kE];
  float *bW = buf[BackwardBuffer::kW], *bGa = buf[BackwardBuffer::kGa], *bGb = buf[BackwardBuffer::kGb];

  // ---- Pass 0: output gradients (the positions are in place: ray_in_range); tail lanes: the last
  // position, zero gradient (they add nothing anywhere).
  for (int64_t i = 0; i < S; ++i) {
    g0[i] = grad[3 * i];
    g1[i] = grad[3 * i + 1];
    g2[i] = grad[3 * i + 2];
  }
  for (int64_t i = S; i < Sp; ++i) {
    px[i] = px[S - 1];
    py[i] = py[S - 1];
    pz[i] = pz[S - 1];
    g0[i] = g1[i] = g2[i] = 0.0f;
  }
  int64_t corner_off[8];
  for (int corner = 0; corner < 8; ++corner)
    corner_off[corner] = (((corner >> 2) * P.H + ((corner >> 1) & 1)) * P.W + (corner & 1)) * kProps;
  const __m256 sharp[3] = {_mm256_set1_ps(static_cast<float>(P.sharp[0])),
                           _mm256_set1_ps(static_cast<float>(P.sharp[1])),
                           _mm256_set1_ps(static_cast<float>(P.sharp[2]))};  // per voxel axis

  // ---- Pass 1: properties (the forward's pass 1 with the positions from the scratch).
  {
    CellCache<float> cell{};
    const float* cp[8] = {};
    alignas(32) int32_t ci[3][8];
    for (int64_t i0 = 0; i0 < S; i0 += 8) {
      const int nv = S - i0 < 8 ? static_cast<int>(S - i0) : 8;
      const int valid = (1 << nv) - 1;
      const __m256 p[3] = {_mm256_loadu_ps(px + i0), _mm256_loadu_ps(py + i0), _mm256_loadu_ps(pz + i0)};
      __m256 t[3], wt[8], wz[8], v[kProps] = {zero, zero, zero, zero, zero};
      __m256i cell_i[3];
      for (int k = 0; k < 3; ++k) {
        const __m256 f = _mm256_floor_ps(p[k]);
        t[k] = _mm256_sub_ps(p[k], f);
        cell_i[k] = _mm256_cvttps_epi32(f);
        _mm256_store_si256(reinterpret_cast<__m256i*>(ci[k]), cell_i[k]);
      }
      if (i0 + 64 < S) {  // prefetch the corner rows of the cell ~6 voxels ahead (as the forward)
        const int64_t ai = static_cast<int64_t>(std::floor(px[i0 + 64]));
        const int64_t aj = static_cast<int64_t>(std::floor(py[i0 + 64]));
        const int64_t ak = static_cast<int64_t>(std::floor(pz[i0 + 64]));
        if (cell_inside(P, ai, aj, ak)) {
          const char* base = reinterpret_cast<const char*>(vol + ((ai * P.H + aj) * P.W + ak) * kProps);
          for (int corner = 0; corner < 8; corner += 2) {
            _mm_prefetch(base + corner_off[corner] * sizeof(float), _MM_HINT_T0);
            _mm_prefetch(base + corner_off[corner] * sizeof(float) + 2 * kProps * sizeof(float) - 1, _MM_HINT_T0);
          }
        }
      }
      corner_weights(t[0], t[1], t[2], wt);
      corner_weights(sharpen8(t[0], sharp[0]), sharpen8(t[1], sharp[1]), sharpen8(t[2], sharp[2]), wz);
      for (int todo = valid; todo;) {
        const int l = __builtin_ctz(todo);
        const int m = same_cell(cell_i[0], cell_i[1], cell_i[2], ci[0], ci[1], ci[2], l) & todo;
        if (!cell.valid || cell.i0 != ci[0][l] || cell.j0 != ci[1][l] || cell.k0 != ci[2][l]) {
          cell.i0 = ci[0][l];
          cell.j0 = ci[1][l];
          cell.k0 = ci[2][l];
          cell.valid = true;
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
          for (int c = 0; c < kProps; ++c)
            acc[c] = _mm256_fmadd_ps(c < kSharpProps ? wz[corner] : wt[corner], _mm256_set1_ps(cp[corner][c]), acc[c]);
        }
        if (todo == valid && m == valid) {
          for (int c = 0; c < kProps; ++c) v[c] = acc[c];
        } else {
          const __m256 mk = lane_mask(m);
          for (int c = 0; c < kProps; ++c) v[c] = todo == valid ? acc[c] : _mm256_blendv_ps(v[c], acc[c], mk);
        }
        todo &= ~m;
      }
      _mm256_storeu_ps(bV0 + i0, v[0]);
      _mm256_storeu_ps(bZ + i0, _mm256_blendv_ps(v[0], zmin, _mm256_cmp_ps(v[0], zmin, _CMP_LT_OQ)));
      _mm256_storeu_ps(bA + i0, v[1]);
      _mm256_storeu_ps(bSq + i0, _mm256_sqrt_ps(_mm256_and_ps(v[2], _mm256_cmp_ps(v[2], zero, _CMP_GT_OQ))));
      _mm256_storeu_ps(bMu + i0, v[3]);
      _mm256_storeu_ps(bSd + i0, v[4]);
    }
  }

  // ---- Pass 2: scatter noise n (sample_noise of ussim.h) at the positions.
  if (P.noise_mask == 0) {
    for (int64_t i = 0; i < Sp; ++i)
      for (int c = 0; c < kNoise; ++c) bN[c][i] = table[c];
  } else {
    const __m256i seedv = _mm256_set1_epi32(static_cast<int>(seed32(P)));
    const __m256i maskv = _mm256_set1_epi32(static_cast<int>(P.noise_mask));
    const __m256i mul0 = _mm256_set1_epi32(static_cast<int>(kCellMul0));
    const __m256i mul1 = _mm256_set1_epi32(static_cast<int>(kCellMul1));
    const __m256i mul2 = _mm256_set1_epi32(static_cast<int>(kCellMul2));
    float* btq = buf[BackwardBuffer::kTq0];
    const int64_t tq_stride = buf.stride;
    int32_t* brows = buf.rows.data();
    __m256d G[12];
    for (int k = 0; k < 12; ++k) G[k] = _mm256_set1_pd(P.G[k]);
    for (int64_t i0 = 0; i0 < S; i0 += 8) {
      // q = G (p, 1) in double from the float position, as sample_noise.
      __m256d p[2][3];
      const __m256 pf[3] = {_mm256_loadu_ps(px + i0), _mm256_loadu_ps(py + i0), _mm256_loadu_ps(pz + i0)};
      for (int k = 0; k < 3; ++k) {
        p[0][k] = _mm256_cvtps_pd(_mm256_castps256_ps128(pf[k]));
        p[1][k] = _mm256_cvtps_pd(_mm256_extractf128_ps(pf[k], 1));
      }
      __m256i cq[3];
      for (int r = 0; r < 3; ++r) {
        __m256d q[2], f[2];
        for (int hh = 0; hh < 2; ++hh) {
          q[hh] = _mm256_fmadd_pd(G[4 * r + 2], p[hh][2],
                                  _mm256_fmadd_pd(G[4 * r + 1], p[hh][1], _mm256_fmadd_pd(G[4 * r], p[hh][0], G[4 * r + 3])));
          f[hh] = _mm256_floor_pd(q[hh]);
        }
        _mm256_storeu_ps(btq + r * tq_stride + i0, _mm256_set_m128(_mm256_cvtpd_ps(_mm256_sub_pd(q[1], f[1])),
                                                                   _mm256_cvtpd_ps(_mm256_sub_pd(q[0], f[0]))));
        cq[r] = _mm256_set_m128i(_mm256_cvttpd_epi32(f[1]), _mm256_cvttpd_epi32(f[0]));
      }
      const __m256i A0 = _mm256_mullo_epi32(cq[0], mul0), B0 = _mm256_mullo_epi32(cq[1], mul1);
      const __m256i C0 = _mm256_mullo_epi32(cq[2], mul2);
      const __m256i Av[2] = {A0, _mm256_add_epi32(A0, mul0)}, Bv[2] = {B0, _mm256_add_epi32(B0, mul1)};
      const __m256i Cv[2] = {_mm256_xor_si256(C0, seedv), _mm256_xor_si256(_mm256_add_epi32(C0, mul2), seedv)};
      for (int corner = 0; corner < 8; ++corner) {
        const __m256i key = _mm256_xor_si256(_mm256_xor_si256(Av[corner >> 2], Bv[(corner >> 1) & 1]), Cv[corner & 1]);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(brows + 8 * i0 + 8 * corner),
                            _mm256_slli_epi32(_mm256_and_si256(hash32x8(key), maskv), 2));  // * kNoise
      }
    }
    for (int64_t i0 = 0; i0 < S; i0 += 8) {
      __m256 n[kNoise] = {zero, zero, zero, zero}, wq[8];
      corner_weights(_mm256_loadu_ps(btq + i0), _mm256_loadu_ps(btq + tq_stride + i0),
                     _mm256_loadu_ps(btq + 2 * tq_stride + i0), wq);
      __m256 ss = zero;
      for (int corner = 0; corner < 8; ++corner) ss = _mm256_fmadd_ps(wq[corner], wq[corner], ss);
      const __m256 inv = _mm256_div_ps(one, _mm256_sqrt_ps(ss));
      for (int corner = 0; corner < 8; ++corner) {
        __m256 r[kNoise];
        table_rows8(table, brows + 8 * i0 + 8 * corner, r);
        for (int c = 0; c < kNoise; ++c) n[c] = _mm256_fmadd_ps(wq[corner], r[c], n[c]);
      }
      for (int c = 0; c < kNoise; ++c) _mm256_storeu_ps(bN[c] + i0, _mm256_mul_ps(n[c], inv));
    }
  }

  // ---- Pass 3: R and log(1 - R^2) (the forward's pass 3).
  const __m256 tmin = _mm256_set1_ps(static_cast<float>(kMinTransmission));
  for (int64_t i0 = 0; i0 < S; i0 += 8) {
    const __m256 Z = _mm256_loadu_ps(bZ + i0), Zp = _mm256_loadu_ps(bZ + i0 - 1);
    __m256 R = _mm256_div_ps(_mm256_sub_ps(Z, Zp), _mm256_add_ps(Z, Zp));
    if (i0 == 0) R = _mm256_blend_ps(R, zero, 1);  // R_0 = 0
    _mm256_storeu_ps(bR + i0, R);
    _mm256_storeu_ps(bLt + i0, log8(_mm256_max_ps(_mm256_fnmadd_ps(R, R, one), tmin)));
  }
  run_log_transmissions(bZ, S, bLt);

  // ---- Pass 4: log T_i = sum_{j < i} (log(1 - R_j^2) - att alpha_j) in double (the forward's pass 4),
  // E = exp(log T), h E with h = g0 R + g1 c0 + g2 c1 (c the scatter echo sqrt(rho) (mu N + sigma M); in place
  // of log(1 - R^2)), total of h E.
  const __m256d zd = _mm256_setzero_pd();
  __m256d tot_lo = zd, tot_hi = zd;
  {
    const __m256d att = _mm256_set1_pd(P.att);
    __m256d logT = zd;
    for (int64_t i0 = 0; i0 < S; i0 += 8) {
      const __m256 alpha = _mm256_loadu_ps(bA + i0), lt = _mm256_loadu_ps(bLt + i0);
      const __m256d ulo = _mm256_fnmadd_pd(att, _mm256_cvtps_pd(_mm256_castps256_ps128(alpha)),
                                           _mm256_cvtps_pd(_mm256_castps256_ps128(lt)));
      const __m256d uhi = _mm256_fnmadd_pd(att, _mm256_cvtps_pd(_mm256_extractf128_ps(alpha, 1)),
                                           _mm256_cvtps_pd(_mm256_extractf128_ps(lt, 1)));
      const __m256d xlo = _mm256_blend_pd(_mm256_permute4x64_pd(ulo, 0x90), zd, 1);
      const __m256d xhi = _mm256_blend_pd(_mm256_permute4x64_pd(uhi, 0x90), _mm256_permute4x64_pd(ulo, 0xFF), 1);
      const __m256d slo = scan4(xlo), shi = scan4(xhi);
      const __m256d Tlo = _mm256_add_pd(logT, slo);
      const __m256d Thi = _mm256_add_pd(_mm256_add_pd(logT, _mm256_permute4x64_pd(slo, 0xFF)), shi);
      logT = _mm256_permute4x64_pd(_mm256_add_pd(Thi, uhi), 0xFF);
      const __m256 E = exp8(_mm256_set_m128(_mm256_cvtpd_ps(Thi), _mm256_cvtpd_ps(Tlo)));
      _mm256_storeu_ps(bE + i0, E);
      const __m256 n[kNoise] = {_mm256_loadu_ps(bN[0] + i0), _mm256_loadu_ps(bN[1] + i0), _mm256_loadu_ps(bN[2] + i0),
                                _mm256_loadu_ps(bN[3] + i0)};
      __m256 c0, c1;
      scatter_echo8(_mm256_loadu_ps(bSq + i0), _mm256_loadu_ps(bMu + i0), _mm256_loadu_ps(bSd + i0), n, &c0, &c1);
      const __m256 sc = _mm256_fmadd_ps(_mm256_loadu_ps(g1 + i0), c0, _mm256_mul_ps(_mm256_loadu_ps(g2 + i0), c1));
      const __m256 h = _mm256_fmadd_ps(_mm256_loadu_ps(g0 + i0), _mm256_loadu_ps(bR + i0), sc);
      const __m256 hE = _mm256_mul_ps(h, E);
      _mm256_storeu_ps(bLt + i0, hE);
      tot_lo = _mm256_add_pd(tot_lo, _mm256_cvtps_pd(_mm256_castps256_ps128(hE)));
      tot_hi = _mm256_add_pd(tot_hi, _mm256_cvtps_pd(_mm256_extractf128_ps(hE, 1)));
    }
  }

  // ---- Pass 5: W_i = sum_{k > i} h_k E_k = total - (inclusive prefix), dL/dR_i, and the impedance terms
  // a_i = dL/dR_i dR_i/dZ_i, b_i = -dL/dR_i dR_i/dZ_{i-1} (0 at i = 0: R_0 = 0 is a constant; 0 past the end).
  {
    __m256d tt = _mm256_add_pd(tot_lo, tot_hi);
    tt = _mm256_add_pd(tt, _mm256_permute4x64_pd(tt, 0x4E));
    tt = _mm256_add_pd(tt, _mm256_permute4x64_pd(tt, 0xB1));  // the total in every lane
    __m256d pre = zd;
    const __m256 two = _mm256_set1_ps(2.0f);
    for (int64_t i0 = 0; i0 < S; i0 += 8) {
      const int nv = S - i0 < 8 ? static_cast<int>(S - i0) : 8;
      const __m256 hE = _mm256_loadu_ps(bLt + i0);
      const __m256d slo = scan4(_mm256_cvtps_pd(_mm256_castps256_ps128(hE)));
      const __m256d shi = scan4(_mm256_cvtps_pd(_mm256_extractf128_ps(hE, 1)));
      const __m256d Plo = _mm256_add_pd(pre, slo);
      const __m256d Phi = _mm256_add_pd(_mm256_add_pd(pre, _mm256_permute4x64_pd(slo, 0xFF)), shi);
      pre = _mm256_permute4x64_pd(Phi, 0xFF);
      const __m256 W = _mm256_set_m128(_mm256_cvtpd_ps(_mm256_sub_pd(tt, Phi)), _mm256_cvtpd_ps(_mm256_sub_pd(tt, Plo)));
      _mm256_storeu_ps(bW + i0, W);
      const __m256 R = _mm256_loadu_ps(bR + i0), E = _mm256_loadu_ps(bE + i0);
      const __m256 one_m = _mm256_fnmadd_ps(R, R, one);
      const __m256 loss = _mm256_div_ps(_mm256_mul_ps(_mm256_mul_ps(W, two), R), one_m);
      const __m256 gR = _mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(g0 + i0), E),
                                      _mm256_and_ps(loss, _mm256_cmp_ps(one_m, tmin, _CMP_GT_OQ)));
      const __m256 Z = _mm256_loadu_ps(bZ + i0), Zp = _mm256_loadu_ps(bZ + i0 - 1);
      const __m256 den = _mm256_add_ps(Z, Zp);
      const __m256 k = _mm256_div_ps(_mm256_mul_ps(two, gR), _mm256_mul_ps(den, den));
      __m256 a = _mm256_mul_ps(k, Zp), b = _mm256_mul_ps(k, Z);
      const __m256 keep = lane_mask(((1 << nv) - 1) & (i0 == 0 ? ~1 : ~0));
      a = _mm256_and_ps(a, keep);
      b = _mm256_and_ps(b, keep);
      _mm256_storeu_ps(bGa + i0, a);
      _mm256_storeu_ps(bGb + i0, b);
    }
    bGb[Sp] = 0.0f;  // (b_{i+1} of the last block's last lane)
  }

  // ---- Pass 5b: the later steps of monotone runs (run_log_transmissions): their a_i, b_i with the run's
  // transmission terms, and the run start's term into its a (gv_0 of sample r = a_r - b_{r+1}).
  for_each_later_step(bZ, S, [&](int64_t i, int64_t r) {
    const float zp = bZ[i - 1], z = bZ[i];
    const Run<float> run{bZ[r], 0, r, false};
    float gz, gzp, gs;
    run_transmission_grads<float>(run, zp, z, bW[i], &gz, &gzp, &gs);
    const float den = z + zp, k = 2.0f * g0[i] * bE[i] / (den * den);  // the echo R_i's
    bGa[i] = k * zp + gz;
    bGb[i] = k * z - gzp;
    bGa[r] += gs;
  });

  // ---- Pass 6: per-sample property gradients gv; into the cell records (kRec) and/or the position
  // gradient (kCoords): gc_i = sum_c gv_c dv_c/dp (the trilinear derivative of the sampled properties,
  // per distinct voxel cell of the block as in pass 1) + sum_c dL/dn_c dn_c/dp (the scatter field's,
  // from the corner rows of pass 2), both as march_ray_backward.
  {
    const __m256 att = _mm256_set1_ps(static_cast<float>(P.att)), half = _mm256_set1_ps(0.5f);
    alignas(32) int32_t ci[3][8];
    [[maybe_unused]] __m256 acc[kProps];  // [c]: the 8 corners
    [[maybe_unused]] bool open = false;
    [[maybe_unused]] int32_t cur[3] = {0, 0, 0};
    [[maybe_unused]] CellCorners corners(P);
    const bool speckle = P.noise_mask != 0;
    const float* btq = buf[BackwardBuffer::kTq0];
    const int64_t tq_stride = buf.stride;
    const int32_t* brows = buf.rows.data();
    __m256 Gf[9];  // G[r][j], j < 3: d q_r / d p_j
    for (int r = 0; r < 3; ++r)
      for (int j = 0; j < 3; ++j) Gf[3 * r + j] = _mm256_set1_ps(static_cast<float>(P.G[4 * r + j]));
    for (int64_t i0 = 0; i0 < S; i0 += 8) {
      const int nv = S - i0 < 8 ? static_cast<int>(S - i0) : 8;
      const int valid = (1 << nv) - 1;
      // scatter_grads of ussim.h: m = mu N + sigma M, e = E g, q = e sqrt(rho) = dL/dm
      const __m256 E = _mm256_loadu_ps(bE + i0), sq = _mm256_loadu_ps(bSq + i0);
      const __m256 mu = _mm256_loadu_ps(bMu + i0), sd = _mm256_loadu_ps(bSd + i0);
      const __m256 n[kNoise] = {_mm256_loadu_ps(bN[0] + i0), _mm256_loadu_ps(bN[1] + i0), _mm256_loadu_ps(bN[2] + i0),
                                _mm256_loadu_ps(bN[3] + i0)};
      const __m256 m0 = _mm256_fmadd_ps(sd, n[2], _mm256_mul_ps(mu, n[0]));
      const __m256 m1 = _mm256_fmadd_ps(sd, n[3], _mm256_mul_ps(mu, n[1]));
      const __m256 e1 = _mm256_mul_ps(E, _mm256_loadu_ps(g1 + i0)), e2 = _mm256_mul_ps(E, _mm256_loadu_ps(g2 + i0));
      const __m256 q1 = _mm256_mul_ps(e1, sq), q2 = _mm256_mul_ps(e2, sq);
      __m256 gv[kProps];
      gv[0] = _mm256_andnot_ps(_mm256_cmp_ps(_mm256_loadu_ps(bV0 + i0), zmin, _CMP_LT_OQ),
                               _mm256_sub_ps(_mm256_loadu_ps(bGa + i0), _mm256_loadu_ps(bGb + i0 + 1)));
      gv[1] = _mm256_mul_ps(_mm256_sub_ps(zero, _mm256_loadu_ps(bW + i0)), att);
      gv[2] = _mm256_and_ps(_mm256_div_ps(_mm256_mul_ps(_mm256_fmadd_ps(e1, m0, _mm256_mul_ps(e2, m1)), half), sq),
                            _mm256_cmp_ps(sq, zero, _CMP_GT_OQ));
      gv[3] = _mm256_fmadd_ps(q1, n[0], _mm256_mul_ps(q2, n[1]));
      gv[4] = _mm256_fmadd_ps(q1, n[2], _mm256_mul_ps(q2, n[3]));
      const __m256 p[3] = {_mm256_loadu_ps(px + i0), _mm256_loadu_ps(py + i0), _mm256_loadu_ps(pz + i0)};
      __m256 t[3];
      __m256i cell_i[3];
      for (int k = 0; k < 3; ++k) {
        const __m256 f = _mm256_floor_ps(p[k]);
        t[k] = _mm256_sub_ps(p[k], f);
        cell_i[k] = _mm256_cvttps_epi32(f);
        _mm256_store_si256(reinterpret_cast<__m256i*>(ci[k]), cell_i[k]);
      }
      // Records: the corner weights per lane (8 corners in a vector): the lane's contributions to a
      // record are then 5 FMAs into the record's 5 accumulators (kept in registers: one vector of the 8
      // corners per property), added in sample order.
      [[maybe_unused]] __m256 wtT[8], wzT[8];
      [[maybe_unused]] alignas(32) float gs[kProps][8];
      if constexpr (kRec) {
        __m256 wt[8], wz[8];
        corner_weights(t[0], t[1], t[2], wt);
        corner_weights(sharpen8(t[0], sharp[0]), sharpen8(t[1], sharp[1]), sharpen8(t[2], sharp[2]), wz);
        transpose8x8(wt, wtT);
        transpose8x8(wz, wzT);
        for (int c = 0; c < kProps; ++c) _mm256_store_ps(gs[c], gv[c]);
      }
      // Position gradient: the edge weights of the trilinear (ew) and sharpened (ez) interpolation and
      // the slopes of the sharpened fractions (mz: sharp inside the ramp, else 0; sharpen of ussim.h).
      [[maybe_unused]] __m256 ew[12], ez[12], mz[3], gp[3] = {zero, zero, zero};
      if constexpr (kCoords) {
        __m256 z[3];
        for (int k = 0; k < 3; ++k) {
          const __m256 u = _mm256_fmadd_ps(_mm256_sub_ps(t[k], half), sharp[k], half);
          const __m256 inside = _mm256_and_ps(_mm256_cmp_ps(u, zero, _CMP_GT_OQ), _mm256_cmp_ps(u, one, _CMP_LT_OQ));
          mz[k] = _mm256_and_ps(inside, sharp[k]);
          z[k] = _mm256_min_ps(_mm256_max_ps(u, zero), one);
        }
        edge_weights(t[0], t[1], t[2], ew);
        edge_weights(z[0], z[1], z[2], ez);
      }
      for (int todo = valid; todo;) {
        const int l = __builtin_ctz(todo);
        const int group = same_cell(cell_i[0], cell_i[1], cell_i[2], ci[0], ci[1], ci[2], l) & todo;
        todo &= ~group;
        if (!cell_touches_volume(P, ci[0][l], ci[1][l], ci[2][l])) continue;  // background: constant
        if constexpr (kRec) {
          if (!open || cur[0] != ci[0][l] || cur[1] != ci[1][l] || cur[2] != ci[2][l]) {
            if (open) flush_record(*rec, cur, acc);
            open = true;
            cur[0] = ci[0][l];
            cur[1] = ci[1][l];
            cur[2] = ci[2][l];
            for (int c = 0; c < kProps; ++c) acc[c] = zero;
          }
          for (int mk = group; mk; mk &= mk - 1) {
            const int lane = __builtin_ctz(mk);
            for (int c = 0; c < kProps; ++c)
              acc[c] = _mm256_fmadd_ps(c < kSharpProps ? wzT[lane] : wtT[lane], _mm256_broadcast_ss(&gs[c][lane]), acc[c]);
          }
        }
        if constexpr (kCoords) {
          // sum_c gv_c dv_c/dp for the lanes of this cell: the derivative of the trilinear interpolation
          // of the per-lane corner values y = sum_{c >= kSharpProps} gv_c x_c, plus that of the sharpened
          // interpolation of x0 = sum_{c < kSharpProps} gv_c x_c (impedance, attenuation).
          static_assert(kSharpProps == 2, "x0 below sums the sharpened channels 0 and 1");
          const float* const* cp = corners.at(vol, P, ci[0][l], ci[1][l], ci[2][l]);
          __m256 y[8], x0[8];
          for (int corner = 0; corner < 8; ++corner) {
            const float* x = cp[corner];
            x0[corner] = _mm256_fmadd_ps(gv[1], _mm256_broadcast_ss(x + 1), _mm256_mul_ps(gv[0], _mm256_broadcast_ss(x)));
            __m256 yc = _mm256_mul_ps(gv[2], _mm256_broadcast_ss(x + 2));
            for (int c = 3; c < kProps; ++c) yc = _mm256_fmadd_ps(gv[c], _mm256_broadcast_ss(x + c), yc);
            y[corner] = yc;
          }
          __m256 dy[3], dz[3];
          trilinear_grad(y, ew, dy);
          trilinear_grad(x0, ez, dz);
          const __m256 in_group = lane_mask(group);
          for (int j = 0; j < 3; ++j) gp[j] = _mm256_blendv_ps(gp[j], _mm256_fmadd_ps(mz[j], dz[j], dy[j]), in_group);
        }
      }
      if constexpr (kCoords) {
        if (speckle) {
          // sum_c dL/dn_c dn_c/dp, dL/dn = (q1 mu, q2 mu, q1 sigma, q2 sigma) (scatter_grads of ussim.h).
          // With N the trilinear sums of the corner rows and s2 the sum of the squared weights
          // (n = N / sqrt(s2), sample_noise): d/dq_r of sum_c gn_c n_c = inv dY/dq_r - inv^2 / 2 ds2/dq_r
          // (gn . n), Y = sum_c gn_c N_c, inv = 1 / sqrt(s2); then d/dp_j = sum_r d/dq_r G[r][j].
          const __m256 gn[kNoise] = {_mm256_mul_ps(q1, mu), _mm256_mul_ps(q2, mu), _mm256_mul_ps(q1, sd),
                                     _mm256_mul_ps(q2, sd)};
          __m256 tq[3], uq[3], sr[3];
          for (int r = 0; r < 3; ++r) {
            tq[r] = _mm256_loadu_ps(btq + r * tq_stride + i0);
            uq[r] = _mm256_sub_ps(one, tq[r]);
            sr[r] = _mm256_fmadd_ps(tq[r], tq[r], _mm256_mul_ps(uq[r], uq[r]));  // sum of the squared weights of axis r
          }
          __m256 y[8];
          for (int corner = 0; corner < 8; ++corner) {
            __m256 r[kNoise];
            table_rows8(table, brows + 8 * i0 + 8 * corner, r);
            y[corner] = _mm256_fmadd_ps(
                gn[3], r[3], _mm256_fmadd_ps(gn[2], r[2], _mm256_fmadd_ps(gn[1], r[1], _mm256_mul_ps(gn[0], r[0]))));
          }
          __m256 nw[12], dY[3];
          edge_weights(tq[0], tq[1], tq[2], nw);
          trilinear_grad(y, nw, dY);
          const __m256 inv = _mm256_div_ps(one, _mm256_sqrt_ps(_mm256_mul_ps(_mm256_mul_ps(sr[0], sr[1]), sr[2])));
          const __m256 gnn = _mm256_fmadd_ps(
              gn[3], n[3], _mm256_fmadd_ps(gn[2], n[2], _mm256_fmadd_ps(gn[1], n[1], _mm256_mul_ps(gn[0], n[0]))));
          const __m256 k = _mm256_mul_ps(_mm256_mul_ps(half, _mm256_mul_ps(inv, inv)), gnn);
          const __m256 two = _mm256_set1_ps(2.0f);
          const __m256 ds2[3] = {
              _mm256_mul_ps(_mm256_mul_ps(two, _mm256_sub_ps(tq[0], uq[0])), _mm256_mul_ps(sr[1], sr[2])),
              _mm256_mul_ps(_mm256_mul_ps(two, _mm256_sub_ps(tq[1], uq[1])), _mm256_mul_ps(sr[0], sr[2])),
              _mm256_mul_ps(_mm256_mul_ps(two, _mm256_sub_ps(tq[2], uq[2])), _mm256_mul_ps(sr[0], sr[1]))};
          for (int r = 0; r < 3; ++r) {
            const __m256 gq = _mm256_fmsub_ps(inv, dY[r], _mm256_mul_ps(k, ds2[r]));
            for (int j = 0; j < 3; ++j) gp[j] = _mm256_fmadd_ps(gq, Gf[3 * r + j], gp[j]);
          }
        }
        store_xyz8(gp, nv, gc + 3 * i0);
      }
    }
    if constexpr (kRec)
      if (open) flush_record(*rec, cur, acc);
  }
}

}  // namespace

// (Table offsets row * kNoise in int32 for the gathers.)
bool march_lines_avx2_applies(const Params& P) {
  return cpu_simd_available() && P.S > 0 && P.noise_mask < (int64_t(1) << 29);
}

// Lines [begin, end) of march_lines_cpu for float32; wT (E, 3, S) the channel-major weights.
void march_lines_avx2(const float* vol, int64_t vol_stride, int64_t Bv, const float* table, const Params& P,
                      const float* st, const float* sp, const float* w, const float* wT, int64_t L, int64_t E,
                      float* o, int64_t begin, int64_t end) {
  const int64_t S = P.S;
  SubrayBuffer buf(S);
  for (int64_t line = begin; line < end; ++line) {
    const int64_t b = line / L;
    const float* v = vol + frame_volume(P, b) * vol_stride;
    const float* start = st + line * E * 3;
    const float* step = sp + line * 3;
    float* out = o + line * 3 * S;
    if (!line_in_range(start, step, E, P)) {
      march_line<float, float, true>(v, table, P, start, step, w, E, out, S);
      continue;
    }
    for (int64_t e = 0; e < E; ++e) march_subray8(v, table, P, start + 3 * e, step, wT + e * 3 * S, e == 0, out, buf);
  }
}

// psf_axial_row (ussim.h, forward) of one float32 row: away from the row ends each vector of 8 outputs
// sums its K taps in a register (the same taps in the same order, with FMA: equal to the header loop
// up to float rounding; one load per tap and no store per tap, where the header loop loads and stores
// the output row once per tap); the row ends and short rows by the header loop.
MEDFAST_AVX2 void psf_axial_row_avx2(const float* x, const float* h, int64_t K, int64_t S, float* out) {
  const int64_t half = K / 2;
  const int64_t lo = half, hi = S - (K - 1 - half);  // outputs whose taps all lie in [0, S)
  if (hi - lo < 8 || K > 64) {
    psf_axial_row<float, float>(x, h, K, S, 0, S, out, false);
    return;
  }
  psf_axial_row<float, float>(x, h, K, S, 0, lo, out, false);
  __m256 hk[64];
  for (int64_t k = 0; k < K; ++k) hk[k] = _mm256_set1_ps(h[k]);
  int64_t s = lo;
  for (; s + 8 <= hi; s += 8) {
    const float* xs = x + s - half;
    __m256 acc = _mm256_mul_ps(hk[0], _mm256_loadu_ps(xs));  // (0 + h0 x: the same as the header's first tap)
    for (int64_t k = 1; k < K; ++k) acc = _mm256_fmadd_ps(hk[k], _mm256_loadu_ps(xs + k), acc);
    _mm256_storeu_ps(out + s, acc);
  }
  psf_axial_row<float, float>(x, h, K, S, s, S, out, false);
}


bool march_backward_avx2_applies(const Params& P) {
  return cpu_simd_available() && P.S > 0 && P.noise_mask < (int64_t(1) << 29);
}

void march_backward_avx2(const float* vol, const float* table, const Params& P, int64_t begin, int64_t end,
                         const RaySamples& samples, CellRecords<float>* rec, float* gc) {
  const int64_t S = P.S;
  BackwardBuffer buf(S);
  std::vector<float> gv;
  for (int64_t ray = begin; ray < end; ++ray) {
    const float *c = nullptr, *g = nullptr;
    samples(ray, &c, &g);
    float* gcr = gc ? gc + ray * S * 3 : nullptr;
    if (ray_in_range(c, S, P, buf[BackwardBuffer::kPx], buf[BackwardBuffer::kPy], buf[BackwardBuffer::kPz])) {
      if (rec && gcr)
        backward_ray8<true, true>(vol, table, P, g, buf, rec, gcr);
      else if (rec)
        backward_ray8<true, false>(vol, table, P, g, buf, rec, nullptr);
      else if (gcr)
        backward_ray8<false, true>(vol, table, P, g, buf, nullptr, gcr);
    } else {
      if (rec) gv.resize(S * kProps);
      march_ray_backward<float, float, true>(vol, table, P, c, g, rec ? gv.data() : nullptr, gcr);
      if (rec) append_cell_records<float, float>(P, c, gv.data(), *rec);
    }
  }
}

}  // namespace medfast::ussim

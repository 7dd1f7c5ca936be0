// CPU launcher of the ultrasound ray march: at::parallel_for over all rays of the batch, the
// arithmetic from ussim.h. The backward compacts each ray's property gradient into cell records (one
// per run of samples in a voxel cell, CellRecords in ussim_launch.h), then adds them into the volume in
// a second, deterministic pass (parallel over slabs of the volume, records in ray order). The float32
// backward (property and / or position gradient) runs the AVX2 passes of ussim_cpu_avx2.cpp.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <functional>
#include <type_traits>

#include "common/cpu_alloc.h"
#include "common/cpu_simd.h"
#include "ussim/ussim_launch.h"

namespace medfast::ussim {
namespace {

// The line-march loop and the generic backward, compiled twice: for the baseline x86-64 and for AVX2 + FMA (the header
// arithmetic is inlined into it, so hardware floor/round, FMA contraction), picked at run time.
template <typename T, typename A>
void lines_loop(const T* vol, int64_t vol_stride, int64_t Bv, const float* table, const Params& P, const T* st,
                const T* sp, const T* w, int64_t L, int64_t E, T* o, int64_t begin, int64_t end) {
  for (int64_t line = begin; line < end; ++line) {
    const int64_t b = line / L;
    march_line<T, A, true>(vol + frame_volume(P, b) * vol_stride, table, P, st + line * E * 3, sp + line * 3, w, E,
                           o + line * 3 * P.S, P.S);
  }
}

// Rays [r0, r1) of the generic backward: the ray's samples (samples(ray, &coords, &grad)),
// march_ray_backward (its per-sample property gradients into the scratch gv (S, K)), then the ray's cell
// records (append_cell_records).
#define MEDFAST_USSIM_BACKWARD_BODY                                                                        \
  for (int64_t ray = r0; ray < r1; ++ray) {                                                               \
    const T *c = nullptr, *g = nullptr;                                                                   \
    samples(ray, &c, &g);                                                                                 \
    march_ray_backward<T, A, true>(vol, table, P, c, g, rec ? gv : nullptr, gc ? gc + ray * P.S * 3 : nullptr); \
    if (rec) append_cell_records<T, A>(P, c, gv, *rec);                                                   \
  }

template <typename T, typename A, typename Samples>
void backward_rays(const T* vol, const float* table, const Params& P, Samples& samples, T* gv, T* gc,
                   CellRecords<A>* rec, int64_t r0, int64_t r1) {
  MEDFAST_USSIM_BACKWARD_BODY
}

#if defined(__x86_64__) && defined(__GNUC__)
#define MEDFAST_USSIM_AVX2 1
template <typename T, typename A>
__attribute__((target("avx2,fma"))) void lines_loop_avx2(const T* vol, int64_t vol_stride, int64_t Bv,
                                                         const float* table, const Params& P, const T* st,
                                                         const T* sp, const T* w, int64_t L, int64_t E, T* o,
                                                         int64_t begin, int64_t end) {
  for (int64_t line = begin; line < end; ++line) {
    const int64_t b = line / L;
    march_line<T, A, true>(vol + frame_volume(P, b) * vol_stride, table, P, st + line * E * 3, sp + line * 3, w, E,
                           o + line * 3 * P.S, P.S);
  }
}

template <typename T, typename A, typename Samples>
__attribute__((target("avx2,fma"))) void backward_rays_avx2(const T* vol, const float* table, const Params& P,
                                                            Samples& samples, T* gv, T* gc, CellRecords<A>* rec,
                                                            int64_t r0, int64_t r1) {
  MEDFAST_USSIM_BACKWARD_BODY
}

bool has_avx2() { return cpu_simd_available(); }
#endif
#undef MEDFAST_USSIM_BACKWARD_BODY

// The PSF's forward rows [begin, end), axial (one (b, l, channel) row each) then lateral (one (b, l)
// each), compiled for the baseline and for AVX2 + FMA like lines_loop (the header rows vectorise 8
// wide there). They are functions called from the parallel_for lambdas, not the lambdas' bodies: a
// lambda is baseline code even inside an AVX2 function, so a row's rounding (FMA or not) depended on
// whether parallel_for ran it inline or on a pool thread, i.e. on the thread count and batch size.
#define MEDFAST_USSIM_PSF_LATERAL_ROWS                                                                     \
  for (int64_t bl = begin; bl < end; ++bl) {                                                              \
    const int64_t b = bl / L, l = bl % L;                                                                 \
    const T* y = t + b * L * 3 * S;                                                                       \
    T* re = o + (b * 2 * L + l) * S;                                                                      \
    T* im = o + ((b * 2 + 1) * L + l) * S;                                                                \
    psf_lateral_row<T, A>(y, 3 * S, wp, J, L, S, l, 0, S, re, false, false);                              \
    psf_lateral_row<T, A>(y + S, 3 * S, wp + J * S, J, L, S, l, 0, S, re, false, true);                   \
    psf_lateral_row<T, A>(y + 2 * S, 3 * S, wp + 2 * J * S, J, L, S, l, 0, S, im, false, false);          \
  }

template <typename T, typename A>
void psf_axial_rows(const T* xp, const T* hp, T* t, int64_t S, int64_t K, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) psf_axial_row<T, A>(xp + r * S, hp + (r % 3) * K, K, S, 0, S, t + r * S, false);
}

template <typename T, typename A>
void psf_lateral_rows(const T* t, const T* wp, T* o, int64_t L, int64_t S, int64_t J, int64_t begin, int64_t end) {
  MEDFAST_USSIM_PSF_LATERAL_ROWS
}

#ifdef MEDFAST_USSIM_AVX2
template <typename T, typename A>
__attribute__((target("avx2,fma"))) void psf_axial_rows_avx2(const T* xp, const T* hp, T* t, int64_t S, int64_t K,
                                                             int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    // float32: the register-blocked AVX2 row of ussim_cpu_avx2.cpp (same taps, same order)
    if constexpr (std::is_same_v<T, float>)
      psf_axial_row_avx2(xp + r * S, hp + (r % 3) * K, K, S, t + r * S);
    else
      psf_axial_row<T, A>(xp + r * S, hp + (r % 3) * K, K, S, 0, S, t + r * S, false);
  }
}

template <typename T, typename A>
__attribute__((target("avx2,fma"))) void psf_lateral_rows_avx2(const T* t, const T* wp, T* o, int64_t L, int64_t S,
                                                               int64_t J, int64_t begin, int64_t end) {
  MEDFAST_USSIM_PSF_LATERAL_ROWS
}
#endif
#undef MEDFAST_USSIM_PSF_LATERAL_ROWS

}  // namespace

Tensor march_cpu(const Tensor& props, const Tensor& coords, const Tensor& noise, const Params& P) {
  const int64_t B = coords.size(0), R = coords.size(1), S = coords.size(2);
  Tensor out = at::empty({B, R, S, 3}, coords.options());
  const int64_t vol_stride = P.D * P.H * P.W * kProps;
  AT_DISPATCH_FLOATING_TYPES(coords.scalar_type(), "medfast_ussim_march_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* vol = props.const_data_ptr<scalar_t>();
    const scalar_t* c = coords.const_data_ptr<scalar_t>();
    const float* table = noise.const_data_ptr<float>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * R, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ray = begin; ray < end; ++ray) {
        const int64_t b = ray / R;
        march_ray<scalar_t, A>(vol + frame_volume(P, b) * vol_stride, table, P, c + ray * S * 3, o + ray * S * 3);
      }
    });
  });
  return out;
}

Tensor march_lines_cpu(const Tensor& props, const Tensor& start, const Tensor& step, const Tensor& weights,
                       const Tensor& noise, const Params& P) {
  const int64_t B = start.size(0), L = start.size(1), E = start.size(2), S = P.S, Bv = props.size(0);
  Tensor out = at::empty({B, L, 3, S}, start.options());
  const int64_t vol_stride = P.D * P.H * P.W * kProps;
  if (start.scalar_type() == at::kFloat && march_lines_avx2_applies(P)) {
    const Tensor wT = weights.permute({0, 2, 1}).contiguous();  // (E, 3, S): contiguous vector loads
    const float* vol = props.const_data_ptr<float>();
    const float* st = start.const_data_ptr<float>();
    const float* sp = step.const_data_ptr<float>();
    const float* w = weights.const_data_ptr<float>();
    const float* wt = wT.const_data_ptr<float>();
    const float* table = noise.const_data_ptr<float>();
    float* o = out.mutable_data_ptr<float>();
    at::parallel_for(0, B * L, 1, [&](int64_t begin, int64_t end) {
      march_lines_avx2(vol, vol_stride, Bv, table, P, st, sp, w, wt, L, E, o, begin, end);
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(start.scalar_type(), "medfast_ussim_march_lines_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* vol = props.const_data_ptr<scalar_t>();
    const scalar_t* st = start.const_data_ptr<scalar_t>();
    const scalar_t* sp = step.const_data_ptr<scalar_t>();
    const scalar_t* w = weights.const_data_ptr<scalar_t>();
    const float* table = noise.const_data_ptr<float>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * L, 1, [&](int64_t begin, int64_t end) {
#ifdef MEDFAST_USSIM_AVX2
      if (has_avx2()) {
        lines_loop_avx2<scalar_t, A>(vol, vol_stride, Bv, table, P, st, sp, w, L, E, o, begin, end);
        return;
      }
#endif
      lines_loop<scalar_t, A>(vol, vol_stride, Bv, table, P, st, sp, w, L, E, o, begin, end);
    });
  });
  return out;
}

Tensor psf_cpu(const Tensor& x, const Tensor& h, const Tensor& w, bool transpose) {
  const int64_t B = x.size(0), S = x.size(3), L = transpose ? x.size(2) : x.size(1);
  const int64_t K = h.size(1), J = w.size(1);
  Tensor tmp = at::empty({B, L, 3, S}, x.options());
  Tensor out = transpose ? at::empty({B, L, 3, S}, x.options()) : at::empty({B, 2, L, S}, x.options());
  if (out.numel() == 0) return out;  // nothing to compute (and with S = 0 the grain 4096 / S divided by zero)
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "medfast_ussim_psf_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* t = tmp.mutable_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 4096 / S);
    if (!transpose) {
      bool avx2 = false;
#ifdef MEDFAST_USSIM_AVX2
      avx2 = has_avx2();
#endif
      (void)avx2;  // baseline-only builds
      at::parallel_for(0, B * L * 3, grain, [&](int64_t begin, int64_t end) {
#ifdef MEDFAST_USSIM_AVX2
        if (avx2) return psf_axial_rows_avx2<scalar_t, A>(xp, hp, t, S, K, begin, end);
#endif
        psf_axial_rows<scalar_t, A>(xp, hp, t, S, K, begin, end);
      });
      at::parallel_for(0, B * L, grain, [&](int64_t begin, int64_t end) {
#ifdef MEDFAST_USSIM_AVX2
        if (avx2) return psf_lateral_rows_avx2<scalar_t, A>(t, wp, o, L, S, J, begin, end);
#endif
        psf_lateral_rows<scalar_t, A>(t, wp, o, L, S, J, begin, end);
      });
    } else {
      at::parallel_for(0, B * L * 3, grain, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t c = r % 3, l = (r / 3) % L, b = r / (3 * L);
          const scalar_t* g = xp + (b * 2 + (c < 2 ? 0 : 1)) * L * S;
          psf_lateral_row<scalar_t, A>(g, S, wp + c * J * S, J, L, S, l, 0, S, t + r * S, true, false);
        }
      });
      at::parallel_for(0, B * L * 3, grain, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r)
          psf_axial_row<scalar_t, A>(t + r * S, hp + (r % 3) * K, K, S, 0, S, o + r * S, true);
      });
    }
  });
  return out;
}

namespace {

// Adds one cell record (CellRecords) into the gradient volume gvol, only the corners inside the volume and
// in the slab [i_lo, i_hi) of its first axis.
template <typename A, typename G>
void add_record(G* gvol, const Params& P, const int32_t* cell, const A* acc, int64_t i_lo, int64_t i_hi) {
  const int64_t i0 = cell[0], j0 = cell[1], k0 = cell[2];
  const bool all_in = cell_inside(P, i0, j0, k0) && i0 >= i_lo && i0 + 1 < i_hi;
  for (int corner = 0; corner < 8; ++corner) {
    const int64_t i = i0 + (corner >> 2), j = j0 + ((corner >> 1) & 1), k = k0 + (corner & 1);
    if (!all_in && (i < 0 || j < 0 || k < 0 || i >= P.D || j >= P.H || k >= P.W || i < i_lo || i >= i_hi)) continue;
    G* dst = gvol + ((i * P.H + j) * P.W + k) * kProps;
    for (int ch = 0; ch < kProps; ++ch) dst[ch] += static_cast<G>(acc[8 * ch + corner]);
  }
}

// The backward of B x R rays of S samples: gcoords (B R, S, 3) into gc (if not null), the property
// gradient into gprops (zeroed, if props_grad). make_samples() gives each task its sample provider
// samples(ray, &coords, &grad) (RaySamples; one per task: it may own scratch).
template <typename scalar_t, typename MakeSamples>
void backward_core(const Tensor& props, const Tensor& noise, const Params& P, int64_t B, int64_t R, bool props_grad,
                   scalar_t* gc, Tensor& gprops, const MakeSamples& make_samples) {
  using A = acc_t<scalar_t>;
  const int64_t S = P.S;
  const int64_t vol_stride = P.D * P.H * P.W * kProps;
  const scalar_t* vol = props.const_data_ptr<scalar_t>();
  const float* table = noise.const_data_ptr<float>();
  // 1. Per ray: the backward march and the ray's property gradient as cell records (CellRecords),
  // kept per block of kBlockRays rays of one batch element.
  constexpr int64_t kBlockRays = 4;
  const int64_t per_batch = (R + kBlockRays - 1) / kBlockRays, blocks = B * per_batch;
  std::vector<CellRecords<A>> recs(props_grad ? blocks : 0);
  bool simd = false;  // the AVX2 float32 backward (either gradient or both)
  if constexpr (std::is_same_v<scalar_t, float>) simd = march_backward_avx2_applies(P);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> gv(props_grad && !simd ? S * kProps : 0);
    auto samples = make_samples();
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t b = blk / per_batch, r0 = b * R + (blk % per_batch) * kBlockRays;
      const int64_t r1 = std::min(r0 + kBlockRays, (b + 1) * R);
      const scalar_t* v = vol + frame_volume(P, b) * vol_stride;
      CellRecords<A>* rec = props_grad ? &recs[blk] : nullptr;
      if (rec) {
        rec->cell.reserve((r1 - r0) * 3 * (S / 8 + 1));
        rec->acc.reserve((r1 - r0) * 8 * kProps * (S / 8 + 1));
      }
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (simd) {
          march_backward_avx2(v, table, P, r0, r1, RaySamples(std::ref(samples)), rec, gc);
          continue;
        }
      }
#ifdef MEDFAST_USSIM_AVX2
      if (has_avx2()) {
        backward_rays_avx2<scalar_t, A>(v, table, P, samples, gv.data(), gc, rec, r0, r1);
        continue;
      }
#endif
      backward_rays<scalar_t, A>(v, table, P, samples, gv.data(), gc, rec, r0, r1);
    }
  });
  if (!props_grad) return;
  // 2. The records into the volume: one task per (volume, slab of the first volume axis), each adding
  // the records of its volume's frames in frame and ray order into its own voxels (deterministic: the
  // same sums for any number of threads). Slabs where a volume may take several frames (one volume, or
  // a volume index), bounded at quantiles of the records' first cell index, so that the tasks get about
  // the same number of records.
  scalar_t* gp = gprops.mutable_data_ptr<scalar_t>();
  const int64_t V = props.size(0);
  const bool shared = V == 1 || P.volume_index != nullptr;
  const int64_t slabs = shared ? std::min<int64_t>(P.D, 4 * at::get_num_threads()) : 1;
  std::vector<int64_t> bounds(V * (slabs + 1));
  std::vector<int64_t> hist(P.D + 1);
  for (int64_t v = 0; v < V; ++v) {
    int64_t* bd = bounds.data() + v * (slabs + 1);
    bd[0] = 0;
    bd[slabs] = P.D;
    if (slabs == 1) continue;
    std::fill(hist.begin(), hist.end(), 0);
    int64_t total = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      if (frame_volume(P, blk / per_batch) != v) continue;
      const CellRecords<A>& rec = recs[blk];
      for (int64_t r = 0; r < rec.size(); ++r) ++hist[rec.cell[3 * r] + 1];
      total += rec.size();
    }
    int64_t cum = 0, plane = 0;
    for (int64_t s = 1; s < slabs; ++s) {
      const int64_t target = total * s / slabs;
      while (plane < P.D && cum + hist[plane] <= target) cum += hist[plane++];
      bd[s] = std::max(bd[s - 1], plane);
    }
  }
  at::parallel_for(0, V * slabs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t v = task / slabs, slab = task % slabs;
      const int64_t i_lo = bounds[v * (slabs + 1) + slab], i_hi = bounds[v * (slabs + 1) + slab + 1];
      if (i_lo >= i_hi) continue;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const CellRecords<A>& rec = recs[blk];
        if (rec.size() == 0 || rec.imax + 1 < i_lo || rec.imin >= i_hi || frame_volume(P, blk / per_batch) != v)
          continue;
        for (int64_t r = 0; r < rec.size(); ++r) {
          const int64_t i0 = rec.cell[3 * r];
          if (i0 + 1 < i_lo || i0 >= i_hi) continue;
          add_record<A>(gp + v * vol_stride, P, rec.cell.data() + 3 * r, rec.acc.data() + 8 * kProps * r, i_lo,
                        i_hi);
        }
      }
    }
  });
}

// The gradient volume on transparent huge pages where allowed (1/512 of the first-touch page faults),
// zeroed by one thread: on the 2-core test VM, fresh huge pages first touched by two threads at once
// took ~40 ms for 42 MB (128^3 x 5 float32), by one thread ~4 ms (at::zeros: ~12 ms).
Tensor zeroed_props_grad(const Tensor& props, bool props_grad) {
  if (!props_grad) return at::empty({0}, props.options());
  Tensor g = empty_large_cpu(props.sizes(), props.options());
  std::memset(g.mutable_data_ptr(), 0, g.nbytes());
  return g;
}

// The samples of sub-ray (line, e) of march_lines, as the materialised tensors of
// march_lines_backward_materialized: positions start + float(i) * step (two roundings: kept out of
// any FMA-contracting code by noinline, compiled for the baseline), echo gradients grad * weights
// (float32: four samples per SSE step).
template <typename T>
__attribute__((noinline)) void line_samples(const T* start, const T* step, const T* grad, const T* w, int64_t S,
                                            T* c, T* g) {
  int64_t i = 0;
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) {
    // Four samples (12 interleaved values) per step with SSE (the baseline: separate multiply and add,
    // the same roundings as the loop below; float(i) exact: S <= 2^24).
    if (S <= (int64_t(1) << 24)) {
      const __m128 s0 = _mm_setr_ps(step[0], step[1], step[2], step[0]), s1 = _mm_setr_ps(step[1], step[2], step[0], step[1]);
      const __m128 s2 = _mm_setr_ps(step[2], step[0], step[1], step[2]);
      const __m128 o0 = _mm_setr_ps(start[0], start[1], start[2], start[0]);
      const __m128 o1 = _mm_setr_ps(start[1], start[2], start[0], start[1]);
      const __m128 o2 = _mm_setr_ps(start[2], start[0], start[1], start[2]);
      __m128 f0 = _mm_setr_ps(0, 0, 0, 1), f1 = _mm_setr_ps(1, 1, 2, 2), f2 = _mm_setr_ps(2, 3, 3, 3);
      const __m128 four = _mm_set1_ps(4.0f);
      for (; i + 4 <= S; i += 4) {
        float* ci = c + 3 * i;
        _mm_storeu_ps(ci, _mm_add_ps(o0, _mm_mul_ps(f0, s0)));
        _mm_storeu_ps(ci + 4, _mm_add_ps(o1, _mm_mul_ps(f1, s1)));
        _mm_storeu_ps(ci + 8, _mm_add_ps(o2, _mm_mul_ps(f2, s2)));
        f0 = _mm_add_ps(f0, four);
        f1 = _mm_add_ps(f1, four);
        f2 = _mm_add_ps(f2, four);
        // (a, b, c) = the three channel rows of samples i .. i + 3, interleaved to a0 b0 c0 a1 | b1 c1 a2 b2 | c2 a3 b3 c3.
        const __m128 a = _mm_loadu_ps(grad + i), b = _mm_loadu_ps(grad + S + i), cc = _mm_loadu_ps(grad + 2 * S + i);
        const __m128 t0 = _mm_unpacklo_ps(a, b), t1 = _mm_unpackhi_ps(a, b);  // a0 b0 a1 b1, a2 b2 a3 b3
        const __m128 u = _mm_shuffle_ps(cc, t0, _MM_SHUFFLE(3, 2, 1, 0));      // c0 c1 a1 b1
        const __m128 v = _mm_shuffle_ps(cc, t1, _MM_SHUFFLE(3, 2, 3, 2));      // c2 c3 a3 b3
        const __m128 g0 = _mm_shuffle_ps(t0, u, _MM_SHUFFLE(2, 0, 1, 0));
        const __m128 g1 = _mm_shuffle_ps(u, t1, _MM_SHUFFLE(1, 0, 1, 3));
        const __m128 g2 = _mm_shuffle_ps(v, v, _MM_SHUFFLE(1, 3, 2, 0));
        const float* wi = w + 3 * i;
        float* gi = g + 3 * i;
        _mm_storeu_ps(gi, _mm_mul_ps(g0, _mm_loadu_ps(wi)));
        _mm_storeu_ps(gi + 4, _mm_mul_ps(g1, _mm_loadu_ps(wi + 4)));
        _mm_storeu_ps(gi + 8, _mm_mul_ps(g2, _mm_loadu_ps(wi + 8)));
      }
    }
  }
#endif
  for (; i < S; ++i) {
    const T fi = static_cast<T>(i);
    for (int k = 0; k < 3; ++k) {
      const T d = fi * step[k];
      c[3 * i + k] = start[k] + d;
      g[3 * i + k] = grad[k * S + i] * w[3 * i + k];
    }
  }
}

}  // namespace

std::tuple<Tensor, Tensor> march_backward_cpu(const Tensor& grad, const Tensor& props, const Tensor& coords,
                                              const Tensor& noise, const Params& P, bool props_grad,
                                              bool coords_grad) {
  const int64_t B = coords.size(0), R = coords.size(1), S = coords.size(2);
  Tensor gcoords = coords_grad ? at::empty(coords.sizes(), coords.options()) : at::empty({0}, coords.options());
  Tensor gprops = zeroed_props_grad(props, props_grad);
  if (!props_grad && !coords_grad) return {gprops, gcoords};
  AT_DISPATCH_FLOATING_TYPES(coords.scalar_type(), "medfast_ussim_march_backward_cpu", [&] {
    const scalar_t* c = coords.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    backward_core<scalar_t>(props, noise, P, B, R, props_grad, coords_grad ? gcoords.mutable_data_ptr<scalar_t>() : nullptr,
                            gprops, [&]() {
                              return [c, g, S](int64_t ray, const scalar_t** cr, const scalar_t** gr) {
                                *cr = c + ray * S * 3;
                                *gr = g + ray * S * 3;
                              };
                            });
  });
  return {gprops, gcoords};
}

std::tuple<Tensor, Tensor> march_lines_backward_cpu(const Tensor& grad, const Tensor& props, const Tensor& start,
                                                    const Tensor& step, const Tensor& weights, const Tensor& noise,
                                                    const Params& P, bool props_grad, bool coords_grad) {
  const int64_t B = start.size(0), L = start.size(1), E = start.size(2), S = P.S;
  Tensor gcoords = coords_grad ? at::empty({B, L * E, S, 3}, start.options()) : at::empty({0}, start.options());
  Tensor gprops = zeroed_props_grad(props, props_grad);
  if (!props_grad && !coords_grad) return {gprops, gcoords};
  AT_DISPATCH_FLOATING_TYPES(start.scalar_type(), "medfast_ussim_march_lines_backward_cpu", [&] {
    const scalar_t* st = start.const_data_ptr<scalar_t>();
    const scalar_t* sp = step.const_data_ptr<scalar_t>();
    const scalar_t* gd = grad.const_data_ptr<scalar_t>();
    const scalar_t* w = weights.const_data_ptr<scalar_t>();
    backward_core<scalar_t>(
        props, noise, P, B, L * E, props_grad, coords_grad ? gcoords.mutable_data_ptr<scalar_t>() : nullptr, gprops,
        [&]() {
          // Each task's scratch for one ray's samples (S x 3 positions and gradients).
          return [st, sp, gd, w, L, E, S, buf = std::vector<scalar_t>(6 * S)](
                     int64_t ray, const scalar_t** cr, const scalar_t** gr) mutable {
            const int64_t line = ray / E, e = ray % E;  // line = b L + l
            line_samples<scalar_t>(st + ray * 3, sp + line * 3, gd + line * 3 * S, w + e * S * 3, S, buf.data(),
                                   buf.data() + 3 * S);
            (void)L;
            *cr = buf.data();
            *gr = buf.data() + 3 * S;
          };
        });
  });
  return {gprops, gcoords};
}

}  // namespace medfast::ussim

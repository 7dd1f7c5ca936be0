// CPU launcher of the distance transform: one at::parallel_for per axis over the lines of all
// batches, the arithmetic from distance.h. Lines along an inner-strided axis are handled in blocks
// of kBlock neighbours: gathered into a contiguous scratch (one cache line per row), solved, and
// scattered back, so the strided passes stream memory instead of touching one value per line.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <immintrin.h>

#include "common/cpu_simd.h"
#include "distance/distance_launch.h"

namespace medfast::distance {
namespace {

constexpr int64_t kBlock = 16;

// One pass along the lines L; binary: the first pass, over the binary start (binary_line_pass).
template <typename T>
void pass_cpu(T* d, const Lines& L, T h, bool binary = false) {
  const int64_t n = L.n;
  if (L.inner == 1) {
    at::parallel_for(0, L.outer, std::max<int64_t>(1, 4096 / n), [&](int64_t begin, int64_t end) {
      std::vector<int64_t> v(n);
      std::vector<T> scratch(2 * n);
      for (int64_t o = begin; o < end; ++o) {
        if (binary)
          binary_line_pass<T>(d + o * n, 1, n, h);
        else
          envelope_pass<T>(d + o * n, 1, n, h, v.data(), scratch.data(), scratch.data() + n, 1);
      }
    });
    return;
  }
  const int64_t per_outer = (L.inner + kBlock - 1) / kBlock;
  const int64_t blocks = L.outer * per_outer;
  at::parallel_for(0, blocks, std::max<int64_t>(1, 256 / n), [&](int64_t begin, int64_t end) {
    std::vector<T> buf(kBlock * n), scratch(2 * n);
    std::vector<int64_t> v(n);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t o = b / per_outer, i0 = (b - o * per_outer) * kBlock;
      const int64_t w = std::min(kBlock, L.inner - i0);
      T* base = d + o * n * L.inner + i0;
      for (int64_t q = 0; q < n; ++q) {
        const T* row = base + q * L.inner;
        for (int64_t j = 0; j < w; ++j) buf[j * n + q] = row[j];
      }
      for (int64_t j = 0; j < w; ++j) {
        if (binary)
          binary_line_pass<T>(buf.data() + j * n, 1, n, h);
        else
          envelope_pass<T>(buf.data() + j * n, 1, n, h, v.data(), scratch.data(), scratch.data() + n, 1);
      }
      for (int64_t q = 0; q < n; ++q) {
        T* row = base + q * L.inner;
        for (int64_t j = 0; j < w; ++j) row[j] = buf[j * n + q];
      }
    }
  });
}

template <typename T>
void finish_cpu(T* d, int64_t total, int ndim, const int64_t* size, const T* spacing, int64_t numel) {
  at::parallel_for(0, total, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) d[i] = finish<T>(d[i], i % numel, ndim, size, spacing);
  });
}

// RowMin with AVX2: whole vectors, the last one ending at hi (overlaps do not change a minimum), windows
// shorter than a vector widened inside the row, and the horizontal minimum only when asked for.
struct RowMinAvx2 {
  int64_t n2;
  __m256 m;
  MEDFAST_AVX2 explicit RowMinAvx2(int64_t n) : n2(n), m(_mm256_set1_ps(INFINITY)) {}
  MEDFAST_AVX2 inline void row(const float* row, const float* sq, int64_t lo, int64_t hi, float c0) {
    if (hi - lo < 7) {
      if (n2 < 8) {
        RowMin<float> s;
        s.row(row, sq, lo, hi, c0);
        m = _mm256_min_ps(m, _mm256_set1_ps(s.best()));
        return;
      }
      hi = lo + 7 < n2 ? lo + 7 : n2 - 1;
      lo = hi - 7;
    }
    const __m256 c = _mm256_set1_ps(c0);
    int64_t k = lo;
    for (; k + 8 <= hi + 1; k += 8)
      m = _mm256_min_ps(m, _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(row + k), _mm256_loadu_ps(sq + k)), c));
    if (k <= hi) {
      const __m256 v = _mm256_add_ps(_mm256_loadu_ps(row + hi - 7), _mm256_loadu_ps(sq + hi - 7));
      m = _mm256_min_ps(m, _mm256_add_ps(v, c));
    }
  }
  MEDFAST_AVX2 inline float best() const {
    __m128 h = _mm_min_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_min_ps(h, _mm_movehl_ps(h, h));
    h = _mm_min_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
  }
};

// plane_search with the row minimum inlined, compiled for AVX2 and for the baseline.
MEDFAST_AVX2 float search_avx2(const float* plane, int64_t n0, int64_t n2, int64_t i, int64_t x, float h0, float h2,
                               const float* sq, float limit, bool tight, int64_t& reads, int64_t k_lo, int64_t k_hi) {
  RowMinAvx2 acc(n2);
  return plane_search<float>(plane, n2, n0, n2, i, x, h0, h2, sq, limit, tight, acc, reads, k_lo, k_hi);
}

float search_base(const float* plane, int64_t n0, int64_t n2, int64_t i, int64_t x, float h0, float h2,
                  const float* sq, float limit, bool tight, int64_t& reads, int64_t k_lo, int64_t k_hi) {
  RowMin<float> acc;
  return plane_search<float>(plane, n2, n0, n2, i, x, h0, h2, sq, limit, tight, acc, reads, k_lo, k_hi);
}

// Reads (as plane_search counts them) per envelope step (a plane's rows times the columns the envelope
// pass reads and writes) that the plane's queries may spend on plane_search before the plane falls back
// to the envelope pass: a step, with its division and branches, costs as much as many vector reads
// (tuned on 128^3 surfaces, near and far apart).
constexpr int64_t kSearchBudget = 64;

// Where one batch element's seeds and queries lie: the seeds' rows j0..j1 (axis 0) and columns
// k0..k1 (axis 2), and the queries' planes y0..y1 (axis 1). Only those rows of those planes can hold a
// finite value that a query reads after the binary pass, so the planes are stored cropped to them:
// far-apart surfaces, or one class among many, cost about their own boxes.
struct Box {
  int64_t j0 = INT64_MAX, j1 = -1, k0 = INT64_MAX, k1 = -1, y0 = INT64_MAX, y1 = -1;
  bool seeded() const { return j1 >= 0; }
  bool queried() const { return y1 >= 0; }
  int64_t rows() const { return j1 - j0 + 1; }
  int64_t planes() const { return y1 - y0 + 1; }
};

// One row of a sweep of the binary pass along axis 1, columns [k0, k1] (seed_line_pass's arithmetic):
// the forward sweep keeps the nearest seed at or before y in `last` and, where out is given, writes its
// squared distance (+inf where none); the backward sweep (kBack) keeps the nearest at or after y and
// takes its squared distance where smaller.
struct SweepRow {
  int64_t k0, k1;
  float h;
  template <bool kBack>
  __attribute__((always_inline)) void run(const bool* sr, int32_t* last, float* out, int32_t y, int64_t from) const {
    for (int64_t k = from; k <= k1; ++k) {
      const int32_t l = sr[k] ? y : last[k];
      last[k] = l;
      const float dx = float(kBack ? l - y : y - l) * h;
      const float v = dx * dx;
      if (!out) continue;
      if (kBack)
        out[k] = l >= 0 && v < out[k] ? v : out[k];
      else
        out[k] = l >= 0 ? v : infinity<float>();
    }
  }
  template <bool kBack>
  __attribute__((always_inline)) void operator()(const bool* sr, int32_t* last, float* out, int32_t y) const {
    run<kBack>(sr, last, out, y, k0);
  }
};

// 8 bools -> all-ones lanes where set.
MEDFAST_AVX2 inline __m256i seeded8(const bool* p) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm256_cmpgt_epi32(b, _mm256_setzero_si256());
}

// SweepRow with 8 columns per vector on [k0, kv) (the remainder by SweepRow, the same arithmetic).
struct SweepRowAvx2 {
  SweepRow tail;
  int64_t kv;
  template <bool kBack>
  MEDFAST_AVX2 void operator()(const bool* sr, int32_t* last, float* out, int32_t y) const {
    const __m256 hv = _mm256_set1_ps(tail.h), inf = _mm256_set1_ps(INFINITY);
    const __m256i yv = _mm256_set1_epi32(y);
    for (int64_t k = tail.k0; k < kv; k += 8) {
      __m256i* lp = reinterpret_cast<__m256i*>(last + k);
      const __m256i l = _mm256_blendv_epi8(_mm256_loadu_si256(lp), yv, seeded8(sr + k));
      _mm256_storeu_si256(lp, l);
      if (!out) continue;
      const __m256i off = kBack ? _mm256_sub_epi32(l, yv) : _mm256_sub_epi32(yv, l);
      const __m256 dx = _mm256_mul_ps(_mm256_cvtepi32_ps(off), hv);
      const __m256 v = _mm256_blendv_ps(_mm256_mul_ps(dx, dx), inf, _mm256_castsi256_ps(l));
      _mm256_storeu_ps(out + k, kBack ? _mm256_min_ps(v, _mm256_loadu_ps(out + k)) : v);
    }
    tail.run<kBack>(sr, last, out, y, kv);
  }
};

// Binary pass along axis 1 for the rows j in [ja, jb) of one element's Box x: its seeds s (n0, n1, n2),
// its planes dt (y0..y1, j0..j1, n2), +inf outside the columns k0..k1. The sweeps walk the planes in
// order (every y: a seed outside the planes is still the nearest for some), each keeping the nearest
// seed so far of every (j, k) in `last` ((jb - ja) x n2), so that the writes stream plane by plane.
// row: SweepRow or SweepRowAvx2.
template <typename Row>
__attribute__((always_inline)) inline void seed_planes(const bool* s, float* dt, const Box& x, int64_t ja, int64_t jb,
                                                       int64_t n1, int64_t n2, int32_t* last, const Row& row) {
  const int64_t m0 = x.rows();
  for (int64_t j = ja; j < jb; ++j) std::fill(last + (j - ja) * n2 + x.k0, last + (j - ja) * n2 + x.k1 + 1, -1);
  for (int64_t y = 0; y <= x.y1; ++y) {
    for (int64_t j = ja; j < jb; ++j) {
      float* out = y >= x.y0 ? dt + ((y - x.y0) * m0 + (j - x.j0)) * n2 : nullptr;
      row.template operator()<false>(s + (j * n1 + y) * n2, last + (j - ja) * n2, out, static_cast<int32_t>(y));
      if (out) {
        std::fill(out, out + x.k0, INFINITY);
        std::fill(out + x.k1 + 1, out + n2, INFINITY);
      }
    }
  }
  for (int64_t j = ja; j < jb; ++j) std::fill(last + (j - ja) * n2 + x.k0, last + (j - ja) * n2 + x.k1 + 1, -1);
  for (int64_t y = n1 - 1; y >= x.y0; --y) {
    for (int64_t j = ja; j < jb; ++j) {
      float* out = y <= x.y1 ? dt + ((y - x.y0) * m0 + (j - x.j0)) * n2 : nullptr;
      row.template operator()<true>(s + (j * n1 + y) * n2, last + (j - ja) * n2, out, static_cast<int32_t>(y));
    }
  }
}

MEDFAST_AVX2 void seed_planes_avx2(const bool* s, float* dt, const Box& x, int64_t ja, int64_t jb, int64_t n1,
                                   int64_t n2, float h, int32_t* last) {
  const SweepRowAvx2 row{{x.k0, x.k1, h}, x.k0 + (x.k1 - x.k0 + 1) / 8 * 8};
  seed_planes(s, dt, x, ja, jb, n1, n2, last, row);
}

void seed_planes_base(const bool* s, float* dt, const Box& x, int64_t ja, int64_t jb, int64_t n1, int64_t n2, float h,
                      int32_t* last) {
  seed_planes(s, dt, x, ja, jb, n1, n2, last, SweepRow{x.k0, x.k1, h});
}

// Set bytes of a row of n bools, and the first and last set column (unchanged where none): 8 bytes
// at a time (a bool is 0 or 1, so a word's set bytes are its set bits).
inline int64_t row_extent(const bool* row, int64_t n, int64_t& lo, int64_t& hi) {
  int64_t c = 0, a = -1, b = -1, k = 0;
  for (; k + 8 <= n; k += 8) {
    uint64_t w;
    std::memcpy(&w, row + k, 8);
    if (w == 0) continue;
    c += __builtin_popcountll(w);
    if (a < 0) a = k + __builtin_ctzll(w) / 8;
    b = k + (63 - __builtin_clzll(w)) / 8;
  }
  for (; k < n; ++k) {
    if (!row[k]) continue;
    ++c;
    if (a < 0) a = k;
    b = k;
  }
  if (c == 0) return 0;
  lo = std::min(lo, a);
  hi = std::max(hi, b);
  return c;
}

// 3D seed distances at the query voxels of (B, n0, n1, n2) bool volumes: the binary pass along axis
// 1, then axes 2 and 0 together at the queries, plane (b, :, y, :) by plane, each plane cropped to the
// element's Box. Each query is searched directly (plane_search), bounded by the distance of a query
// found before plus the distance between the two (distances are 1-Lipschitz): the previous query of
// its row, the last of its column, else the previous one (queries of a surface are mostly neighbours).
// A plane whose queries exceed the budget gets the envelope pass along its rows and the rest of its
// queries are read along axis 0 (distance_at), so far-apart surfaces cost little more than the
// transform over their boxes. Elements go one at a time through one
// buffer; within one, planes are independent (the envelope pass works in place on the plane's own
// rows), and each output slot is fixed by the query's rank in C order: deterministic.
Tensor seed_distances_3d(const Tensor& seeds, const Tensor& query, const std::vector<double>& spacing) {
  const int64_t B = seeds.size(0), n0 = seeds.size(1), n1 = seeds.size(2), n2 = seeds.size(3);
  const float h0 = static_cast<float>(spacing[0]), h1 = static_cast<float>(spacing[1]),
              h2 = static_cast<float>(spacing[2]);
  const bool* s = seeds.const_data_ptr<bool>();
  const bool* qm = query.const_data_ptr<bool>();
  const bool simd = cpu_simd_available();
  // Per row (b, j, y): the queries' count (then the output slot of its first query, by an exclusive
  // prefix sum) and column extent, and the seeds' column extent (lo > hi where none).
  const int64_t rows = B * n0 * n1;
  std::vector<int64_t> first(rows + 1, 0), ext(4 * rows);
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / n2), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t* e = ext.data() + 4 * r;
      e[0] = e[2] = INT64_MAX;
      e[1] = e[3] = -1;
      first[r + 1] = row_extent(qm + r * n2, n2, e[0], e[1]);
      row_extent(s + r * n2, n2, e[2], e[3]);
    }
  });
  for (int64_t r = 0; r < rows; ++r) first[r + 1] += first[r];
  Tensor out = at::empty({first[rows]}, seeds.options().dtype(at::kFloat));
  if (first[rows] == 0) return out;
  float* o = out.mutable_data_ptr<float>();

  // The boxes; elements with queries but no seed get +inf.
  std::vector<Box> box(B);
  int64_t buffer = 0;  // the largest element's planes
  for (int64_t b = 0; b < B; ++b) {
    Box& x = box[b];
    for (int64_t j = 0; j < n0; ++j) {
      for (int64_t y = 0; y < n1; ++y) {
        const int64_t r = (b * n0 + j) * n1 + y;
        const int64_t* e = ext.data() + 4 * r;
        if (e[1] >= 0) {
          x.y0 = std::min(x.y0, y);
          x.y1 = std::max(x.y1, y);
        }
        if (e[3] >= 0) {
          x.j0 = std::min(x.j0, j);
          x.j1 = std::max(x.j1, j);
          x.k0 = std::min(x.k0, e[2]);
          x.k1 = std::max(x.k1, e[3]);
        }
      }
    }
    if (x.queried() && !x.seeded()) std::fill(o + first[b * n0 * n1], o + first[(b + 1) * n0 * n1], INFINITY);
    if (x.queried() && x.seeded()) buffer = std::max(buffer, x.planes() * x.rows() * n2);
  }
  if (buffer == 0) return out;

  std::vector<float> sq(2 * n2 - 1);  // sq[n2 - 1 + t] = (h2 t)^2
  for (int64_t t = 0; t < n2; ++t) {
    const float off = static_cast<float>(t) * h2;
    sq[n2 - 1 + t] = sq[n2 - 1 - t] = off * off;
  }
  // One element at a time in one buffer of planes (reused: no fresh pages per element), its rows in
  // parallel for the binary pass, then its planes in parallel.
  Tensor dt_t = at::empty({buffer}, out.options());
  float* dt = dt_t.mutable_data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const Box& bx = box[b];
    if (!bx.queried() || !bx.seeded()) continue;
    const int64_t m0 = bx.rows();
    const bool* sb = s + b * n0 * n1 * n2;
    at::parallel_for(bx.j0, bx.j1 + 1, std::max<int64_t>(1, 16384 / (n1 * n2)), [&](int64_t begin, int64_t end) {
      std::vector<int32_t> last((end - begin) * n2);
      (simd ? seed_planes_avx2 : seed_planes_base)(sb, dt, bx, begin, end, n1, n2, h1, last.data());
    });
    at::parallel_for(bx.y0, bx.y1 + 1, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> v(n2), col_i(n2);
      std::vector<float> scratch(2 * n2), col_d(n2);
      auto search = simd ? search_avx2 : search_base;
      for (int64_t y = begin; y < end; ++y) {
        float* plane = dt + (y - bx.y0) * m0 * n2;
        // the queries of the plane, and their columns: the envelope pass reads columns k0..k1 and writes
        // those only
        int64_t total = 0, x0 = INT64_MAX, x1 = -1;
        for (int64_t i = 0; i < n0; ++i) {
          const int64_t r = (b * n0 + i) * n1 + y;
          total += first[r + 1] - first[r];
          x0 = std::min(x0, ext[4 * r]);
          x1 = std::max(x1, ext[4 * r + 1]);
        }
        if (total == 0) continue;  // a plane between two that hold queries
        const int64_t budget = kSearchBudget * m0 * (bx.k1 - bx.k0 + 1 + x1 - x0 + 1);
        int64_t reads = 0, pi = 0, px = 0, done = 0;
        double prev = -1;  // the previous query's distance
        std::fill(col_d.begin(), col_d.end(), -1.0f);  // the last distance found in each column
        bool enveloped = false;
        for (int64_t i = 0; i < n0; ++i) {
          const int64_t r = (b * n0 + i) * n1 + y;
          int64_t slot = first[r];
          if (slot == first[r + 1]) continue;
          if (i + 2 < n0) __builtin_prefetch(qm + (r + 2 * n1) * n2 + ext[4 * (r + 2 * n1)] % n2);
          const bool* qrow = qm + r * n2;
          const int64_t il = i - bx.j0;  // the query's row in the cropped plane (may lie outside it)
          for (int64_t x = ext[4 * r], x_end = ext[4 * r + 1] + 1; x < x_end; ++x) {
            if (x + 8 <= x_end) {  // surfaces are sparse: skip empty runs 8 bytes at a time
              uint64_t word;
              std::memcpy(&word, qrow + x, 8);
              if (word == 0) {
                x += 7;
                continue;
              }
            }
            if (!qrow[x]) continue;
            if (enveloped) {
              o[slot++] = distance_at<float>(plane + x, n2, m0, il, h0);
              continue;
            }
            // the query's own column, a true candidate, where the plane holds it
            float limit = il >= 0 && il < m0 ? plane[il * n2 + x] : INFINITY;
            // Lipschitz bounds (distances are 1-Lipschitz): from the previous query of the row, or the
            // last one of the column (both without a square root), else from the previous query
            double reach = INFINITY;
            if (prev >= 0 && pi == i) reach = prev + double(x - px) * h2;
            if (col_d[x] >= 0) reach = std::min(reach, double(col_d[x]) + double(i - col_i[x]) * h0);
            if (reach == INFINITY && prev >= 0) {
              const double di = double(i - pi) * h0, dx = double(x - px) * h2;
              reach = prev + std::sqrt(di * di + dx * dx);
            }
            const bool bounded = reach < INFINITY;
            // widened by a relative 1e-5 against rounding
            if (bounded) limit = std::min(limit, static_cast<float>(reach * reach * (1 + 1e-5)));
            const float* sqx = sq.data() + (n2 - 1 - x);
            float best = 0;  // a query on a seed (limit 0): nothing to search
            if (limit > 0) best = search(plane, m0, n2, il, x, h0, h2, sqx, limit, bounded, reads, bx.k0, bx.k1);
            if (best > limit) best = search(plane, m0, n2, il, x, h0, h2, sqx, INFINITY, false, reads, bx.k0, bx.k1);
            o[slot++] = std::sqrt(best);
            prev = std::sqrt(double(best));
            col_d[x] = static_cast<float>(prev);
            col_i[x] = i;
            pi = i;
            px = x;
            ++done;
            // An expensive plane (over budget, or on course to be after a few queries): the envelope pass
            // for the rest of its queries.
            if (reads > budget || (done >= 8 && reads * total > budget * done)) {
              // a row still +inf after the binary pass (its slab (b, j, :, :) has no seed) stays +inf
              for (int64_t j = 0; j < m0; ++j) {
                float* row = plane + j * n2;
                if (std::any_of(row + bx.k0, row + bx.k1 + 1, [](float d) { return d < INFINITY; }))
                  envelope_range<float>(row, 1, bx.k0, bx.k1, x0, x1, h2, v.data(), scratch.data(),
                                        scratch.data() + n2, 1);
              }
              enveloped = true;
            }
          }
        }
      }
    });
  }
  return out;
}

}  // namespace

Tensor seed_distances_cpu(const Tensor& seeds_in, const Tensor& query_in, const std::vector<double>& spacing) {
  auto as_bool = [](const Tensor& t) {
    return t.scalar_type() == at::kBool && t.is_contiguous() ? t : t.ne(0).contiguous();
  };
  const Tensor seeds = as_bool(seeds_in);
  if (seeds.dim() == 4) return seed_distances_3d(seeds, as_bool(query_in), spacing);
  // 2D: the binary two-sweep pass along axis 1 (contiguous), then axis 0 at the queries only.
  const Tensor index = query_in.ne(0).flatten().nonzero().flatten();  // C order, as boolean indexing
  Tensor d = at::empty(seeds.sizes(), seeds.options().dtype(at::kFloat));
  Tensor out = at::empty({index.numel()}, d.options());
  const bool* s = seeds.const_data_ptr<bool>();
  float* dp = d.mutable_data_ptr<float>();
  const Lines bl = lines_along(d, 1);
  const float hb = static_cast<float>(spacing[1]);
  at::parallel_for(0, bl.outer, std::max<int64_t>(1, 4096 / bl.n), [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) seed_line_pass<float>(s + o * bl.n, 1, dp + o * bl.n, 1, bl.n, hb);
  });
  const Lines first = lines_along(d, 0);
  const float h0 = static_cast<float>(spacing[0]);
  const int64_t* qi = index.const_data_ptr<int64_t>();
  float* o = out.mutable_data_ptr<float>();
  at::parallel_for(0, index.numel(), 2048, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t x = qi[k], plane = first.n * first.inner;
      const int64_t b = x / plane, r = x - b * plane, i = r / first.inner;
      o[k] = distance_at<float>(dp + b * plane + (r - i * first.inner), first.inner, first.n, i, h0);
    }
  });
  return out;
}

// One row of surface voxels away from the image border (surface_voxel over its neighbour rows a, b,
// f0, f1); returns their number. Restrict pointers: byte stores may otherwise alias anything, which
// keeps the compiler from vectorizing.
inline int64_t surface_row(const uint8_t* __restrict c, const uint8_t* __restrict a, const uint8_t* __restrict b,
                           const uint8_t* __restrict f0, const uint8_t* __restrict f1, uint8_t* __restrict o,
                           int64_t W) {
  o[0] = c[0];
  o[W - 1] = c[W - 1];
  for (int64_t x = 1; x < W - 1; ++x) o[x] = surface_voxel(c[x], c[x - 1], c[x + 1], a[x], b[x], f0[x], f1[x]);
  uint32_t n = 0;
  for (int64_t x = 0; x < W; ++x) n += o[x];
  return n;
}

// Surface voxels row by row (rows along the last axis, contiguous): an all-zero row stays zero, a row
// on the image border is its own surface (every voxel has a neighbour outside), and the others take
// surface_voxel over their neighbour rows, a loop the compiler vectorizes.
std::tuple<Tensor, Tensor> surface_edges_cpu(const Tensor& mask) {
  const int64_t nd = mask.dim() - 1, B = mask.size(0);
  const int64_t D = nd == 3 ? mask.size(1) : 1, H = mask.size(nd - 1), W = mask.size(nd);
  Tensor out = at::empty_like(mask);
  Tensor counts = at::zeros({B}, mask.options().dtype(at::kLong));
  const int64_t rows = B * D * H;
  if (out.numel() == 0) return {out, counts};
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
  uint8_t* e = reinterpret_cast<uint8_t*>(out.mutable_data_ptr<bool>());
  std::vector<int64_t> row_count(rows);
  const int64_t dz = nd == 3 ? H * W : W;  // the neighbour rows along axis 0 (in 2D: axis 0's again)
  int64_t* rc = row_count.data();
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / W), [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = r % H, z = (r / H) % D;
      const uint8_t* c = m + r * W;
      uint8_t* o = e + r * W;
      uint8_t any = 0;
      for (int64_t x = 0; x < W; ++x) any |= c[x];
      if (any == 0) {
        std::memset(o, 0, W);
        rc[r] = 0;
      } else if (y == 0 || y == H - 1 || (nd == 3 && (z == 0 || z == D - 1)) || W < 3) {
        std::memcpy(o, c, W);
        rc[r] = std::count(c, c + W, uint8_t(1));
      } else {
        rc[r] = surface_row(c, c - W, c + W, c - dz, c + dz, o, W);
      }
    }
  });
  int64_t* cp = counts.mutable_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) cp[r / (D * H)] += row_count[r];
  return {out, counts};
}

Tensor distance_cpu(const Tensor& mask, const std::vector<double>& spacing, at::ScalarType dtype) {
  Tensor d = initial_squared(mask, dtype);
  const int ndim = static_cast<int>(d.dim() - 1);
  int64_t size[3] = {1, 1, 1}, numel = 1;
  for (int a = 0; a < ndim; ++a) {
    size[a] = d.size(1 + a);
    numel *= size[a];
  }
  AT_DISPATCH_FLOATING_TYPES(dtype, "medfast_distance_cpu", [&] {
    scalar_t h[3];
    for (int a = 0; a < ndim; ++a) h[a] = static_cast<scalar_t>(spacing[a]);
    scalar_t* ptr = d.mutable_data_ptr<scalar_t>();
    for (int a = 0; a < ndim; ++a) pass_cpu<scalar_t>(ptr, lines_along(d, a), h[a], a == 0);
    finish_cpu<scalar_t>(ptr, d.numel(), ndim, size, h, numel);
  });
  return d;
}

}  // namespace medfast::distance

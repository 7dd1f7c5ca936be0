// CPU launcher of the distance transform: one at::parallel_for per axis over the lines of all
// batches, the arithmetic from distance.h. Lines along an inner-strided axis are handled in blocks
// of kBlock neighbours: gathered into a contiguous scratch (one cache line per row), solved, and
// scattered back, so the strided passes stream memory instead of touching one value per line.
#include <ATen/Parallel.h>

#include <algorithm>
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
                               const float* sq, float limit, bool tight, int64_t& reads) {
  RowMinAvx2 acc(n2);
  return plane_search<float>(plane, n2, n0, n2, i, x, h0, h2, sq, limit, tight, acc, reads);
}

float search_base(const float* plane, int64_t n0, int64_t n2, int64_t i, int64_t x, float h0, float h2,
                  const float* sq, float limit, bool tight, int64_t& reads) {
  RowMin<float> acc;
  return plane_search<float>(plane, n2, n0, n2, i, x, h0, h2, sq, limit, tight, acc, reads);
}

// Reads per voxel of a plane that its queries may spend on plane_search before the plane falls back
// to the envelope pass along its rows (a vector read costs several times less than an envelope step).
constexpr int64_t kSearchBudget = 32;

// Binary pass along axis 1 of (B, n0, n1, n2) seeds for the rows (b, j) in [begin, end), written
// transposed, plane by plane: dt (B, n1, n0, n2), so that the plane of each query is one contiguous
// block for the search. The sweeps walk whole rows of n2 side by side (vectorized over k); the
// arithmetic is seed_line_pass's. Columns from k0 on.
template <typename T>
__attribute__((always_inline)) inline void seed_rows(const bool* s, T* dt, int64_t n0, int64_t n1, int64_t n2, T h,
                                                     int64_t begin, int64_t end, int32_t* last, int64_t k0 = 0) {
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / n0, j = r - b * n0;
    const bool* src = s + r * n1 * n2;
    T* dst = dt + (b * n1 * n0 + j) * n2;  // (b, y, j, :) at dst + y * n0 * n2
    for (int64_t k = k0; k < n2; ++k) last[k] = -1;
    for (int64_t y = 0; y < n1; ++y) {
      const bool* sr = src + y * n2;
      T* dr = dst + y * n0 * n2;
      for (int64_t k = k0; k < n2; ++k) {
        const int32_t l = sr[k] ? static_cast<int32_t>(y) : last[k];
        last[k] = l;
        const T dx = T(static_cast<int32_t>(y) - l) * h;
        dr[k] = l >= 0 ? dx * dx : infinity<T>();
      }
    }
    for (int64_t k = k0; k < n2; ++k) last[k] = -1;
    for (int64_t y = n1 - 1; y >= 0; --y) {
      const bool* sr = src + y * n2;
      T* dr = dst + y * n0 * n2;
      for (int64_t k = k0; k < n2; ++k) {
        const int32_t l = sr[k] ? static_cast<int32_t>(y) : last[k];
        last[k] = l;
        const T dx = T(l - static_cast<int32_t>(y)) * h;
        const T v = dx * dx;
        dr[k] = l >= 0 && v < dr[k] ? v : dr[k];
      }
    }
  }
}

// 8 bools -> all-ones lanes where set.
MEDFAST_AVX2 inline __m256i seeded8(const bool* p) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm256_cmpgt_epi32(b, _mm256_setzero_si256());
}

// seed_rows with 8 columns per vector (the remainder by seed_rows' own arithmetic).
MEDFAST_AVX2 void seed_rows_avx2(const bool* s, float* dt, int64_t n0, int64_t n1, int64_t n2, float h, int64_t begin,
                                 int64_t end, int32_t* last) {
  const int64_t n8 = n2 / 8 * 8;
  const __m256 hv = _mm256_set1_ps(h), inf = _mm256_set1_ps(INFINITY);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / n0, j = r - b * n0;
    const bool* src = s + r * n1 * n2;
    float* dst = dt + (b * n1 * n0 + j) * n2;
    for (int64_t k = 0; k < n8; k += 8) {
      __m256i l = _mm256_set1_epi32(-1);
      for (int64_t y = 0; y < n1; ++y) {
        const __m256i yv = _mm256_set1_epi32(static_cast<int32_t>(y));
        l = _mm256_blendv_epi8(l, yv, seeded8(src + y * n2 + k));
        const __m256 dx = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(yv, l)), hv);
        _mm256_storeu_ps(dst + y * n0 * n2 + k, _mm256_blendv_ps(_mm256_mul_ps(dx, dx), inf, _mm256_castsi256_ps(l)));
      }
      l = _mm256_set1_epi32(-1);
      for (int64_t y = n1 - 1; y >= 0; --y) {
        const __m256i yv = _mm256_set1_epi32(static_cast<int32_t>(y));
        l = _mm256_blendv_epi8(l, yv, seeded8(src + y * n2 + k));
        const __m256 dx = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(l, yv)), hv);
        const __m256 v = _mm256_blendv_ps(_mm256_mul_ps(dx, dx), inf, _mm256_castsi256_ps(l));
        float* dr = dst + y * n0 * n2 + k;
        _mm256_storeu_ps(dr, _mm256_min_ps(v, _mm256_loadu_ps(dr)));
      }
    }
    if (n8 < n2) seed_rows<float>(s, dt, n0, n1, n2, h, r, r + 1, last, n8);
  }
}

void seed_rows_base(const bool* s, float* dt, int64_t n0, int64_t n1, int64_t n2, float h, int64_t begin, int64_t end,
                    int32_t* last) {
  seed_rows<float>(s, dt, n0, n1, n2, h, begin, end, last, 0);
}

// 3D seed distances at the query voxels of (B, n0, n1, n2) bool volumes: the binary pass along axis
// 1, then axes 2 and 0 together at the queries, plane (b, :, y, :) by plane. Each query is searched
// directly (plane_search), bounded by the previous query's distance plus the distance between the
// two (distances are 1-Lipschitz, and consecutive queries of a surface are mostly neighbours). A
// plane whose queries exceed the budget gets the envelope pass along its rows and the rest of its
// queries are read along axis 0 (distance_at), so far-apart surfaces cost little more than the full
// transform. Planes are independent (the envelope pass works in place on the plane's own rows), and
// each output slot is fixed by the query's rank in C order: deterministic.
Tensor seed_distances_3d(const Tensor& seeds, const Tensor& query, const std::vector<double>& spacing) {
  const int64_t B = seeds.size(0), n0 = seeds.size(1), n1 = seeds.size(2), n2 = seeds.size(3);
  const float h0 = static_cast<float>(spacing[0]), h1 = static_cast<float>(spacing[1]),
              h2 = static_cast<float>(spacing[2]);
  const bool* s = seeds.const_data_ptr<bool>();
  const bool* qm = query.const_data_ptr<bool>();
  const bool simd = cpu_simd_available();
  // Output slot of each row's first query: exclusive prefix sum of the queries per row (b, j, y).
  const int64_t rows = B * n0 * n1;
  std::vector<int64_t> first(rows + 1, 0);
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / n2), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* row = reinterpret_cast<const uint8_t*>(qm + r * n2);
      int64_t c = 0;
      for (int64_t k = 0; k < n2; ++k) c += row[k] != 0;
      first[r + 1] = c;
    }
  });
  for (int64_t r = 0; r < rows; ++r) first[r + 1] += first[r];
  Tensor out = at::empty({first[rows]}, seeds.options().dtype(at::kFloat));
  if (first[rows] == 0) return out;
  float* o = out.mutable_data_ptr<float>();

  Tensor dt_t = at::empty({B, n1, n0, n2}, out.options());
  float* dt = dt_t.mutable_data_ptr<float>();
  at::parallel_for(0, B * n0, std::max<int64_t>(1, 16384 / (n1 * n2)), [&](int64_t begin, int64_t end) {
    std::vector<int32_t> last(n2);
    (simd ? seed_rows_avx2 : seed_rows_base)(s, dt, n0, n1, n2, h1, begin, end, last.data());
  });

  std::vector<float> sq(2 * n2 - 1);  // sq[n2 - 1 + t] = (h2 t)^2
  for (int64_t t = 0; t < n2; ++t) {
    const float off = static_cast<float>(t) * h2;
    sq[n2 - 1 + t] = sq[n2 - 1 - t] = off * off;
  }
  const int64_t budget = kSearchBudget * n0 * n2;
  at::parallel_for(0, B * n1, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> v(n2);
    std::vector<float> scratch(2 * n2);
    auto search = simd ? search_avx2 : search_base;
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / n1, y = p - b * n1;
      float* plane = dt + p * n0 * n2;
      int64_t reads = 0, pi = 0, px = 0, done = 0, total = 0;
      for (int64_t i = 0; i < n0; ++i) total += first[(b * n0 + i) * n1 + y + 1] - first[(b * n0 + i) * n1 + y];
      double prev = -1;  // the previous query's distance
      bool enveloped = false;
      for (int64_t i = 0; i < n0; ++i) {
        const int64_t r = (b * n0 + i) * n1 + y;
        int64_t slot = first[r];
        if (slot == first[r + 1]) continue;
        const bool* qrow = qm + r * n2;
        for (int64_t x = 0; x < n2; ++x) {
          if (x + 8 <= n2) {  // surfaces are sparse: skip empty runs 8 bytes at a time
            uint64_t word;
            std::memcpy(&word, qrow + x, 8);
            if (word == 0) {
              x += 7;
              continue;
            }
          }
          if (!qrow[x]) continue;
          if (enveloped) {
            o[slot++] = distance_at<float>(plane + x, n2, n0, i, h0);
            continue;
          }
          float limit = plane[i * n2 + x];  // the query's own column: a true candidate
          if (prev >= 0) {  // the Lipschitz bound, widened by a relative 1e-5 against rounding
            const double di = double(i - pi) * h0, dx = double(x - px) * h2;
            const double reach = prev + std::sqrt(di * di + dx * dx);
            limit = std::min(limit, static_cast<float>(reach * reach * (1 + 1e-5)));
          }
          const float* sqx = sq.data() + (n2 - 1 - x);
          float best = search(plane, n0, n2, i, x, h0, h2, sqx, limit, prev >= 0, reads);
          if (best > limit) best = search(plane, n0, n2, i, x, h0, h2, sqx, INFINITY, false, reads);
          o[slot++] = std::sqrt(best);
          prev = std::sqrt(double(best));
          pi = i;
          px = x;
          ++done;
          // An expensive plane (over budget, or on course to be after a few queries): the envelope pass
          // for the rest of its queries.
          if (reads > budget || (done >= 8 && reads * total > budget * done)) {
            // a row still +inf after the binary pass (its slab (b, j, :, :) has no seed) stays +inf: no
            // envelope pass (far-apart surfaces leave most slabs of the cropped volume seedless)
            for (int64_t j = 0; j < n0; ++j) {
              float* row = plane + j * n2;
              if (std::any_of(row, row + n2, [](float d) { return d < INFINITY; }))
                envelope_pass<float>(row, 1, n2, h2, v.data(), scratch.data(), scratch.data() + n2, 1);
            }
            enveloped = true;
          }
        }
      }
    }
  });
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

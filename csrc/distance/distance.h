// Exact Euclidean distance transform: the arithmetic shared by the CPU and CUDA launchers.
//
// The squared distance to the nearest background voxel is separable: after one 1D pass per axis
// the value at x is min over background voxels y of sum_a (h_a (x_a - y_a))^2. Each pass replaces
// the values f along one line by the lower envelope of the parabolas (h (q - p))^2 + f(p), found
// in linear time as in Felzenszwalb & Huttenlocher (2012): the parabolas are pushed in order of
// their apex and the ones hidden by the newcomer are popped; a second sweep reads the envelope.
// Infinite values (no background seen yet along the earlier axes) carry no parabola; a line that
// has none stays infinite, which after the last pass happens only on a mask without background.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace medfast::distance {

template <typename T>
MEDFAST_HOST_DEVICE T infinity() {
  return T(INFINITY);
}

// Unit roundoff of T (float32 / float64).
template <typename T>
MEDFAST_HOST_DEVICE constexpr T roundoff() {
  return sizeof(T) == 4 ? T(5.9604645e-8) : T(1.1102230246251565e-16);
}

// One 1D pass, in place, over the n values d[0], d[stride], ... of a line (squared distances,
// +inf where there is none yet). h is the spacing of the axis. Scratch of n entries each, entry k
// at [k * ss]: the apex index v and height fv of the k-th parabola of the envelope, and z, the
// index (fractional) from which it is the lowest. Positions are kept as indices and offsets are
// formed as integer differences times h, so long lines lose no precision. envelope_range takes the
// parabolas from d[lo] .. d[hi] only and writes d[out_lo] .. d[out_hi] only (scratch of hi - lo + 1
// entries): for a line +inf outside [lo, hi] that is read in [out_lo, out_hi] only.
template <typename T>
MEDFAST_HOST_DEVICE void envelope_range(T* d, int64_t stride, int64_t lo, int64_t hi, int64_t out_lo, int64_t out_hi,
                                        T h, int64_t* v, T* fv, T* z, int64_t ss) {
  const T inv_h2 = T(1) / (h * h);
  int64_t m = 0;  // parabolas on the envelope
  for (int64_t q = lo; q <= hi; ++q) {
    const T fq = d[q * stride];
    if (!(fq < infinity<T>())) continue;
    T s = -infinity<T>();
    while (m > 0) {
      const int64_t p = v[(m - 1) * ss];
      // Where the new parabola meets the top one, in index units: (h (q - x))^2 + fq =
      // (h (p - x))^2 + f(p), with q > p.
      s = ((fq - fv[(m - 1) * ss]) * inv_h2 / T(q - p) + T(q + p)) * T(0.5);
      if (m > 1 && s <= z[(m - 1) * ss]) {
        --m;  // the top parabola is nowhere the lowest any more
      } else {
        break;
      }
    }
    if (m == 0) s = -infinity<T>();
    v[m * ss] = q;
    fv[m * ss] = fq;
    z[m * ss] = s;
    ++m;
  }
  if (m == 0) return;  // no finite value on the line: it stays +inf
  int64_t k = 0;
  // z of two nearly equal parabolas can round onto or just past an integer q (float32, 100:1 spacings)
  // and keep the higher one there: within rounding of q (tol), the parabolas' values at q decide
  const int64_t far = (out_lo < 0 ? -out_lo : out_lo) > out_hi ? (out_lo < 0 ? -out_lo : out_lo) : out_hi;
  const T tol = T(8) * roundoff<T>() * (T(far) + T(1));
  for (int64_t q = out_lo; q <= out_hi; ++q) {
    while (k + 1 < m) {
      const T zn = z[(k + 1) * ss];
      if (zn < T(q)) {
        ++k;
      } else if (zn > T(q) + tol) {
        break;
      } else {  // within rounding of q
        const T a = T(q - v[k * ss]) * h, b = T(q - v[(k + 1) * ss]) * h;
        if (b * b + fv[(k + 1) * ss] > a * a + fv[k * ss]) break;
        ++k;
      }
    }
    const T dx = T(q - v[k * ss]) * h;
    d[q * stride] = dx * dx + fv[k * ss];
  }
}

template <typename T>
MEDFAST_HOST_DEVICE void envelope_pass(T* d, int64_t stride, int64_t n, T h, int64_t* v, T* fv, T* z, int64_t ss) {
  envelope_range<T>(d, stride, 0, n - 1, 0, n - 1, h, v, fv, z, ss);
}

// The first pass, over the binary start (0 on background, +inf elsewhere): the envelope of parabolas
// of height 0 is the squared distance to the nearest background voxel of the line, which two sweeps
// give without scratch. The same values as envelope_pass on such a line (dx * dx of the same integer
// offsets times h). After the forward sweep a background voxel still holds 0 and every other voxel
// a positive value (h > 0), so the backward sweep still sees the background.
template <typename T>
MEDFAST_HOST_DEVICE void binary_line_pass(T* d, int64_t stride, int64_t n, T h) {
  int64_t last = -1;  // nearest background at or before q
  for (int64_t q = 0; q < n; ++q) {
    if (d[q * stride] == T(0)) last = q;
    const T dx = T(q - last) * h;
    d[q * stride] = last >= 0 ? dx * dx : infinity<T>();
  }
  last = -1;  // nearest background at or after q
  for (int64_t q = n - 1; q >= 0; --q) {
    const T cur = d[q * stride];
    if (cur == T(0)) last = q;
    if (last < 0) continue;
    const T dx = T(last - q) * h;
    const T v = dx * dx;
    if (v < cur) d[q * stride] = v;
  }
}

// Surface distances (Hausdorff, average surface distance) need the distance to a seed set only at a
// few query voxels. The first pass then needs no envelope: on a binary line the squared distance to
// the nearest seed comes from two sweeps. The last pass is evaluated at the queries only, scanning
// outwards from the query until the offset alone exceeds the best value found.

// Squared distances along one line of n voxels to its nearest seed (seed[q * ss] != 0), written to
// d[q * ds]; +inf on a line without seeds. h: the spacing of the axis.
template <typename T>
MEDFAST_HOST_DEVICE void seed_line_pass(const bool* seed, int64_t ss, T* d, int64_t ds, int64_t n, T h) {
  int64_t last = -1;  // nearest seed at or before q
  for (int64_t q = 0; q < n; ++q) {
    if (seed[q * ss]) last = q;
    const T dx = T(q - last) * h;
    d[q * ds] = last >= 0 ? dx * dx : infinity<T>();
  }
  last = -1;  // nearest seed at or after q
  for (int64_t q = n - 1; q >= 0; --q) {
    if (seed[q * ss]) last = q;
    if (last < 0) continue;
    const T dx = T(last - q) * h;
    d[q * ds] = dx * dx < d[q * ds] ? dx * dx : d[q * ds];
  }
}

// The distance at index i of a line d[0], d[stride], ... (squared distances after the earlier
// passes): min over j of d[j] + (h (i - j))^2, scanning j outwards from i while (h r)^2 can still
// beat the best; +inf if the line holds no finite value. i may lie outside [0, n) (a line cropped to
// where its values can be finite).
template <typename T>
MEDFAST_HOST_DEVICE T distance_at(const T* d, int64_t stride, int64_t n, int64_t i, T h) {
#if !defined(__CUDACC__) && !defined(__HIPCC__)
  using std::sqrt;
#endif
  T best = i >= 0 && i < n ? d[i * stride] : infinity<T>();
  const int64_t reach = i > n - 1 - i ? i : n - 1 - i;  // the farthest index from i
  const int64_t nearest = i < 0 ? -i : (i >= n ? i - (n - 1) : 1);  // the first offset inside the line
  for (int64_t r = nearest; r <= reach; ++r) {
    const T off = T(r) * h;
    const T r2 = off * off;
    if (!(r2 < best)) break;
    if (i - r >= 0) {
      const T v = d[(i - r) * stride] + r2;
      best = v < best ? v : best;
    }
    if (i + r < n) {
      const T v = d[(i + r) * stride] + r2;
      best = v < best ? v : best;
    }
  }
  return sqrt(best);
}

// Running minimum of plane_search: row() takes min over k in [lo, hi] of (row[k] + sq[k]) + c0, with
// sq the squared column offsets from the query (same rounding as envelope_pass followed by
// distance_at); best() is the minimum so far. A vector form may read more of the row than [lo, hi]
// (the extra columns are true candidates too, so the minimum over the plane is unchanged).
template <typename T>
struct RowMin {
  T m = infinity<T>();
  MEDFAST_HOST_DEVICE void row(const T* row, const T* sq, int64_t lo, int64_t hi, T c0) {
    for (int64_t k = lo; k <= hi; ++k) {
      const T v = (row[k] + sq[k]) + c0;
      m = v < m ? v : m;
    }
  }
  MEDFAST_HOST_DEVICE T best() const { return m; }
};

// What plane_search counts for visiting a row, beside its values: the window's square root and the
// loop's own steps cost about as much as reading 128 values in vector form (tuned on 128^3 surfaces).
constexpr int64_t kRowCost = 128;

// The last two passes of a 3D seed distance at one query, without the envelope pass: after the
// binary pass along the middle axis, the plane of the query holds rows j = 0 .. n0-1 (at d + j * rs)
// of n2 contiguous squared distances, and the squared answer is the minimum over (j, k) of
// (d[j][k] + (h2 (x - k))^2) + (h0 (i - j))^2. Rows are visited outwards from row i while their
// offset alone stays below the bound (the best so far, or `limit`, an upper bound the caller knows,
// if smaller), each over the window of columns whose offset stays below it, so the cost is about the
// area of the ellipse of the answer's radius: small for queries near the seeds, large for far ones
// (`reads` counts the values read and kRowCost per row, so that the launcher can fall back to the
// envelope pass). With `tight_limit` (a limit close to the answer) the running minimum tightens the
// bound every other row only: reading it is a serial step (a horizontal minimum in vector forms).
// Returns the squared distance; a result above `limit` means the limit was no bound (the search then
// has to be rerun without it). acc: a fresh RowMin or a vector form of it. The plane may be cropped
// to the rows and columns where values can be finite: the query's row i may lie outside [0, n0), and
// only columns [k_lo, k_hi] are read (the others must be +inf).
template <typename T, typename Acc>
MEDFAST_HOST_DEVICE T plane_search(const T* d, int64_t rs, int64_t n0, int64_t n2, int64_t i, int64_t x, T h0,
                                   T h2, const T* sq, T limit, bool tight_limit, Acc& acc, int64_t& reads,
                                   int64_t k_lo, int64_t k_hi) {
#if !defined(__CUDACC__) && !defined(__HIPCC__)
  using std::floor;
  using std::sqrt;
#endif
  const T inv_h2 = T(1) / h2;
  const int64_t reach = i > n0 - 1 - i ? i : n0 - 1 - i;  // the farthest row from i
  const int64_t nearest = i < 0 ? -i : (i >= n0 ? i - (n0 - 1) : 0);  // the first offset inside the plane
  T bound = limit;
  for (int64_t r0 = nearest; r0 <= reach; ++r0) {
    const T off0 = T(r0) * h0;
    const T c0 = off0 * off0;
    if (!(c0 < bound)) break;
    int64_t lo = k_lo, hi = k_hi;
    if (bound < infinity<T>()) {  // +1: a column on the rounding edge of the window stays in
      const T w = floor(sqrt(bound - c0) * inv_h2) + T(1);
      if (w < T(n2)) {
        const int64_t wi = static_cast<int64_t>(w);
        lo = x - wi > k_lo ? x - wi : k_lo;
        hi = x + wi < k_hi ? x + wi : k_hi;
      }
    }
    if (lo > hi) continue;  // the window misses the columns that can hold a value
    for (int side = 0; side < (r0 > 0 ? 2 : 1); ++side) {
      const int64_t j = side ? i + r0 : i - r0;
      if (j < 0 || j >= n0) continue;
      acc.row(d + j * rs, sq, lo, hi, c0);
      reads += hi - lo + 1 + kRowCost;
    }
    if (!tight_limit || (r0 & 1)) {
      const T best = acc.best();
      bound = best < bound ? best : bound;
    }
  }
  return acc.best();
}

// The distance from a squared distance; x is the voxel's linear index inside its (unbatched)
// image of `ndim` axes. A value still +inf means the image has no background voxel: then, like
// scipy.ndimage.distance_transform_edt, the distance is to a virtual background voxel at index
// (-1, 0, ..., 0).
template <typename T>
MEDFAST_HOST_DEVICE T finish(T d2, int64_t x, int ndim, const int64_t* size, const T* spacing) {
#if !defined(__CUDACC__) && !defined(__HIPCC__)
  using std::sqrt;
#endif
  if (d2 < infinity<T>()) return sqrt(d2);
  T acc = T(0);
  for (int a = ndim - 1; a >= 0; --a) {
    const int64_t i = x % size[a];
    x /= size[a];
    const T c = T(a == 0 ? i + 1 : i) * spacing[a];
    acc += c * c;
  }
  return sqrt(acc);
}

// Surface voxels of a mask (scipy's binary_erosion with the face-connected cross and background
// outside the image, as MONAI's get_mask_edges): a set voxel is interior when its 2 x ndim face
// neighbours are all set. c: the voxel (0 or 1); l, r, a, b, e, f: its neighbours along the three axes
// (0 for one outside the image; in 2D pass a and b twice). 1 on a surface voxel.
MEDFAST_HOST_DEVICE uint8_t surface_voxel(uint8_t c, uint8_t l, uint8_t r, uint8_t a, uint8_t b, uint8_t e,
                                          uint8_t f) {
  return c & static_cast<uint8_t>(~(l & r & a & b & e & f));
}

// Geometry of the lines along one axis of a contiguous (B, *spatial) tensor seen as
// (outer, n, inner): line l starts at (l / inner) * n * inner + l % inner, with stride inner.
struct Lines {
  int64_t outer, n, inner;
  MEDFAST_HOST_DEVICE int64_t count() const { return outer * inner; }
  MEDFAST_HOST_DEVICE int64_t start(int64_t l) const {
    const int64_t o = l / inner;
    return o * n * inner + (l - o * inner);
  }
};

}  // namespace medfast::distance

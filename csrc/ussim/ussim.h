// Ultrasound ray march: the arithmetic of ONE scanline (forward) and of its reverse scan (backward),
// shared by the CPU launcher (ussim_cpu.cpp) and the CUDA launcher (ussim_cuda.cu).
//
// Inputs of one ray (see medfast/ops/_ussim.py for the public description):
//   props  (D, H, W, K) channels-last property volume, K = 5: impedance Z [MRayl], attenuation alpha
//          [dB/cm/MHz], scatterer density rho, mean scatter amplitude mu, amplitude spread sigma.
//   coords (S, 3) voxel coordinates (axis 0, 1, 2 = D, H, W) of the S samples of the ray, evenly
//          spaced by dz along the ray.
//   noise  (N, 4) table (n_re, n_im, g n_re, g n_im) of a circular complex Gaussian n (a node's scatter
//          phase and amplitude) and its product with a standard Gaussian g (the node's amplitude
//          spread), indexed by a hash of the integer cell of the world-anchored scatter grid; the cell
//          coordinate of a sample is q = G * (p, 1) with G the 3x4 voxel -> scatter-grid affine (world mm
//          / cell size).
// Per sample i (all quantities trilinearly interpolated at p_i, background values outside):
//   R_i    = (Z_i - Z_{i-1}) / (Z_i + Z_{i-1})            (R_0 = 0)
//   u_i    = L(s_i, Z_i) - L(s_i, Z_{i-1}) - att * alpha_i   att = 2 f dz ln(10) / 20 (round trip)
//            L(a, b) = log(1 - R(a, b)^2); s_i = Z at the start of the monotone run of step i (see Run):
//            log(1 - R_i^2) for a run's first step, and a run loses L(start, end) in all
//   E_i    = exp(sum_{j < i} u_j)                           transmission down to sample i and back
//   N_i, M_i = the interpolated (n_re, n_im) and (g n_re, g n_im) table columns (sample_noise)
//   c_i    = sqrt(rho_i) * (mu_i N_i + sigma_i M_i)            (complex: c0 + i c1)
//   out_i  = E_i * (R_i, c0_i, c1_i)                         specular echo (real) and scatter echo (complex)
// Backward: with h_i = g0_i R_i + g1_i c0_i + g2_i c1_i and the suffix sums
//   W_i = sum_{k > i} h_k E_k, computed as (total - prefix) in double precision,
//   dL/dR_i = g0_i E_i (the echo),  dL/du_i = W_i: into Z_i, Z_{i-1} and the run's start s_i,
//   dL/dalpha_i = -att W_i, etc.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/macros.h"

// Full unroll of the 8-corner loops (the corner selects fold to constants).
#if defined(__CUDACC__) || defined(__HIPCC__)
#define USSIM_UNROLL8 _Pragma("unroll")
#else
#define USSIM_UNROLL8 _Pragma("GCC unroll 8")
#endif

namespace medfast::ussim {

constexpr int kProps = 5;
// Channels interpolated with sharpened weights: the impedance and the attenuation. A coarse volume's
// interface is then a step in both, so the echo at a bone or air surface is not weakened beforehand by
// the attenuation behind it (trilinear attenuation ramped up over the half voxel in front of the
// surface: -2.7 dB at 1 mm voxels, -5.5 dB at 2 mm). Density and amplitude stay trilinear.
constexpr int kSharpProps = 2;
// Table row: n_re, n_im, g n_re, g n_im. The spread term is stored as the per-node product g n, not g: the
// interpolated product of two interpolated fields (g and n with the same weights) correlates as rho^2 where
// N correlates as rho, so the per-depth scatter gain (medfast/ultrasound/_speckle.py, made for rho) left
// the spread part's mean intensity 1-2 dB low, varying with the line spacing and depth. M interpolated
// from i.i.d. node values correlates exactly as N, and is uncorrelated with it (E g = 0).
constexpr int kNoise = 4;
constexpr double kMinImpedance = 1e-4;
constexpr double kMinTransmission = 1e-12;

// Geometry and physics constants of one call (plain data: copied to the GPU by value).
struct Params {
  int64_t D, H, W;      // volume size
  int64_t S;            // samples per ray
  int64_t noise_mask;   // table rows - 1 (a power of two minus one, < 2^31)
  uint64_t seed;
  double G[12];         // voxel (d, h, w, 1) -> scatter-grid cell coordinates, row-major 3x4
  double att;           // log-amplitude loss per sample per unit alpha (round trip)
  double bg[kProps];    // properties outside the volume
  double sharp[3];      // >= 1, per voxel axis: steepness of the impedance interpolation (1 = trilinear)
  // Volume of each frame: volume_index[b] (V volumes of one grid, any number of frames each), or
  // nullptr: frame b reads volume 0 if there is one volume, else volume b. Host or device memory as
  // the call; the index is validated before the call and clamped to [0, V) here (memory safety).
  const int64_t* volume_index;
  int64_t V;
};

// The volume that frame b of a call reads (see Params::volume_index).
MEDFAST_HOST_DEVICE int64_t frame_volume(const Params& P, int64_t b) {
  if (P.volume_index == nullptr) return P.V == 1 ? 0 : b;
  const int64_t v = P.volume_index[b];
  return v < 0 ? 0 : (v >= P.V ? P.V - 1 : v);
}

// Sharpened interpolation weight of the impedance channel: clamp((t - 1/2) k + 1/2, 0, 1), so a jump
// between two voxels becomes a step of width 1/k voxel (a sharp interface, as in the tissue, instead
// of a ramp over a whole voxel); k = 1 is linear interpolation. Each voxel axis has its own k (Params::sharp),
// so the step is about as wide in mm across the fine axes of an anisotropic volume as across its thick one.
template <typename A>
MEDFAST_HOST_DEVICE A sharpen(A t, double k, A* slope) {
  const A u = (t - A(0.5)) * A(k) + A(0.5);
  const bool inside = u > A(0) && u < A(1);
  *slope = inside ? A(k) : A(0);
  return u <= A(0) ? A(0) : (u >= A(1) ? A(1) : u);
}

// Scatter-grid cell -> noise-table row: a 32-bit key (the xor of the three wrapped products of the
// cell indices with odd constants and of the seed) through a full-avalanche 32-bit finalizer (Chris
// Wellons' "lowbias32", a bijection of uint32), masked to the table size. 32-bit integer arithmetic
// throughout, so the CPU AVX2 march hashes the 8 corners of 8 samples with 32-bit vector multiplies
// (ussim_cpu_avx2.cpp) and the GPU with native 32-bit multiplies.
constexpr uint32_t kCellMul0 = 0x9E3779B1u, kCellMul1 = 0x85EBCA77u, kCellMul2 = 0xC2B2AE3Du;

MEDFAST_HOST_DEVICE uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

MEDFAST_HOST_DEVICE uint32_t seed32(const Params& P) {
  return static_cast<uint32_t>(P.seed) ^ static_cast<uint32_t>(P.seed >> 32);
}

MEDFAST_HOST_DEVICE int64_t cell_row(int64_t a, int64_t b, int64_t c, const Params& P) {
  const uint32_t key = static_cast<uint32_t>(a) * kCellMul0 ^ static_cast<uint32_t>(b) * kCellMul1 ^
                       static_cast<uint32_t>(c) * kCellMul2 ^ seed32(P);
  return static_cast<int64_t>(hash32(key) & static_cast<uint32_t>(P.noise_mask));
}

// The table rows of the 8 corners of scatter-grid cell (c0, c1, c2), in corner order (corner = 4 a +
// 2 b + e); the same rows as cell_row (unsigned products wrap: (c + 1) K = c K + K), without branches.
MEDFAST_HOST_DEVICE void noise_corner_rows(const float* table, const Params& P, int64_t c0, int64_t c1, int64_t c2,
                                           const float** rows) {
  const uint32_t a0 = static_cast<uint32_t>(c0) * kCellMul0, a1 = a0 + kCellMul0;
  const uint32_t b0 = static_cast<uint32_t>(c1) * kCellMul1, b1 = b0 + kCellMul1;
  const uint32_t e0 = static_cast<uint32_t>(c2) * kCellMul2 ^ seed32(P), e1 = (static_cast<uint32_t>(c2) * kCellMul2 + kCellMul2) ^ seed32(P);
  const uint32_t mask = static_cast<uint32_t>(P.noise_mask);
  USSIM_UNROLL8
  for (int corner = 0; corner < 8; ++corner) {
    const uint32_t h = hash32(((corner & 4) ? a1 : a0) ^ ((corner & 2) ? b1 : b0) ^ ((corner & 1) ? e1 : e0));
    rows[corner] = table + static_cast<int64_t>(h & mask) * kNoise;
  }
}

// The 8 x K corner values of the voxel cell (i0, j0, k0) of a ray's last sample. Rays step ~10 samples
// per voxel, so a march that keeps one (CPU launcher) loads each cell once; the values (and so the
// results) are the same as without it.
template <typename A>
struct CellCache {
  int64_t i0, j0, k0;
  bool valid;
  A val[8][kProps];
};

// The 8 corner rows of the scatter-grid cell of the last sample (same idea as CellCache).
template <typename A>
struct NoiseCache {
  int64_t c0, c1, c2;
  bool valid;
  A val[8][kNoise];
};

// Voxel positions are clamped to +-kFarVoxel (NaN to -kFarVoxel) before their integer cast: far outside any
// volume (background values, no gradient), and no float -> int overflow (UB on the CPU; on the GPU a
// saturated index made i0 + 1 overflow and read out of bounds).
constexpr double kFarVoxel = 1e12;

template <typename A>
MEDFAST_HOST_DEVICE A clamp_voxel(A x) {
  return x >= A(-kFarVoxel) ? (x <= A(kFarVoxel) ? x : A(kFarVoxel)) : A(-kFarVoxel);
}

// Whether all 8 corners of voxel cell (i0, j0, k0) lie inside the volume.
MEDFAST_HOST_DEVICE bool cell_inside(const Params& P, int64_t i0, int64_t j0, int64_t k0) {
  return i0 >= 0 && j0 >= 0 && k0 >= 0 && i0 < P.D - 1 && j0 < P.H - 1 && k0 < P.W - 1;
}

template <typename T, typename A>
MEDFAST_HOST_DEVICE void load_cell(const T* vol, const Params& P, int64_t i0, int64_t j0, int64_t k0,
                                   A (*val)[kProps]) {
  const bool all_in = cell_inside(P, i0, j0, k0);
  USSIM_UNROLL8
  for (int corner = 0; corner < 8; ++corner) {
    const int a = corner >> 2, b = (corner >> 1) & 1, e = corner & 1;
    const int64_t i = i0 + a, j = j0 + b, k = k0 + e;
    const bool in = all_in || (i >= 0 && j >= 0 && k >= 0 && i < P.D && j < P.H && k < P.W);
    const T* src = in ? vol + ((i * P.H + j) * P.W + k) * kProps : nullptr;
    for (int c = 0; c < kProps; ++c) val[corner][c] = in ? static_cast<A>(src[c]) : static_cast<A>(P.bg[c]);
  }
}

// Trilinear value (and gradient w.r.t. the voxel position, if grad != nullptr) of the K property
// channels at voxel position (d, h, w). grad is K x 3 row-major. cache: optional CellCache.
template <typename T, typename A>
MEDFAST_HOST_DEVICE void sample_props(const T* vol, const Params& P, A d, A h, A w, A* v, A* grad,
                                      CellCache<A>* cache = nullptr) {
  d = clamp_voxel(d), h = clamp_voxel(h), w = clamp_voxel(w);
  const A fd0 = floor(d), fh0 = floor(h), fw0 = floor(w);
  const int64_t i0 = static_cast<int64_t>(fd0), j0 = static_cast<int64_t>(fh0), k0 = static_cast<int64_t>(fw0);
  const A td = d - fd0, th = h - fh0, tw = w - fw0;
  A md, mh, mw;  // sharpened fractions (impedance channel) and their slopes
  const A zd = sharpen<A>(td, P.sharp[0], &md), zh = sharpen<A>(th, P.sharp[1], &mh),
          zw = sharpen<A>(tw, P.sharp[2], &mw);
  for (int c = 0; c < kProps; ++c) {
    v[c] = A(0);
    if (grad) grad[3 * c] = grad[3 * c + 1] = grad[3 * c + 2] = A(0);
  }
  A local[8][kProps];
  A(*val)[kProps] = local;
  if (cache) {
    if (!cache->valid || cache->i0 != i0 || cache->j0 != j0 || cache->k0 != k0) {
      load_cell<T, A>(vol, P, i0, j0, k0, cache->val);
      cache->i0 = i0;
      cache->j0 = j0;
      cache->k0 = k0;
      cache->valid = true;
    }
    val = cache->val;
  } else {
    load_cell<T, A>(vol, P, i0, j0, k0, local);
  }
  USSIM_UNROLL8
  for (int corner = 0; corner < 8; ++corner) {
    const int a = corner >> 2, b = (corner >> 1) & 1, e = corner & 1;
    const A wd = a ? td : A(1) - td, wh = b ? th : A(1) - th, ww = e ? tw : A(1) - tw;
    const A wt = wd * wh * ww;
    const A sd = a ? A(1) : A(-1), sh = b ? A(1) : A(-1), se = e ? A(1) : A(-1);
    const A ud = a ? zd : A(1) - zd, uh = b ? zh : A(1) - zh, uw = e ? zw : A(1) - zw;
    for (int c = 0; c < kSharpProps; ++c) {  // impedance, attenuation: sharpened weights
      const A x = val[corner][c];
      v[c] += ud * uh * uw * x;
      if (grad) {
        grad[3 * c] += sd * md * uh * uw * x;
        grad[3 * c + 1] += ud * sh * mh * uw * x;
        grad[3 * c + 2] += ud * uh * se * mw * x;
      }
    }
    for (int c = kSharpProps; c < kProps; ++c) {
      const A x = val[corner][c];
      v[c] += wt * x;
      if (grad) {
        grad[3 * c] += sd * wh * ww * x;
        grad[3 * c + 1] += wd * sh * ww * x;
        grad[3 * c + 2] += wd * wh * se * x;
      }
    }
  }
}

// Voxel cell (i0, j0, k0) = floor of position (d, h, w) and the 8 interpolation weights of its corners
// (corner order 4 a + 2 b + e as in sample_props): wt trilinear, wz sharpened (the kSharpProps channels).
template <typename A>
MEDFAST_HOST_DEVICE void corner_weights_at(const Params& P, A d, A h, A w, int64_t* cell, A* wt, A* wz) {
  d = clamp_voxel(d), h = clamp_voxel(h), w = clamp_voxel(w);
  const A fd0 = floor(d), fh0 = floor(h), fw0 = floor(w);
  cell[0] = static_cast<int64_t>(fd0);
  cell[1] = static_cast<int64_t>(fh0);
  cell[2] = static_cast<int64_t>(fw0);
  const A td = d - fd0, th = h - fh0, tw = w - fw0;
  A md, mh, mw;
  const A zd = sharpen<A>(td, P.sharp[0], &md), zh = sharpen<A>(th, P.sharp[1], &mh),
          zw = sharpen<A>(tw, P.sharp[2], &mw);
  USSIM_UNROLL8
  for (int corner = 0; corner < 8; ++corner) {
    const int a = corner >> 2, b = (corner >> 1) & 1, e = corner & 1;
    wt[corner] = (a ? td : A(1) - td) * (b ? th : A(1) - th) * (e ? tw : A(1) - tw);
    wz[corner] = (a ? zd : A(1) - zd) * (b ? zh : A(1) - zh) * (e ? zw : A(1) - zw);
  }
}

// Adds g[K] * trilinear weights of position (d, h, w) into the property gradient volume
// (background corners are constants: no gradient). add(ptr, value) does the accumulation.
template <typename A, typename Add, typename G>
MEDFAST_HOST_DEVICE void scatter_props(G* gvol, const Params& P, A d, A h, A w, const A* g, Add add,
                                       int64_t i_lo = 0, int64_t i_hi = INT64_MAX) {
  // [i_lo, i_hi): only the corners in this range of the first volume axis (a slab of the volume).
  const int64_t i_d = static_cast<int64_t>(floor(clamp_voxel(d)));
  if (i_d + 1 < i_lo || i_d >= i_hi) return;
  int64_t cell[3];
  A wt[8], wz[8];
  corner_weights_at<A>(P, d, h, w, cell, wt, wz);
  for (int corner = 0; corner < 8; ++corner) {
    const int a = corner >> 2, b = (corner >> 1) & 1, e = corner & 1;
    const int64_t i = cell[0] + a, j = cell[1] + b, k = cell[2] + e;
    if (i < 0 || j < 0 || k < 0 || i >= P.D || j >= P.H || k >= P.W || i < i_lo || i >= i_hi) continue;
    G* dst = gvol + ((i * P.H + j) * P.W + k) * kProps;
    for (int c = 0; c < kProps; ++c) add(dst + c, static_cast<G>((c < kSharpProps ? wz : wt)[corner] * g[c]));
  }
}

// Makes the cache hold the 8 corner rows of scatter-grid cell (c0, c1, c2) (a no-op if it does).
template <typename A>
MEDFAST_HOST_DEVICE void noise_cell(const float* table, const Params& P, int64_t c0, int64_t c1, int64_t c2,
                                    NoiseCache<A>& cache) {
  if (cache.valid && cache.c0 == c0 && cache.c1 == c1 && cache.c2 == c2) return;
  // A step of one cell along one axis (the usual miss) shares 4 corners with the cached cell.
  int keep_mask = 0, keep_bit = 0;
  if (cache.valid) {
    const int64_t d0 = c0 - cache.c0, d1 = c1 - cache.c1, d2 = c2 - cache.c2;
    const int64_t a0 = d0 < 0 ? -d0 : d0, a1 = d1 < 0 ? -d1 : d1, a2 = d2 < 0 ? -d2 : d2;
    if (a0 + a1 + a2 == 1) {
      keep_mask = a0 ? 4 : (a1 ? 2 : 1);
      keep_bit = (d0 + d1 + d2) > 0 ? 0 : keep_mask;  // corners of the new cell that the old one had
    }
  }
  A old[8][kNoise];
  if (keep_mask)
    for (int corner = 0; corner < 8; ++corner)
      for (int c = 0; c < kNoise; ++c) old[corner][c] = cache.val[corner][c];
  cache.c0 = c0;
  cache.c1 = c1;
  cache.c2 = c2;
  cache.valid = true;
  MEDFAST_UNROLL
  for (int corner = 0; corner < 8; ++corner) {
    if (keep_mask && (corner & keep_mask) == keep_bit) {
      for (int c = 0; c < kNoise; ++c) cache.val[corner][c] = old[corner ^ keep_mask][c];
      continue;
    }
    const int a = corner >> 2, b = (corner >> 1) & 1, e = corner & 1;
    const float* row = table + cell_row(c0 + a, c1 + b, c2 + e, P) * kNoise;
    for (int c = 0; c < kNoise; ++c) cache.val[corner][c] = static_cast<A>(row[c]);
  }
}

// World-anchored scatter noise: trilinear interpolation of the hashed table values at the
// scatter-grid position of voxel position p, divided by the norm of the interpolation weights so
// that the field has unit variance everywhere (a stationary Gaussian field: fully developed speckle
// statistics do not depend on where the samples fall in the cells). n[kNoise] values (N re, im, M re,
// im) and, if dn != nullptr, d n / d p (kNoise x 3 row-major). A one-row table gives that row everywhere.
template <typename A>
MEDFAST_HOST_DEVICE void sample_noise(const float* table, const Params& P, A d, A h, A w, A* n, A* dn,
                                      NoiseCache<A>* cache = nullptr) {
  if (P.noise_mask == 0) {  // a one-row table: the same scatterer value everywhere (speckle off)
    for (int c = 0; c < kNoise; ++c) n[c] = static_cast<A>(table[c]);
    if (dn)
      for (int k = 0; k < 3 * kNoise; ++k) dn[k] = A(0);
    return;
  }
  const double q[3] = {clamp_voxel(P.G[0] * d + P.G[1] * h + P.G[2] * w + P.G[3]),
                       clamp_voxel(P.G[4] * d + P.G[5] * h + P.G[6] * w + P.G[7]),
                       clamp_voxel(P.G[8] * d + P.G[9] * h + P.G[10] * w + P.G[11])};
  const double f0 = floor(q[0]), f1 = floor(q[1]), f2 = floor(q[2]);
  const int64_t c0 = static_cast<int64_t>(f0), c1 = static_cast<int64_t>(f1), c2 = static_cast<int64_t>(f2);
  const A t0 = static_cast<A>(q[0] - f0), t1 = static_cast<A>(q[1] - f1), t2 = static_cast<A>(q[2] - f2);
  A N[kNoise], dN[kNoise][3], s2 = A(0), ds2[3] = {A(0), A(0), A(0)};
  for (int c = 0; c < kNoise; ++c) {
    N[c] = A(0);
    dN[c][0] = dN[c][1] = dN[c][2] = A(0);
  }
  A local[8][kNoise];
  A(*rows)[kNoise] = local;
  if (cache) {
    noise_cell<A>(table, P, c0, c1, c2, *cache);
    rows = cache->val;
  } else {
    MEDFAST_UNROLL
    for (int corner = 0; corner < 8; ++corner) {
      const float* row = table + cell_row(c0 + (corner >> 2), c1 + ((corner >> 1) & 1), c2 + (corner & 1), P) * kNoise;
      for (int c = 0; c < kNoise; ++c) local[corner][c] = static_cast<A>(row[c]);
    }
  }
  USSIM_UNROLL8
  for (int corner = 0; corner < 8; ++corner) {
    const int a = corner >> 2, b = (corner >> 1) & 1, e = corner & 1;
    const A w0 = a ? t0 : A(1) - t0, w1 = b ? t1 : A(1) - t1, w2 = e ? t2 : A(1) - t2;
    const A wt = w0 * w1 * w2;
    s2 += wt * wt;
    const A s0 = a ? A(1) : A(-1), s1 = b ? A(1) : A(-1), sg = e ? A(1) : A(-1);
    const A dw[3] = {s0 * w1 * w2, w0 * s1 * w2, w0 * w1 * sg};
    if (dn)
      for (int j = 0; j < 3; ++j) ds2[j] += A(2) * wt * dw[j];
    for (int c = 0; c < kNoise; ++c) {
      const A val = rows[corner][c];
      N[c] += wt * val;
      if (dn)
        for (int j = 0; j < 3; ++j) dN[c][j] += dw[j] * val;
    }
  }
  const A inv = A(1) / sqrt(s2);  // s2 >= 1/8
  for (int c = 0; c < kNoise; ++c) n[c] = N[c] * inv;
  if (dn) {
    A dq[kNoise][3];
    const A half_inv3 = A(0.5) * inv * inv * inv;
    for (int c = 0; c < kNoise; ++c)
      for (int j = 0; j < 3; ++j) dq[c][j] = dN[c][j] * inv - N[c] * ds2[j] * half_inv3;
    for (int c = 0; c < kNoise; ++c)
      for (int j = 0; j < 3; ++j)
        dn[3 * c + j] = dq[c][0] * A(P.G[j]) + dq[c][1] * A(P.G[4 + j]) + dq[c][2] * A(P.G[8 + j]);
  }
}

MEDFAST_HOST_DEVICE double clamp_z(double z) { return z < kMinImpedance ? kMinImpedance : z; }

// Per-sample quantities shared by forward and backward.
template <typename A>
struct Sample {
  A v[kProps];
  A n[kNoise];  // N re, im, M re, im (sample_noise)
  A Z, R, sq;   // sq = sqrt(max(rho, 0))
  A m[2];       // mu N + sigma M: the complex scatter amplitude
  A c[2];       // sq m: the scatter echo before the transmission
  bool z_clamped;
};

template <typename T, typename A>
MEDFAST_HOST_DEVICE void eval_sample(const T* vol, const float* table, const Params& P, const A* p, A Zprev, bool first,
                                     Sample<A>& s, A* dv, A* dn, CellCache<A>* cell = nullptr,
                                     NoiseCache<A>* ncache = nullptr) {
  sample_props<T, A>(vol, P, p[0], p[1], p[2], s.v, dv, cell);
  sample_noise<A>(table, P, p[0], p[1], p[2], s.n, dn, ncache);
  s.z_clamped = s.v[0] < A(kMinImpedance);
  s.Z = s.z_clamped ? A(kMinImpedance) : s.v[0];
  s.R = first ? A(0) : (s.Z - Zprev) / (s.Z + Zprev);
  const A rho = s.v[2] > A(0) ? s.v[2] : A(0);
  s.sq = sqrt(rho);
  s.m[0] = s.v[3] * s.n[0] + s.v[4] * s.n[2];
  s.m[1] = s.v[3] * s.n[1] + s.v[4] * s.n[3];
  s.c[0] = s.sq * s.m[0];
  s.c[1] = s.sq * s.m[1];
}

// h of the backward (see the top): the echo gradient (g0, g1, g2) dotted with the echo before E.
template <typename A>
MEDFAST_HOST_DEVICE A echo_dot(const Sample<A>& s, A g0, A g1, A g2) {
  return g0 * s.R + g1 * s.c[0] + g2 * s.c[1];
}

// The scatter echo's gradients at a sample with transmission E and echo gradient (g1, g2): w.r.t. the
// density, mu and sigma (gv[2], gv[3], gv[4]) and, if gn != nullptr, w.r.t. the kNoise noise values.
template <typename A>
MEDFAST_HOST_DEVICE void scatter_grads(const Sample<A>& s, A E, A g1, A g2, A* gv, A* gn) {
  const A e1 = E * g1, e2 = E * g2;
  gv[2] = s.sq > A(0) ? (e1 * s.m[0] + e2 * s.m[1]) * A(0.5) / s.sq : A(0);
  const A q1 = e1 * s.sq, q2 = e2 * s.sq;  // dL/dm
  gv[3] = q1 * s.n[0] + q2 * s.n[1];
  gv[4] = q1 * s.n[2] + q2 * s.n[3];
  if (gn) {
    gn[0] = q1 * s.v[3];
    gn[1] = q2 * s.v[3];
    gn[2] = q1 * s.v[4];
    gn[3] = q2 * s.v[4];
  }
}

// exp / log in the accumulation type (expf / logf for float: no round trip through double).
MEDFAST_HOST_DEVICE float exp_a(float x) { return expf(x); }
MEDFAST_HOST_DEVICE double exp_a(double x) { return exp(x); }
MEDFAST_HOST_DEVICE float log_a(float x) { return logf(x); }
MEDFAST_HOST_DEVICE double log_a(double x) { return log(x); }

template <typename A>
MEDFAST_HOST_DEVICE A log_transmission(A R) {
  const A t = A(1) - R * R;
  return log_a(t > A(kMinTransmission) ? t : A(kMinTransmission));
}

// Transmission through an interface that the samples divide. A sharpened interface (a ramp of ~2 samples) puts
// samples inside the step, and summing log(1 - R^2) over its pieces loses far less than the step (the losses are
// quadratic in the pieces: 40-60 % of a bone surface's -3.45 dB). So the loss is taken per monotone RUN of
// samples: a run is a maximal sequence of steps Z_{i-1} -> Z_i of one strict direction, s its start impedance
// (Z before its first step), and step i loses L(s, Z_i) - L(s, Z_{i-1}) with L(a, b) = log(1 - R(a, b)^2): the
// run telescopes to L(s, Z_end), the step's loss however the samples fall. A run's first step (s = Z_{i-1})
// loses log(1 - R_i^2), as before; a flat step (Z_i = Z_{i-1}) ends a run and loses nothing.
template <typename A>
MEDFAST_HOST_DEVICE int step_dir(A zprev, A z) {
  return z > zprev ? 1 : (z < zprev ? -1 : 0);
}

// L(a, b) = log(1 - R(a, b)^2), R(a, b) = (b - a) / (b + a), and its partial derivatives (0 where clamped).
template <typename A>
MEDFAST_HOST_DEVICE A log_t2(A a, A b) {
  return log_transmission<A>((b - a) / (b + a));
}

template <typename A>
MEDFAST_HOST_DEVICE void log_t2_grad(A a, A b, A* da, A* db) {
  const A sum = a + b, R = (b - a) / sum;
  const bool live = A(1) - R * R > A(kMinTransmission);
  *da = live ? (b - a) / (a * sum) : A(0);
  *db = live ? (a - b) / (b * sum) : A(0);
}

// A run's later step (start impedance s): L(s, z) - L(s, zprev), as one log of the ratio of the two transmissions
// where neither is clamped (half the logs of the difference: the AVX2 march spends ~1 ns per sample on them).
template <typename A>
MEDFAST_HOST_DEVICE A run_step_loss(A s, A zprev, A z) {
  const A r1 = (z - s) / (z + s), r0 = (zprev - s) / (zprev + s);
  const A t1 = A(1) - r1 * r1, t0 = A(1) - r0 * r0;
  return t1 > A(kMinTransmission) && t0 > A(kMinTransmission) ? log_a(t1 / t0)
                                                               : log_t2<A>(s, z) - log_t2<A>(s, zprev);
}

// The run state along a ray: start impedance zs (at sample `start`), the direction of the last step, and
// whether the last step began a run.
template <typename A>
struct Run {
  A zs;
  int dir;
  int64_t start;
  bool first;
};

// Step i's log transmission (R = R_i of the step, zprev / z its impedances), updating the run; sample 0: no step.
template <typename A>
MEDFAST_HOST_DEVICE A run_log_transmission(Run<A>& run, int64_t i, A zprev, A z, A R) {
  if (i == 0) {
    run.zs = z;
    run.dir = 0;
    run.start = 0;
    run.first = true;
    return log_transmission<A>(R);
  }
  const int d = step_dir<A>(zprev, z);
  run.first = !(d != 0 && d == run.dir);
  if (run.first) {
    run.zs = zprev;
    run.start = i - 1;
  }
  run.dir = d;
  return run.first ? log_transmission<A>(R) : run_step_loss<A>(run.zs, zprev, z);
}

// dL/d(Z_i, Z_{i-1}, s) of step i's log transmission, for dL/du_i = W (after run_log_transmission of step i).
template <typename A>
MEDFAST_HOST_DEVICE void run_transmission_grads(const Run<A>& run, A zprev, A z, A W, A* gz, A* gzprev, A* gs) {
  if (run.first) {
    A da, db;
    log_t2_grad<A>(zprev, z, &da, &db);
    *gz = W * db;
    *gzprev = W * da;
    *gs = A(0);
  } else {
    A da1, db1, da0, db0;
    log_t2_grad<A>(run.zs, z, &da1, &db1);
    log_t2_grad<A>(run.zs, zprev, &da0, &db0);
    *gz = W * db1;
    *gzprev = -W * db0;
    *gs = W * (da1 - da0);
  }
}

// Forward of one ray with the sample positions from pos(i, p) (p: 3 voxel coordinates) and the
// echoes handed to emit(i, specular, scatter re, scatter im).
// Cached: keep the corner values of the last voxel and scatter cells (CellCache, NoiseCache; the
// CPU launcher; same results).
template <typename T, typename A, bool Cached = false, typename Pos, typename Emit>
MEDFAST_HOST_DEVICE void march_ray_fn(const T* vol, const float* table, const Params& P, Pos pos, Emit emit) {
  double logT = 0.0;
  A Zprev = A(1);
  CellCache<A> cell{};  // {}: the valid flag starts false (and no maybe-uninitialized warnings)
  NoiseCache<A> ncache{};
  cell.valid = ncache.valid = false;
  Run<A> run{};
  for (int64_t i = 0; i < P.S; ++i) {
    A p[3];
    pos(i, p);
    Sample<A> s;
    eval_sample<T, A>(vol, table, P, p, Zprev, i == 0, s, nullptr, nullptr, Cached ? &cell : nullptr,
                      Cached ? &ncache : nullptr);
    const A E = exp_a(static_cast<A>(logT));
    emit(i, E * s.R, E * s.c[0], E * s.c[1]);
    logT += static_cast<double>(run_log_transmission<A>(run, i, Zprev, s.Z, s.R)) - P.att * static_cast<double>(s.v[1]);
    Zprev = s.Z;
  }
}

// Forward of one ray: coords (S, 3), out (S, 3).
template <typename T, typename A>
MEDFAST_HOST_DEVICE void march_ray(const T* vol, const float* table, const Params& P, const T* coords, T* out) {
  march_ray_fn<T, A>(
      vol, table, P,
      [=](int64_t i, A* p) {
        p[0] = static_cast<A>(coords[3 * i]);
        p[1] = static_cast<A>(coords[3 * i + 1]);
        p[2] = static_cast<A>(coords[3 * i + 2]);
      },
      [=](int64_t i, A e0, A e1, A e2) {
        out[3 * i] = static_cast<T>(e0);
        out[3 * i + 1] = static_cast<T>(e1);
        out[3 * i + 2] = static_cast<T>(e2);
      });
}

// Forward of one scanline made of E sub-rays with evenly spaced samples (sample i of sub-ray e at
// start[e] + i * step, start (E, 3), step (3,)), summed over the sub-rays with the per-sample
// weights w (E, S, 3): out[c * out_stride + i] = sum_e w[e, i, c] * echo_e,i,c (channel-major).
// The sample positions are those of march_ray with coords = start + i * step.
template <typename T, typename A, bool Cached = false>
MEDFAST_HOST_DEVICE void march_line(const T* vol, const float* table, const Params& P, const T* start, const T* step,
                                    const T* w, int64_t E, T* out, int64_t out_stride) {
  const A st[3] = {static_cast<A>(step[0]), static_cast<A>(step[1]), static_cast<A>(step[2])};
  for (int64_t e = 0; e < E; ++e) {
    const A o[3] = {static_cast<A>(start[3 * e]), static_cast<A>(start[3 * e + 1]), static_cast<A>(start[3 * e + 2])};
    const T* we = w + e * P.S * 3;
    march_ray_fn<T, A, Cached>(
        vol, table, P,
        [&](int64_t i, A* p) {
          const A fi = static_cast<A>(i);
          p[0] = o[0] + fi * st[0];
          p[1] = o[1] + fi * st[1];
          p[2] = o[2] + fi * st[2];
        },
        [&](int64_t i, A e0, A e1, A e2) {
          const A v0 = static_cast<A>(we[3 * i]) * e0, v1 = static_cast<A>(we[3 * i + 1]) * e1,
                  v2 = static_cast<A>(we[3 * i + 2]) * e2;
          if (e == 0) {
            out[i] = static_cast<T>(v0);
            out[out_stride + i] = static_cast<T>(v1);
            out[2 * out_stride + i] = static_cast<T>(v2);
          } else {
            out[i] += static_cast<T>(v0);
            out[out_stride + i] += static_cast<T>(v1);
            out[2 * out_stride + i] += static_cast<T>(v2);
          }
        });
  }
}

// Backward of one ray. grad (S, 3) is dL/d out. Writes gvals (S, K) = dL/d sampled property values
// (if gvals != nullptr) and gcoords (S, 3) = dL/d coords (if gcoords != nullptr).
// Cached: as in march_ray_fn (CPU launcher; same results).
template <typename T, typename A, bool Cached = false>
MEDFAST_HOST_DEVICE void march_ray_backward(const T* vol, const float* table, const Params& P, const T* coords,
                                            const T* grad, T* gvals, T* gcoords) {
  CellCache<A> cell{};  // {}: the valid flag starts false (and no maybe-uninitialized warnings)
  NoiseCache<A> ncache{};
  cell.valid = ncache.valid = false;
  // Pass 1: total of h_i E_i.
  double logT = 0.0, total = 0.0;
  A Zprev = A(1);
  Run<A> run{};
  for (int64_t i = 0; i < P.S; ++i) {
    A p[3] = {static_cast<A>(coords[3 * i]), static_cast<A>(coords[3 * i + 1]), static_cast<A>(coords[3 * i + 2])};
    Sample<A> s;
    eval_sample<T, A>(vol, table, P, p, Zprev, i == 0, s, nullptr, nullptr, Cached ? &cell : nullptr,
                      Cached ? &ncache : nullptr);
    const A g0 = static_cast<A>(grad[3 * i]), g1 = static_cast<A>(grad[3 * i + 1]), g2 = static_cast<A>(grad[3 * i + 2]);
    const A h = echo_dot(s, g0, g1, g2);
    total += static_cast<double>(h) * exp(logT);
    logT += static_cast<double>(run_log_transmission<A>(run, i, Zprev, s.Z, s.R)) - P.att * static_cast<double>(s.v[1]);
    Zprev = s.Z;
  }
  // Pass 2: per-sample gradients; the impedance gradient of sample i - 1 is completed at sample i. The
  // transmission of a run's later steps also depends on its start sample's impedance (written by then): that
  // term is summed over the run and added to the start sample's outputs when the run ends.
  logT = 0.0;
  double prefix = 0.0;
  Zprev = A(1);
  run = Run<A>{};
  A gv_prev[kProps] = {}, dv_prev[3 * kProps] = {}, gp_prev[3] = {};  // read from sample 1 on
  bool clamped_prev = false;
  A run_acc = A(0), run_dz[3] = {A(0), A(0), A(0)};  // the run start's pending impedance term, its dZ/dp
  bool run_clamped = false;
  auto flush_run = [&](int64_t r) {
    if (run_acc == A(0) || run_clamped) return;
    if (gvals) gvals[r * kProps] = static_cast<T>(static_cast<A>(gvals[r * kProps]) + run_acc);
    if (gcoords)
      for (int j = 0; j < 3; ++j)
        gcoords[3 * r + j] = static_cast<T>(static_cast<A>(gcoords[3 * r + j]) + run_acc * run_dz[j]);
  };
  for (int64_t i = 0; i < P.S; ++i) {
    A p[3] = {static_cast<A>(coords[3 * i]), static_cast<A>(coords[3 * i + 1]), static_cast<A>(coords[3 * i + 2])};
    Sample<A> s;
    A dv[3 * kProps], dn[3 * kNoise];
    eval_sample<T, A>(vol, table, P, p, Zprev, i == 0, s, gcoords ? dv : nullptr, gcoords ? dn : nullptr,
                      Cached ? &cell : nullptr, Cached ? &ncache : nullptr);
    const A E = static_cast<A>(exp(logT));
    const A g0 = static_cast<A>(grad[3 * i]), g1 = static_cast<A>(grad[3 * i + 1]), g2 = static_cast<A>(grad[3 * i + 2]);
    const A h = echo_dot(s, g0, g1, g2);
    prefix += static_cast<double>(h) * exp(logT);
    const A Wsuf = static_cast<A>(total - prefix);  // sum over k > i of h_k E_k
    const int64_t run_start = run.start;
    const A u = run_log_transmission<A>(run, i, Zprev, s.Z, s.R);
    if (i > 0 && run.first) {  // the previous run ended at sample i - 1
      flush_run(run_start);
      run_acc = A(0);
      run_clamped = clamped_prev;
      for (int j = 0; j < 3; ++j) run_dz[j] = dv_prev[j];
    }
    A gv[kProps], gn[kNoise];
    gv[1] = -Wsuf * static_cast<A>(P.att);
    scatter_grads(s, E, g1, g2, gv, gn);
    gv[0] = A(0);
    if (i > 0) {
      const A gR = g0 * E;  // the echo R_i's
      const A den = s.Z + Zprev;
      const A dR_dZ = A(2) * Zprev / (den * den), dR_dZprev = A(-2) * s.Z / (den * den);
      A gz, gzprev, gs;  // the transmission's (dL/du_i = Wsuf)
      run_transmission_grads<A>(run, Zprev, s.Z, Wsuf, &gz, &gzprev, &gs);
      if (!s.z_clamped) gv[0] += gR * dR_dZ + gz;
      // Complete sample i - 1 (its Z entered R_i and u_i).
      if (!clamped_prev) gv_prev[0] += gR * dR_dZprev + gzprev;
      run_acc += gs;  // (0 for a run's first step: its start is sample i - 1, done above)
      if (gvals)
        for (int c = 0; c < kProps; ++c) gvals[(i - 1) * kProps + c] = static_cast<T>(gv_prev[c]);
      if (gcoords)
        for (int j = 0; j < 3; ++j) {
          A acc = gp_prev[j];
          for (int c = 0; c < kProps; ++c) acc += gv_prev[c] * dv_prev[3 * c + j];
          gcoords[3 * (i - 1) + j] = static_cast<T>(acc);
        }
    }
    // Noise part of the position gradient of sample i (final now).
    if (gcoords) {
      for (int j = 0; j < 3; ++j) {
        gp_prev[j] = A(0);
        for (int c = 0; c < kNoise; ++c) gp_prev[j] += gn[c] * dn[3 * c + j];
      }
      for (int k = 0; k < 3 * kProps; ++k) dv_prev[k] = dv[k];
    }
    for (int c = 0; c < kProps; ++c) gv_prev[c] = gv[c];
    clamped_prev = s.z_clamped;
    logT += static_cast<double>(u) - P.att * static_cast<double>(s.v[1]);
    Zprev = s.Z;
  }
  const int64_t last = P.S - 1;
  if (gvals)
    for (int c = 0; c < kProps; ++c) gvals[last * kProps + c] = static_cast<T>(gv_prev[c]);
  if (gcoords)
    for (int j = 0; j < 3; ++j) {
      A acc = gp_prev[j];
      for (int c = 0; c < kProps; ++c) acc += gv_prev[c] * dv_prev[3 * c + j];
      gcoords[3 * last + j] = static_cast<T>(acc);
    }
  flush_run(run.start);  // the last run (its start is before the last sample, or no term)
}

}  // namespace medfast::ussim

namespace medfast::ussim {

// Coherent IQ point-spread function of the simulator (medfast/ultrasound/simulate.py): an axial
// K-tap filter per channel along the samples, then a depth-dependent J-tap lateral filter across the
// lines. Both are linear with constant weights; their transposes (flip = true) give the backward.
// Each filter has two forms of ONE sum, same terms, same order, same roundings: the *_at functions
// give one output sample with the sum in a register (the CUDA kernels, one sample per thread: a sum
// kept in global memory would cost a load and a store per tap), and the *_row functions fill the
// sample range [s0, s1) of a row tap by tap, loops over s that the CPU launcher vectorises.

// Axial, one sample: sum_k h[k] x[s + k - K/2] (flip: x[s - k + K/2]) over the taps inside [0, S).
template <typename T, typename A>
MEDFAST_HOST_DEVICE T psf_axial_at(const T* x, const T* h, int64_t K, int64_t S, int64_t s, bool flip) {
  const int64_t half = K / 2;
  T acc = T(0);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t i = flip ? s + half - k : s + k - half;
    if (i >= 0 && i < S) acc = static_cast<T>(static_cast<A>(acc) + static_cast<A>(h[k]) * static_cast<A>(x[i]));
  }
  return acc;
}

// Lateral, one sample of line l: acc + sum_j w[j * S + s] y_{l + j - J/2}[s] (flip: y_{l - j + J/2}),
// y_m = y + m * line_stride, lines outside [0, L) left out.
template <typename T, typename A>
MEDFAST_HOST_DEVICE T psf_lateral_at(const T* y, int64_t line_stride, const T* w, int64_t J, int64_t L, int64_t S,
                                     int64_t l, int64_t s, bool flip, T acc) {
  const int64_t half = J / 2;
  for (int64_t j = 0; j < J; ++j) {
    const int64_t m = flip ? l - j + half : l + j - half;
    if (m < 0 || m >= L) continue;
    acc = static_cast<T>(static_cast<A>(acc) + static_cast<A>(w[j * S + s]) * static_cast<A>(y[m * line_stride + s]));
  }
  return acc;
}

// Axial: out[s] = sum_k h[k] x[s + k - K/2] (flip: x[s - k + K/2]), zero outside [0, S).
template <typename T, typename A>
MEDFAST_HOST_DEVICE void psf_axial_row(const T* x, const T* h, int64_t K, int64_t S, int64_t s0, int64_t s1, T* out,
                                       bool flip) {
  for (int64_t s = s0; s < s1; ++s) out[s] = T(0);
  const int64_t half = K / 2;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t off = flip ? half - k : k - half;  // input index = s + off
    const A hk = static_cast<A>(h[k]);
    const int64_t lo = s0 > -off ? s0 : -off, hi = s1 < S - off ? s1 : S - off;
    for (int64_t s = lo; s < hi; ++s) out[s] = static_cast<T>(static_cast<A>(out[s]) + hk * static_cast<A>(x[s + off]));
  }
}

// Lateral, one output row (line l): out[s] = sum_j w[j * S + s] y_{l + j - J/2}[s] (flip:
// y_{l - j + J/2}), with y_m = y + m * line_stride and lines outside [0, L) zero; accumulate: out +=.
template <typename T, typename A>
MEDFAST_HOST_DEVICE void psf_lateral_row(const T* y, int64_t line_stride, const T* w, int64_t J, int64_t L, int64_t S,
                                         int64_t l, int64_t s0, int64_t s1, T* out, bool flip, bool accumulate) {
  if (!accumulate)
    for (int64_t s = s0; s < s1; ++s) out[s] = T(0);
  const int64_t half = J / 2;
  for (int64_t j = 0; j < J; ++j) {
    const int64_t m = flip ? l - j + half : l + j - half;
    if (m < 0 || m >= L) continue;
    const T* ym = y + m * line_stride;
    const T* wj = w + j * S;
    for (int64_t s = s0; s < s1; ++s)
      out[s] = static_cast<T>(static_cast<A>(out[s]) + static_cast<A>(wj[s]) * static_cast<A>(ym[s]));
  }
}

}  // namespace medfast::ussim

// Warp-cooperative CUDA kernels of the ultrasound ray march (one warp per scanline or ray), kept apart
// from the launcher so that tests/simt can run the same code on the CPU: it compiles this header with
// the warp shuffles emulated by 32 fibers and compares the results with the CPU op.
// Needs: __global__, threadIdx / blockIdx / blockDim / gridDim, __shfl_{sync,up_sync,down_sync,
// xor_sync}, __ballot_sync, __ffs and atomicAdd (CUDA, or the emulation in tests/simt/simt.h).
#pragma once
#include "common/macros.h"
#include "ussim/ussim.h"

namespace medfast::ussim {

// Warp-cooperative line march: one warp per scanline; lane t evaluates sample base + t of each chunk
// of 32 (eval_sample from ussim.h), the impedance of the previous sample comes from the lane before
// (or the last lane of the previous chunk), and the transmission, a running sum of log losses along
// the ray, becomes a warp prefix scan in double with the chunk totals carried. The dependency chain
// of a line is 32x shorter than with one thread per line, which leaves most of the GPU idle at a few
// frames per call (each line then costs S sequential samples of memory latency).
constexpr unsigned kFullMask = 0xffffffffu;

// The monotone runs of the transmission (ussim.h, Run) across the 32 lanes of a chunk: lane t has step
// i = base + t (impedance z, the previous sample's z_prev). A step starts a run unless it continues the
// previous step's strict direction (the lane before, or the carry for lane 0); the run's start sample is
// the largest i - 1 of a run-starting step up to this lane (a warp max-scan), or the carried one.
template <typename A>
struct WarpRunCarry {
  A zs;           // impedance at the start of the run of the chunk's last step
  int dir;        // that step's direction
  int64_t start;  // the run's start sample
};

template <typename A>
__device__ void warp_run(int lane, int64_t i, A z_prev, A z, A z_carry, WarpRunCarry<A>& rc, bool* first, A* zs,
                         int64_t* start) {
  const int d = i == 0 ? 0 : step_dir<A>(z_prev, z);
  int dprev = __shfl_up_sync(kFullMask, d, 1);
  if (lane == 0) dprev = rc.dir;
  *first = i == 0 || !(d != 0 && d == dprev);
  int64_t r = *first ? (i == 0 ? int64_t(0) : i - 1) : int64_t(-1);
#pragma unroll
  for (int k = 1; k < 32; k <<= 1) {
    const int64_t n = __shfl_up_sync(kFullMask, r, k);
    if (lane >= k && n > r) r = n;
  }
  if (r < 0) r = rc.start;
  const int64_t base = i - lane;
  const A zl = __shfl_sync(kFullMask, z, r >= base ? static_cast<int>(r - base) : 0);
  *zs = r >= base ? zl : (r == base - 1 ? z_carry : rc.zs);
  *start = r;
  rc.dir = __shfl_sync(kFullMask, d, 31);
  rc.start = __shfl_sync(kFullMask, r, 31);
  rc.zs = __shfl_sync(kFullMask, *zs, 31);
}

// Step i's log transmission (run_log_transmission of ussim.h for the run found by warp_run).
template <typename A>
__device__ A warp_run_log_transmission(bool first, A zs, A z_prev, A z, A R) {
  return first ? log_transmission<A>(R) : run_step_loss<A>(zs, z_prev, z);
}

template <typename T>
__global__ void lines_warp_kernel(const T* vol, const float* table, const Params P, const T* start, const T* step,
                                  const T* w, T* out, int64_t lines, int64_t L, int64_t E) {
  using A = acc_t<T>;
  const int lane = threadIdx.x & 31;
  const int64_t vol_stride = P.D * P.H * P.W * kProps;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  // line is the same for the 32 lanes of a warp: the loops and the shuffles stay warp-uniform
  for (int64_t line = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5; line < lines; line += warps) {
    const T* v = vol + frame_volume(P, line / L) * vol_stride;
    const A st[3] = {static_cast<A>(step[line * 3]), static_cast<A>(step[line * 3 + 1]),
                     static_cast<A>(step[line * 3 + 2])};
    T* o = out + line * 3 * P.S;
    for (int64_t e = 0; e < E; ++e) {
      const T* s0 = start + (line * E + e) * 3;
      const A org[3] = {static_cast<A>(s0[0]), static_cast<A>(s0[1]), static_cast<A>(s0[2])};
      const T* we = w + e * P.S * 3;
      double carry = 0.0;  // sum of the log losses of the samples before this chunk
      A z_carry = A(1);    // impedance of the last sample of the previous chunk
      WarpRunCarry<A> rc{A(1), 0, 0};
      for (int64_t base = 0; base < P.S; base += 32) {
        const int64_t i = base + lane;
        const bool valid = i < P.S;
        Sample<A> s;
        s.Z = A(1);
        s.v[1] = A(0);
        if (valid) {
          const A fi = static_cast<A>(i);
          const A p[3] = {org[0] + fi * st[0], org[1] + fi * st[1], org[2] + fi * st[2]};
          eval_sample<T, A>(v, table, P, p, A(1), true, s, nullptr, nullptr);
        }
        A z_prev = __shfl_up_sync(kFullMask, s.Z, 1);
        if (lane == 0) z_prev = z_carry;
        // as eval_sample with the previous sample's impedance (march_ray_fn)
        const A R = i == 0 ? A(0) : (s.Z - z_prev) / (s.Z + z_prev);
        bool first;
        A zs;
        int64_t run_start;
        warp_run<A>(lane, i, z_prev, s.Z, z_carry, rc, &first, &zs, &run_start);
        const double u = valid ? static_cast<double>(warp_run_log_transmission<A>(first, zs, z_prev, s.Z, R)) -
                                     P.att * static_cast<double>(s.v[1])
                               : 0.0;
        double incl = u;
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
          const double n = __shfl_up_sync(kFullMask, incl, d);
          if (lane >= d) incl += n;
        }
        double excl = __shfl_up_sync(kFullMask, incl, 1);
        if (lane == 0) excl = 0.0;
        if (valid) {
          const A En = exp_a(static_cast<A>(carry + excl));
          const A v0 = static_cast<A>(we[3 * i]) * (En * R), v1 = static_cast<A>(we[3 * i + 1]) * (En * s.c[0]),
                  v2 = static_cast<A>(we[3 * i + 2]) * (En * s.c[1]);
          if (e == 0) {
            o[i] = static_cast<T>(v0);
            o[P.S + i] = static_cast<T>(v1);
            o[2 * P.S + i] = static_cast<T>(v2);
          } else {  // the same lane wrote these in the previous sub-ray: no race
            o[i] += static_cast<T>(v0);
            o[P.S + i] += static_cast<T>(v1);
            o[2 * P.S + i] += static_cast<T>(v2);
          }
        }
        carry += __shfl_sync(kFullMask, incl, 31);
        z_carry = __shfl_sync(kFullMask, s.Z, 31);
      }
    }
  }
}

// Warp-cooperative backward of one ray per warp (march_ray_backward of ussim.h, lane t on sample
// base + t of each chunk of 32): pass 1 sums h_i E_i by warp reductions, pass 2 gets the prefix sums by
// warp scans, so the suffix W_i = total - prefix as in the serial code. The impedance gradient of sample
// i also takes a term from sample i + 1 (R_{i+1} depends on Z_i): the next lane hands it down by a
// shuffle, and the last lane of a chunk keeps its sample pending until the next chunk's first lane has it.
// The backward of one ray by the 32 lanes of a warp: pos(i, p) gives sample i's voxel position (3
// values), gin(i, g) the gradient of its 3 echoes; the per-sample gradients go to gv_out (S, K) and
// gc_out (S, 3) where not null.
template <typename T, typename A, typename Pos, typename Gin>
__device__ void ray_backward_warp(const T* v, const float* table, const Params& P, Pos pos, Gin gin, T* gv_out,
                                  T* gc_out) {
  const int lane = threadIdx.x & 31;
  {
    // One chunk: this lane's sample, its R from the previous lane's impedance, its log loss u, and the
    // exclusive prefix of u (logT before carry). The same evaluation in both passes.
    auto eval = [&](int64_t base, A z_carry, bool grads, Sample<A>& s, A& Rr, double& u, double& excl, double& incl,
                    A* dv, A* dn, bool& clamped_prev, WarpRunCarry<A>& rc, bool& first, A& zs, int64_t& start) {
      const int64_t i = base + lane;
      const bool valid = i < P.S;
      s.Z = A(1);
      s.v[1] = A(0);
      s.z_clamped = false;
      if (valid) {
        A p[3];
        pos(i, p);
        eval_sample<T, A>(v, table, P, p, A(1), true, s, grads ? dv : nullptr, grads ? dn : nullptr);
      }
      A z_prev = __shfl_up_sync(kFullMask, s.Z, 1);
      bool cp = __shfl_up_sync(kFullMask, static_cast<int>(s.z_clamped), 1) != 0;
      if (lane == 0) z_prev = z_carry;
      clamped_prev = cp;
      Rr = i == 0 ? A(0) : (s.Z - z_prev) / (s.Z + z_prev);
      s.R = Rr;
      warp_run<A>(lane, i, z_prev, s.Z, z_carry, rc, &first, &zs, &start);
      u = valid ? static_cast<double>(warp_run_log_transmission<A>(first, zs, z_prev, s.Z, Rr)) -
                      P.att * static_cast<double>(s.v[1])
                : 0.0;
      incl = u;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const double n = __shfl_up_sync(kFullMask, incl, d);
        if (lane >= d) incl += n;
      }
      excl = __shfl_up_sync(kFullMask, incl, 1);
      if (lane == 0) excl = 0.0;
      return z_prev;
    };
    auto warp_sum = [](double x) {
#pragma unroll
      for (int d = 16; d > 0; d >>= 1) x += __shfl_xor_sync(kFullMask, x, d);
      return x;
    };
    // Pass 1: total of h_i E_i.
    double logT = 0.0, total = 0.0;
    A z_carry = A(1);
    bool clamped_carry = false;
    WarpRunCarry<A> rc{A(1), 0, 0};
    for (int64_t base = 0; base < P.S; base += 32) {
      const int64_t i = base + lane;
      Sample<A> s;
      A Rr, zs;
      double u, excl, incl;
      bool cp, first;
      int64_t run_start;
      eval(base, z_carry, false, s, Rr, u, excl, incl, nullptr, nullptr, cp, rc, first, zs, run_start);
      double he = 0.0;
      if (i < P.S) {
        A gi[3];
        gin(i, gi);
        const A h = echo_dot(s, gi[0], gi[1], gi[2]);  // (eval set s.R = Rr)
        he = static_cast<double>(h) * exp(logT + excl);
      }
      total += warp_sum(he);
      logT += __shfl_sync(kFullMask, incl, 31);
      z_carry = __shfl_sync(kFullMask, s.Z, 31);
    }
    // Pass 2: per-sample gradients.
    logT = 0.0;
    double prefix = 0.0;
    z_carry = A(1);
    clamped_carry = false;
    rc = WarpRunCarry<A>{A(1), 0, 0};
    // the run start's dZ/dp and clamping, for the start sample of the chunk's last run (carried), and the last
    // sample's (the previous chunk's lane 31, pending at the start of a chunk)
    A run_dz_carry[3] = {A(0), A(0), A(0)}, last_dz[3] = {A(0), A(0), A(0)};
    bool run_clamped_carry = false;
    // the pending sample of lane 31 (its impedance term from the next chunk's lane 0 still to add)
    int64_t pend_i = -1;
    A pend_gv[kProps], pend_dz[3], pend_acc[3];
    auto finish = [&](int64_t i, A* gv, const A* dz, const A* acc, A c_next) {
      gv[0] += c_next;
      if (gv_out)
        for (int q = 0; q < kProps; ++q) gv_out[i * kProps + q] = static_cast<T>(gv[q]);
      if (gc_out)
        for (int j = 0; j < 3; ++j) gc_out[3 * i + j] = static_cast<T>(acc[j] + gv[0] * dz[j]);
    };
    for (int64_t base = 0; base < P.S; base += 32) {
      const int64_t i = base + lane;
      const bool valid = i < P.S;
      Sample<A> s;
      A Rr, zs, dv[3 * kProps], dn[3 * kNoise];
      double u, excl, incl;
      bool cp, first;
      int64_t run_start;
      const A z_prev = eval(base, z_carry, gc_out != nullptr, s, Rr, u, excl, incl, dv, dn, cp, rc, first, zs,
                            run_start);
      if (lane == 0) cp = clamped_carry;
      A gv[kProps] = {A(0), A(0), A(0), A(0), A(0)};
      A acc[3] = {A(0), A(0), A(0)};
      A cterm = A(0);  // this sample's term of the previous sample's impedance gradient
      double he = 0.0;
      A E = A(0), h = A(0), g0 = A(0), g1 = A(0), g2 = A(0);
      if (valid) {
        E = static_cast<A>(exp(logT + excl));
        A gi[3];
        gin(i, gi);
        g0 = gi[0];
        g1 = gi[1];
        g2 = gi[2];
        h = echo_dot(s, g0, g1, g2);
        he = static_cast<double>(h) * exp(logT + excl);
      }
      // inclusive prefix of h_i E_i (the serial code adds sample i before taking the suffix)
      double hp = he;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const double n = __shfl_up_sync(kFullMask, hp, d);
        if (lane >= d) hp += n;
      }
      A deferred = A(0);  // this step's term of its run start's impedance gradient (a run's later steps)
      if (valid) {
        const A Wsuf = static_cast<A>(total - (prefix + hp));
        const A gR = g0 * E;  // the echo R_i's
        gv[1] = -Wsuf * static_cast<A>(P.att);
        A gn[kNoise];
        scatter_grads(s, E, g1, g2, gv, gn);
        if (i > 0) {
          const A den = s.Z + z_prev;
          const A dR_dZ = A(2) * z_prev / (den * den), dR_dZprev = A(-2) * s.Z / (den * den);
          const Run<A> run{zs, 0, run_start, first};
          A gz, gzprev;
          run_transmission_grads<A>(run, z_prev, s.Z, Wsuf, &gz, &gzprev, &deferred);
          if (!s.z_clamped) gv[0] += gR * dR_dZ + gz;
          if (!cp) cterm = gR * dR_dZprev + gzprev;
        }
        if (gc_out) {
          for (int j = 0; j < 3; ++j)
            for (int c = 0; c < kNoise; ++c) acc[j] += gn[c] * dn[3 * c + j];
        }
      }
      // the previous chunk's pending sample (lane 31) takes lane 0's term
      const A c0 = __shfl_sync(kFullMask, cterm, 0);
      if (lane == 31 && pend_i >= 0) {
        finish(pend_i, pend_gv, pend_dz, pend_acc, c0);
        pend_i = -1;
      }
      A c_next = __shfl_down_sync(kFullMask, cterm, 1);
      if (valid) {
        // acc + sum_c gv[c] dv[c] with gv[0] still missing c_next: keep the impedance part apart
        A rest[3] = {acc[0], acc[1], acc[2]}, dz[3] = {A(0), A(0), A(0)};
        if (gc_out)
          for (int j = 0; j < 3; ++j) {
            dz[j] = dv[j];
            for (int q = 1; q < kProps; ++q) rest[j] += gv[q] * dv[3 * q + j];
          }
        if (lane == 31) {
          pend_i = i;
          for (int q = 0; q < kProps; ++q) pend_gv[q] = gv[q];
          for (int j = 0; j < 3; ++j) {
            pend_dz[j] = dz[j];
            pend_acc[j] = rest[j];
          }
        } else {
          finish(i, gv, dz, rest, c_next);
        }
      }
      // The later steps of a run add to their run start's impedance gradient (the start sample is written by
      // now: an earlier chunk, the previous chunk's pending lane 31 finished above, or a lane of this chunk at
      // least two before): per run, the lanes of this chunk form one segment (start samples are non-decreasing
      // along the lanes), whose last lane adds the segment's sum (a warp prefix sum) to the start sample.
      {
        A dzl[3] = {A(0), A(0), A(0)};
        if (gc_out && valid)
          for (int j = 0; j < 3; ++j) dzl[j] = dv[j];
        const int src = run_start >= base ? static_cast<int>(run_start - base) : 0;
        A dzs[3];
        for (int j = 0; j < 3; ++j) {
          const A x = __shfl_sync(kFullMask, dzl[j], src);
          dzs[j] = run_start >= base ? x : (run_start == base - 1 ? last_dz[j] : run_dz_carry[j]);
        }
        const bool cl = __shfl_sync(kFullMask, static_cast<int>(s.z_clamped), src) != 0;
        const bool clamped_s = run_start >= base ? cl : (run_start == base - 1 ? clamped_carry : run_clamped_carry);
        double dp = valid ? static_cast<double>(deferred) : 0.0;  // inclusive prefix of the deferred terms
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
          const double n = __shfl_up_sync(kFullMask, dp, d);
          if (lane >= d) dp += n;
        }
        // this run's first lane in the chunk: the step after its start, or lane 0
        const int64_t seg0 = run_start + 1 - base;
        const int a0 = seg0 > 0 ? static_cast<int>(seg0) : 0;
        const double before = __shfl_sync(kFullMask, dp, a0 > 0 ? a0 - 1 : 0);
        const int64_t next_start = __shfl_down_sync(kFullMask, run_start, 1);
        const bool next_valid = __shfl_down_sync(kFullMask, static_cast<int>(valid), 1) != 0;
        const bool seg_end = valid && (lane == 31 || !next_valid || next_start != run_start);
        __syncwarp(kFullMask);  // the finished samples' writes visible to the warp
        const A sum = static_cast<A>(dp - (a0 > 0 ? before : 0.0));
        if (seg_end && sum != A(0) && !clamped_s) {
          if (gv_out) gv_out[run_start * kProps] = static_cast<T>(static_cast<A>(gv_out[run_start * kProps]) + sum);
          if (gc_out)
            for (int j = 0; j < 3; ++j)
              gc_out[3 * run_start + j] = static_cast<T>(static_cast<A>(gc_out[3 * run_start + j]) + sum * dzs[j]);
        }
        __syncwarp(kFullMask);
        for (int j = 0; j < 3; ++j) {
          run_dz_carry[j] = __shfl_sync(kFullMask, dzs[j], 31);
          last_dz[j] = __shfl_sync(kFullMask, dzl[j], 31);
        }
        run_clamped_carry = __shfl_sync(kFullMask, static_cast<int>(clamped_s), 31) != 0;
      }
      prefix += __shfl_sync(kFullMask, hp, 31);
      logT += __shfl_sync(kFullMask, incl, 31);
      z_carry = __shfl_sync(kFullMask, s.Z, 31);
      clamped_carry = __shfl_sync(kFullMask, static_cast<int>(s.z_clamped), 31) != 0;
    }
    if (lane == 31 && pend_i >= 0) finish(pend_i, pend_gv, pend_dz, pend_acc, A(0));
  }
}

// Backward of rays with explicit sample positions: coords (B, R, S, 3), grad (B, R, S, 3) -> gvals
// (B, R, S, K), gcoords (B, R, S, 3).
template <typename T>
__global__ void backward_warp_kernel(const T* vol, const float* table, const Params P, const T* coords, const T* grad,
                                     T* gvals, T* gcoords, int64_t rays, int64_t R) {
  using A = acc_t<T>;
  const int64_t vol_stride = P.D * P.H * P.W * kProps;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t ray = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5; ray < rays; ray += warps) {
    const T* c = coords + ray * P.S * 3;
    const T* g = grad + ray * P.S * 3;
    ray_backward_warp<T, A>(
        vol + frame_volume(P, ray / R) * vol_stride, table, P,
        [c](int64_t i, A* p) {
          for (int j = 0; j < 3; ++j) p[j] = static_cast<A>(c[3 * i + j]);
        },
        [g](int64_t i, A* gi) {
          for (int j = 0; j < 3; ++j) gi[j] = static_cast<A>(g[3 * i + j]);
        },
        gvals ? gvals + ray * P.S * kProps : nullptr, gcoords ? gcoords + ray * P.S * 3 : nullptr);
  }
}

#ifdef __CUDACC__
__device__ inline float mul_rn(float a, float b) { return __fmul_rn(a, b); }  // never fused into an FMA
__device__ inline double mul_rn(double a, double b) { return __dmul_rn(a, b); }
#endif

// Sample i of a sub-ray starting at st with step sp (the forward's geometry): st + i * sp, a product and
// then a sum, each rounded, as the CPU op and the materialised positions compute it (no fused
// multiply-add).
template <typename A, typename T>
__device__ void line_position(const T* st, const T* sp, int64_t i, A* p) {
  for (int j = 0; j < 3; ++j) {
#ifdef __CUDA_ARCH__
    const A prod = mul_rn(static_cast<A>(i), static_cast<A>(sp[j]));
#else
    const A prod = static_cast<A>(i) * static_cast<A>(sp[j]);
#endif
    p[j] = static_cast<A>(st[j]) + prod;
  }
}

// Backward of the sub-rays of scanlines without materialising their positions and echo gradients
// (ussim_march_lines_backward): start (B, L, E, 3), step (B, L, 3), weights (E, S, 3), grad (B, L, 3, S)
// -> gvals (B, L E, S, K), gcoords (B, L E, S, 3), per sub-ray as backward_warp_kernel.
template <typename T>
__global__ void lines_backward_warp_kernel(const T* vol, const float* table, const Params P, const T* start,
                                           const T* step, const T* w, const T* grad, T* gvals, T* gcoords,
                                           int64_t rays, int64_t L, int64_t E) {
  using A = acc_t<T>;
  const int64_t vol_stride = P.D * P.H * P.W * kProps;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t ray = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5; ray < rays; ray += warps) {
    const int64_t line = ray / E, e = ray - line * E;
    const T* st = start + ray * 3;
    const T* sp = step + line * 3;
    const T* g = grad + line * 3 * P.S;
    const T* we = w + e * P.S * 3;
    const int64_t S = P.S;
    ray_backward_warp<T, A>(
        vol + frame_volume(P, line / L) * vol_stride, table, P,
        [st, sp](int64_t i, A* p) { line_position<A>(st, sp, i, p); },
        [g, we, S](int64_t i, A* gi) {
          for (int c = 0; c < 3; ++c) gi[c] = static_cast<A>(g[c * S + i] * we[3 * i + c]);
        },
        gvals ? gvals + ray * P.S * kProps : nullptr, gcoords ? gcoords + ray * P.S * 3 : nullptr);
  }
}

// The scatter of the sub-ray samples of scanlines (lines_backward_warp_kernel's gvals): the positions
// start[b, l, e] + i * step[b, l] recomputed as that kernel does.
template <typename T>
__global__ void lines_scatter_kernel(T* gprops, const Params P, const T* start, const T* step, const T* gvals,
                                     int64_t samples, int64_t L, int64_t E) {
  using A = acc_t<T>;
  const int64_t vol_stride = P.D * P.H * P.W * kProps;
  const auto add = [](T* dst, T v) { atomicAdd(dst, v); };
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < samples; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t ray = k / P.S, i = k - ray * P.S, line = ray / E;
    A p[3], g[kProps];
    line_position<A>(start + ray * 3, step + line * 3, i, p);
    for (int q = 0; q < kProps; ++q) g[q] = static_cast<A>(gvals[k * kProps + q]);
    scatter_props<A>(gprops + frame_volume(P, line / L) * vol_stride, P, p[0], p[1], p[2], g, add);
  }
}

// ---- Merged scatter (the default; MEDFAST_USSIM_CUDA_SCATTER=plain selects the plain one) ----
//
// scatter_props (ussim.h) of one sample per lane of a warp, with the lanes whose samples fall into the
// same voxel cell of the same volume summed first: consecutive samples of a ray are a fraction of a
// voxel apart, so runs of consecutive lanes usually share their cell and so all 8 x K target
// addresses. A lane is a segment head when it is lane 0 or its (volume, cell) differs from the
// previous lane's (an inactive lane has volume -1: it never joins an active lane's segment). The 8 x K
// corner contributions (the products scatter_props adds) are summed over each segment by a segmented
// suffix scan of shuffles (log2 of the longest segment steps; none when every lane has its own cell),
// and only the heads add them, skipping the corners outside the volume as scatter_props does, and the
// zero sums (adding +0 changes no element of a zero-initialised sum). The same sums as scatter_props up
// to float reassociation. All 32 lanes must call it together (it shuffles): active = false for a lane
// without a sample. No slab (scatter_props' i_lo, i_hi): the GPU scatters into the whole volume.
template <typename A, typename G>
__device__ void scatter_props_merged(G* gprops, int64_t vol_stride, const Params& P, bool active, int64_t vol, A d,
                                     A h, A w, const A* g) {
  const int lane = threadIdx.x & 31;
  int64_t cell[3] = {0, 0, 0};
  A c[8][kProps];
  if (active) {
    A wt[8], wz[8];
    corner_weights_at<A>(P, d, h, w, cell, wt, wz);
    USSIM_UNROLL8
    for (int corner = 0; corner < 8; ++corner) {
#pragma unroll
      for (int q = 0; q < kProps; ++q) c[corner][q] = (q < kSharpProps ? wz : wt)[corner] * g[q];
    }
  } else {
    vol = -1;
    USSIM_UNROLL8
    for (int corner = 0; corner < 8; ++corner)
#pragma unroll
      for (int q = 0; q < kProps; ++q) c[corner][q] = A(0);
  }
  // segment heads: lane 0, or a (volume, cell) other than the previous lane's
  const int64_t pv = __shfl_up_sync(kFullMask, vol, 1), p0 = __shfl_up_sync(kFullMask, cell[0], 1),
                p1 = __shfl_up_sync(kFullMask, cell[1], 1), p2 = __shfl_up_sync(kFullMask, cell[2], 1);
  const bool head = lane == 0 || pv != vol || p0 != cell[0] || p1 != cell[1] || p2 != cell[2];
  const unsigned heads = __ballot_sync(kFullMask, head);
  // the last lane of this lane's segment: the lane before the next head (2u << 31 wraps to 0)
  const unsigned after = heads & ~((2u << lane) - 1u);
  const int end = after != 0u ? __ffs(static_cast<int>(after)) - 2 : 31;
  // segmented suffix sums: after the step of offset d, lane l holds the sum over lanes
  // [l, min(l + 2d - 1, end)]; a warp whose segments are all shorter than d + 1 stops
  for (int d = 1; d < 32; d <<= 1) {
    const bool take = lane + d <= end;
    if (__ballot_sync(kFullMask, take) == 0u) break;
    USSIM_UNROLL8
    for (int corner = 0; corner < 8; ++corner)
#pragma unroll
      for (int q = 0; q < kProps; ++q) {
        const A o = __shfl_down_sync(kFullMask, c[corner][q], d);
        if (take) c[corner][q] += o;
      }
  }
  if (!head || vol < 0) return;
  G* gvol = gprops + vol * vol_stride;
  USSIM_UNROLL8
  for (int corner = 0; corner < 8; ++corner) {
    const int a = corner >> 2, b = (corner >> 1) & 1, e = corner & 1;
    const int64_t i = cell[0] + a, j = cell[1] + b, k = cell[2] + e;
    if (i < 0 || j < 0 || k < 0 || i >= P.D || j >= P.H || k >= P.W) continue;
    G* dst = gvol + ((i * P.H + j) * P.W + k) * kProps;
#pragma unroll
    for (int q = 0; q < kProps; ++q)
      if (c[corner][q] != A(0)) atomicAdd(dst + q, static_cast<G>(c[corner][q]));
  }
}

// The grid-stride loop of the merged scatters, by whole warps (k0 the warp's first sample, the same in
// its 32 lanes), so every lane reaches every shuffle; the lanes past the last sample take part without
// a sample. load(k, p, g) fills sample k's position p (3) and property gradients g (kProps) and returns
// the index of its frame's volume.
template <typename A, typename T, typename Load>
__device__ void merged_scatter_loop(T* gprops, const Params& P, int64_t samples, const Load& load) {
  const int lane = threadIdx.x & 31;
  const int64_t vol_stride = P.D * P.H * P.W * kProps;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t k0 = blockIdx.x * int64_t(blockDim.x) + (threadIdx.x & ~31u); k0 < samples; k0 += stride) {
    const int64_t k = k0 + lane;
    const bool active = k < samples;
    A p[3] = {A(0), A(0), A(0)}, g[kProps] = {A(0), A(0), A(0), A(0), A(0)};
    const int64_t vol = active ? load(k, p, g) : int64_t(-1);
    scatter_props_merged<A>(gprops, vol_stride, P, active, vol, p[0], p[1], p[2], g);
  }
}

// lines_scatter_kernel with scatter_props_merged.
template <typename T>
__global__ void lines_scatter_merged_kernel(T* gprops, const Params P, const T* start, const T* step, const T* gvals,
                                            int64_t samples, int64_t L, int64_t E) {
  using A = acc_t<T>;
  merged_scatter_loop<A>(gprops, P, samples, [&](int64_t k, A* p, A* g) {
    const int64_t ray = k / P.S, i = k - ray * P.S, line = ray / E;
    line_position<A>(start + ray * 3, step + line * 3, i, p);
    for (int q = 0; q < kProps; ++q) g[q] = static_cast<A>(gvals[k * kProps + q]);
    return frame_volume(P, line / L);
  });
}

// scatter_kernel (ussim_kernels.cuh: samples with explicit positions coords (samples, 3), frame k /
// per_frame) with scatter_props_merged.
template <typename T>
__global__ void scatter_merged_kernel(T* gprops, const Params P, const T* coords, const T* gvals, int64_t samples,
                                      int64_t per_frame) {
  using A = acc_t<T>;
  merged_scatter_loop<A>(gprops, P, samples, [&](int64_t k, A* p, A* g) {
    for (int j = 0; j < 3; ++j) p[j] = static_cast<A>(coords[3 * k + j]);
    for (int q = 0; q < kProps; ++q) g[q] = static_cast<A>(gvals[k * kProps + q]);
    return frame_volume(P, k / per_frame);
  });
}

}  // namespace medfast::ussim

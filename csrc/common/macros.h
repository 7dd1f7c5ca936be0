// Host/device helpers shared by every op family.
#pragma once
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MEDFAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
// Inlining every per-voxel helper into the launcher loops matters for speed on the CPU.
#define MEDFAST_HOST_DEVICE inline __attribute__((always_inline))
#endif

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MEDFAST_UNROLL _Pragma("unroll")
#else
#define MEDFAST_UNROLL _Pragma("GCC unroll 4")
#endif

// Partial unrolling of loops with a run-time trip count (4 iterations' loads in flight at once).
#if defined(__CUDACC__) || defined(__HIPCC__)
#define MEDFAST_UNROLL4 _Pragma("unroll 4")
#else
#define MEDFAST_UNROLL4 _Pragma("GCC unroll 4")
#endif

// A kernel's dynamic shared memory as `unsigned char* name`: the extern __shared__ array on the GPU; in
// a host compilation of kernel source (the emulation of tests/simt/simt.h, which must be included
// first) the running block's buffer, from simt_dynamic_shared().
#if defined(__CUDACC__) || defined(__HIPCC__)
#define MEDFAST_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#else
#define MEDFAST_DYNAMIC_SHARED(name) unsigned char* const name = simt_dynamic_shared()
#endif

// __launch_bounds__ on the GPU (a register budget: at most `threads` per block, and registers for
// `min_blocks` blocks per multiprocessor); nothing in a host compilation of kernel source.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define MEDFAST_LAUNCH_BOUNDS(threads, min_blocks) __launch_bounds__(threads, min_blocks)
#else
#define MEDFAST_LAUNCH_BOUNDS(threads, min_blocks)
#endif

namespace medfast {

// Accumulation type: float for float/half/bfloat16, double for double.
template <typename T> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };
template <typename T> using acc_t = typename acc_type<T>::type;

MEDFAST_HOST_DEVICE int64_t clamp_index(int64_t i, int64_t n) {
  return i < 0 ? 0 : (i >= n ? n - 1 : i);
}

// Whole-sample mirror ("d c b | a b c d | c b a"): period 2n-2, scipy's "mirror".
MEDFAST_HOST_DEVICE int64_t mirror_index(int64_t i, int64_t n) {
  if (n == 1) return 0;
  const int64_t period = 2 * (n - 1);
  i %= period;
  if (i < 0) i += period;
  return i < n ? i : period - i;
}

}  // namespace medfast

// A host emulation of one CUDA warp, enough to run warp-cooperative kernels (written for the GPU) on
// the CPU in tests. The 32 lanes are fibers (ucontext) on the calling thread, run round-robin: a warp
// shuffle is a publish to a slot array, a switch through every lane (a barrier), a read of the source
// lane's slot and a second barrier. Single-threaded and deterministic, so the emulation does not slow
// down on a loaded machine. Only the primitives the medfast kernels use; one block of one warp
// (blockDim.x = 32, gridDim.x = 1), so grid-stride loops cover all the work in that warp. Every lane
// must reach the same sequence of shuffles (as the full mask of *_sync requires on a GPU): a lane that
// ends while others wait at a shuffle aborts with a message.
#pragma once
#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct simt_dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline simt_dim3 threadIdx, blockIdx;  // the running lane's (set by the scheduler before each switch)
inline const simt_dim3 blockDim{32, 1, 1}, gridDim{1, 1, 1};

namespace simt {

struct Warp {
  ucontext_t scheduler;
  ucontext_t lane_ctx[32];
  std::vector<char> stacks[32];
  bool done[32] = {};
  long barriers[32] = {};
  int current = 0;
  const std::function<void()>* kernel = nullptr;
  alignas(16) unsigned char slot[32][16];
};
inline Warp* warp = nullptr;

inline int lane() { return static_cast<int>(threadIdx.x & 31); }

inline void barrier() {
  Warp* w = warp;
  ++w->barriers[w->current];
  swapcontext(&w->lane_ctx[w->current], &w->scheduler);
}

inline void lane_entry() {
  (*warp->kernel)();
  warp->done[warp->current] = true;  // then back to the scheduler (uc_link)
}

// Every lane publishes v, then takes lane src's value (src outside [0, 32): its own, as the GPU does
// for up/down shuffles past the warp's edge).
template <class T>
T exchange(T v, int src) {
  static_assert(sizeof(T) <= 16, "shuffle of a type wider than 16 bytes");
  const int me = lane();
  std::memcpy(warp->slot[me], &v, sizeof(T));
  barrier();
  T out;
  std::memcpy(&out, warp->slot[(src < 0 || src > 31) ? me : src], sizeof(T));
  barrier();
  return out;
}

// Runs kernel() on the 32 lanes of one warp until all have returned.
inline void run_warp(const std::function<void()>& kernel) {
  Warp w;
  Warp* outer = warp;
  warp = &w;
  w.kernel = &kernel;
  for (int t = 0; t < 32; ++t) {
    w.stacks[t].resize(1 << 18);
    getcontext(&w.lane_ctx[t]);
    w.lane_ctx[t].uc_stack.ss_sp = w.stacks[t].data();
    w.lane_ctx[t].uc_stack.ss_size = w.stacks[t].size();
    w.lane_ctx[t].uc_link = &w.scheduler;
    makecontext(&w.lane_ctx[t], lane_entry, 0);
  }
  for (bool running = true; running;) {
    running = false;
    for (int t = 0; t < 32; ++t) {
      if (w.done[t]) continue;
      w.current = t;
      threadIdx.x = static_cast<unsigned>(t);
      blockIdx.x = 0;
      swapcontext(&w.scheduler, &w.lane_ctx[t]);
      running = running || !w.done[t];
    }
    if (!running) break;
    for (int t = 0; t < 32; ++t)  // a warp-uniform kernel keeps its lanes at the same barrier
      if (w.done[t] || w.barriers[t] != w.barriers[0]) {
        std::fprintf(stderr, "simt: lanes diverged at a warp shuffle (lane %d: %s, %ld barriers; lane 0: %ld)\n", t,
                     w.done[t] ? "returned" : "waiting", w.barriers[t], w.barriers[0]);
        std::abort();
      }
  }
  warp = outer;
}

}  // namespace simt

template <class T>
T __shfl_sync(unsigned, T v, int src) { return simt::exchange(v, src & 31); }
template <class T>
T __shfl_up_sync(unsigned, T v, unsigned d) { return simt::exchange(v, simt::lane() - static_cast<int>(d)); }
template <class T>
T __shfl_down_sync(unsigned, T v, unsigned d) { return simt::exchange(v, simt::lane() + static_cast<int>(d)); }
template <class T>
T __shfl_xor_sync(unsigned, T v, int mask) { return simt::exchange(v, simt::lane() ^ mask); }

// One lane runs at a time: a plain add is the atomic add.
template <class T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

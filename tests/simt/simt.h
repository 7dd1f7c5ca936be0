// A host emulation of one CUDA warp, enough to run warp-cooperative kernels (written for the GPU) on
// the CPU in tests: the 32 lanes are 32 host threads, and each warp shuffle is an exchange through a
// shared slot array between two barriers. Only the primitives the medfast kernels use; one block of
// one warp (blockDim.x = 32, gridDim.x = 1), so grid-stride loops cover all the work in that warp.
// Every lane must reach the same sequence of shuffles (as the full mask of *_sync requires on a GPU).
// atomicAdd is a real atomic add (the lanes run concurrently).
#pragma once
#include <atomic>
#include <barrier>
#include <cstring>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct simt_dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local simt_dim3 threadIdx, blockIdx;
inline const simt_dim3 blockDim{32, 1, 1}, gridDim{1, 1, 1};

namespace simt {

struct Warp {
  std::barrier<> bar{32};
  alignas(64) unsigned char slot[32][16];
};
inline thread_local Warp* current = nullptr;

inline int lane() { return static_cast<int>(threadIdx.x & 31); }

// Every lane publishes v, then takes lane src's value (src outside [0, 32): its own, as the GPU does
// for up/down shuffles past the warp's edge).
template <class T>
T exchange(T v, int src) {
  static_assert(sizeof(T) <= 16, "shuffle of a type wider than 16 bytes");
  std::memcpy(current->slot[lane()], &v, sizeof(T));
  current->bar.arrive_and_wait();
  T out;
  std::memcpy(&out, current->slot[(src < 0 || src > 31) ? lane() : src], sizeof(T));
  current->bar.arrive_and_wait();
  return out;
}

// Runs kernel() on the 32 lanes of one warp and waits for them.
template <class Kernel>
void run_warp(Kernel kernel) {
  Warp warp;
  std::vector<std::thread> lanes;
  for (unsigned t = 0; t < 32; ++t)
    lanes.emplace_back([&, t] {
      threadIdx.x = t;
      blockIdx.x = 0;
      current = &warp;
      kernel();
    });
  for (auto& th : lanes) th.join();
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

template <class T>
T atomicAdd(T* address, T value) { return std::atomic_ref<T>(*address).fetch_add(value); }

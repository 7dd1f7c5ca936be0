// A host emulation of CUDA launches, enough to run the medfast kernels (written for the GPU) on the CPU
// in tests. A launch is a grid of blocks (gridDim.x, .y, .z), run one block after another; the threads
// of a block (blockDim.x: a multiple of 32, at most 1024) are fibers (ucontext) on the calling thread,
// run round-robin. Single-threaded and deterministic, so the emulation does not slow down on a loaded
// machine. Only the primitives the medfast kernels use:
//  - warp shuffles (__shfl_*_sync) exchange within a warp of 32 consecutive threads: every lane
//    publishes its value to a slot and waits; once all 32 lanes of the warp wait, each reads its source
//    lane's slot and waits again (so no lane overwrites a slot before all have read it). Every lane of
//    a warp must reach the same sequence of shuffles (as the full mask of *_sync requires on a GPU): a
//    warp some of whose lanes wait at a shuffle while others returned or wait at __syncthreads aborts
//    with a message.
//  - __ballot_sync: the same two barriers as a shuffle, each lane reading the predicates of all 32
//    lanes of its warp (so it counts as a shuffle in the checks above).
//  - __syncthreads() waits until every thread of the block waits there; a thread that returned while
//    others wait at __syncthreads aborts with a message (all medfast kernels reach it uniformly).
//  - dynamic shared memory (MEDFAST_DYNAMIC_SHARED of common/macros.h): a buffer of the launch's size
//    per block, filled with 0xff bytes (NaN in float and double) before each block, so that a read
//    before a write shows; a guard past its end is checked after each block (a write out of bounds
//    aborts).
//  - atomicAdd: one thread runs at a time, so a plain add; simt::atomic_adds counts them (a test can
//    check how many atomics a kernel issued); atomicMin / atomicMax likewise plain.
// Threads run until they wait, in thread order, so results are the same on every run.
#pragma once
#include <ucontext.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct simt_dim3 {
  unsigned x = 1, y = 1, z = 1;
};
// The running thread's indices (set by the scheduler before each switch) and the launch's shape.
inline simt_dim3 threadIdx{0, 0, 0}, blockIdx{0, 0, 0}, blockDim{32, 1, 1}, gridDim{1, 1, 1};

namespace simt {

enum State : unsigned char { kRunnable, kAtShuffle, kAtSync, kDone };

constexpr size_t kStack = size_t(1) << 18;  // per thread
constexpr size_t kGuard = 64;               // bytes checked past the dynamic shared memory
constexpr unsigned char kGuardByte = 0xa5;

struct alignas(16) Slot {
  unsigned char bytes[16];
};

struct Block {
  ucontext_t scheduler;
  int threads = 0, current = 0;
  std::vector<ucontext_t> ctx;
  std::vector<State> state;
  std::vector<long> shuffles;  // shuffle barriers each thread passed (for messages)
  std::vector<Slot> slot;
  const std::function<void()>* kernel = nullptr;
  unsigned char* shared = nullptr;  // this block's dynamic shared memory
};
inline Block* block = nullptr;
inline long long atomic_adds = 0;  // atomicAdd calls so far (reset by whoever counts)

inline int lane() { return static_cast<int>(threadIdx.x & 31); }

inline void wait(State s) {
  Block* b = block;
  b->state[b->current] = s;
  swapcontext(&b->ctx[b->current], &b->scheduler);
}

inline void thread_entry() {
  (*block->kernel)();
  block->state[block->current] = kDone;  // then back to the scheduler (uc_link)
}

// Every lane publishes v, then takes the value of lane src of its warp (src outside [0, 32): its own,
// as the GPU does for up/down shuffles past the warp's edge).
template <class T>
T exchange(T v, int src) {
  static_assert(sizeof(T) <= 16, "shuffle of a type wider than 16 bytes");
  const int me = static_cast<int>(threadIdx.x);
  std::memcpy(block->slot[me].bytes, &v, sizeof(T));
  wait(kAtShuffle);
  T out;
  std::memcpy(&out, block->slot[(src < 0 || src > 31) ? me : (me & ~31) + src].bytes, sizeof(T));
  wait(kAtShuffle);
  return out;
}

// Every lane publishes pred, then takes the bit mask of the predicates of the 32 lanes of its warp.
inline unsigned ballot(bool pred) {
  const int me = static_cast<int>(threadIdx.x);
  block->slot[me].bytes[0] = pred ? 1 : 0;
  wait(kAtShuffle);
  unsigned mask = 0;
  for (int l = 0; l < 32; ++l) mask |= static_cast<unsigned>(block->slot[(me & ~31) + l].bytes[0]) << l;
  wait(kAtShuffle);
  return mask;
}

// Thread t is not where thread r waits.
[[noreturn]] inline void fail(const char* what, int t, int r, const Block& b) {
  static const char* names[] = {"running", "waiting at a shuffle", "waiting at __syncthreads", "returned"};
  std::fprintf(stderr, "simt: %s (block %u,%u,%u: thread %d %s after %ld shuffles, thread %d %s after %ld)\n", what,
               blockIdx.x, blockIdx.y, blockIdx.z, t, names[b.state[t]], b.shuffles[t], r, names[b.state[r]],
               b.shuffles[r]);
  std::abort();
}

// Runs the threads of the current block (blockIdx set) until all have returned.
inline void run_block(Block& b, char* stacks) {
  for (int t = 0; t < b.threads; ++t) {
    getcontext(&b.ctx[t]);
    b.ctx[t].uc_stack.ss_sp = stacks + size_t(t) * kStack;
    b.ctx[t].uc_stack.ss_size = kStack;
    b.ctx[t].uc_link = &b.scheduler;
    makecontext(&b.ctx[t], thread_entry, 0);
    b.state[t] = kRunnable;
    b.shuffles[t] = 0;
  }
  for (;;) {
    for (int t = 0; t < b.threads; ++t) {  // each runnable thread runs until it waits or returns
      if (b.state[t] != kRunnable) continue;
      b.current = t;
      threadIdx = {static_cast<unsigned>(t), 0, 0};
      swapcontext(&b.scheduler, &b.ctx[t]);
    }
    // Release the warps whose 32 lanes all wait at a shuffle; a warp only part of which does never will.
    bool released = false;
    for (int w = 0; w < b.threads; w += 32) {
      int at = 0, first = -1;
      for (int t = w; t < w + 32; ++t)
        if (b.state[t] == kAtShuffle) {
          ++at;
          first = first < 0 ? t : first;
        }
      if (at == 0) continue;
      for (int t = w; t < w + 32; ++t) {
        if (at != 32 && b.state[t] != kAtShuffle) fail("lanes diverged at a warp shuffle", t, first, b);
        if (at == 32 && b.shuffles[t] != b.shuffles[w]) fail("lanes at different warp shuffles", t, w, b);
      }
      for (int t = w; t < w + 32; ++t) {
        b.state[t] = kRunnable;
        ++b.shuffles[t];
      }
      released = true;
    }
    if (released) continue;
    // No warp at a shuffle: every thread has returned or waits at __syncthreads.
    int done = 0;
    for (int t = 0; t < b.threads; ++t) done += b.state[t] == kDone;
    if (done == b.threads) return;
    int waiting = 0;
    while (b.state[waiting] != kAtSync) ++waiting;
    for (int t = 0; t < b.threads; ++t)
      if (b.state[t] == kDone) fail("a thread returned while others wait at __syncthreads", t, waiting, b);
    for (int t = 0; t < b.threads; ++t) b.state[t] = kRunnable;
  }
}

// Runs kernel() on a grid of `grid` blocks of `threads` threads (a multiple of 32, at most 1024), with
// `shared_bytes` of dynamic shared memory per block.
inline void launch(simt_dim3 grid, int threads, size_t shared_bytes, const std::function<void()>& kernel) {
  if (threads < 32 || threads > 1024 || threads % 32 != 0 || grid.x < 1 || grid.y < 1 || grid.z < 1) {
    std::fprintf(stderr, "simt: bad launch (grid %u x %u x %u, %d threads)\n", grid.x, grid.y, grid.z, threads);
    std::abort();
  }
  Block b;
  b.threads = threads;
  b.ctx.resize(threads);
  b.state.assign(threads, kDone);
  b.shuffles.assign(threads, 0);
  b.slot.resize(threads);
  b.kernel = &kernel;
  const std::unique_ptr<char[]> stacks(new char[threads * kStack]);  // left uninitialised: pages on use
  const size_t padded = (shared_bytes + 15) / 16 * 16;
  std::vector<Slot> shared((padded + kGuard) / 16);
  b.shared = shared.data()->bytes;
  Block* outer = block;
  const simt_dim3 outer_grid = gridDim, outer_dim = blockDim, outer_block = blockIdx, outer_thread = threadIdx;
  block = &b;
  gridDim = grid;
  blockDim = {static_cast<unsigned>(threads), 1, 1};
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = {x, y, z};
        std::memset(b.shared, 0xff, padded);
        std::memset(b.shared + padded, kGuardByte, kGuard);
        run_block(b, stacks.get());
        for (size_t i = padded; i < padded + kGuard; ++i)
          if (b.shared[i] != kGuardByte) {
            std::fprintf(stderr, "simt: block %u,%u,%u wrote past its %zu bytes of dynamic shared memory\n", x, y, z,
                         shared_bytes);
            std::abort();
          }
      }
  block = outer;
  gridDim = outer_grid;
  blockDim = outer_dim;
  blockIdx = outer_block;
  threadIdx = outer_thread;
}

// One block of one warp (blockDim.x = 32, gridDim.x = 1): grid-stride loops cover all the work in it.
inline void run_warp(const std::function<void()>& kernel) { launch({1, 1, 1}, 32, 0, kernel); }

}  // namespace simt

inline unsigned char* simt_dynamic_shared() { return simt::block->shared; }

inline void __syncthreads() { simt::wait(simt::kAtSync); }

template <class T>
T __shfl_sync(unsigned, T v, int src) { return simt::exchange(v, src & 31); }
// __syncwarp: all lanes of the warp meet (a shuffle's barrier), so writes before it are seen after it.
inline void __syncwarp(unsigned = 0xffffffffu) { (void)simt::exchange(0, 0); }
template <class T>
T __shfl_up_sync(unsigned, T v, unsigned d) { return simt::exchange(v, simt::lane() - static_cast<int>(d)); }
template <class T>
T __shfl_down_sync(unsigned, T v, unsigned d) { return simt::exchange(v, simt::lane() + static_cast<int>(d)); }
template <class T>
T __shfl_xor_sync(unsigned, T v, int mask) { return simt::exchange(v, simt::lane() ^ mask); }

inline unsigned __ballot_sync(unsigned, int pred) { return simt::ballot(pred != 0); }
// 1 + the index of the least significant set bit of x, 0 if none (the CUDA integer intrinsic).
inline int __ffs(int x) { return __builtin_ffs(x); }

// One thread runs at a time: a plain add is the atomic add.
template <class T>
T atomicAdd(T* address, T value) {
  ++simt::atomic_adds;
  const T old = *address;
  *address = old + value;
  return old;
}
template <class T>
T atomicMin(T* address, T value) {
  const T old = *address;
  *address = value < old ? value : old;
  return old;
}
template <class T>
T atomicMax(T* address, T value) {
  const T old = *address;
  *address = value > old ? value : old;
  return old;
}

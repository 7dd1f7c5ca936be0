// Launch-size arithmetic without the CUDA runtime, so that host code (the launchers, and the kernel
// emulation of tests/simt) can share it; cuda_launch.h supplies the device's multiprocessor count.
#pragma once
#include <algorithm>
#include <cstdint>

namespace medfast {

// Blocks of `threads` for n grid-stride work items on `sms` multiprocessors: enough to fill the GPU
// (64 blocks per multiprocessor), never more than needed.
inline int64_t grid_blocks_for(int64_t n, int threads, int64_t sms) {
  return std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, sms * 64));
}

}  // namespace medfast

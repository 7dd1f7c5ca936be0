// Launch-size helper shared by the CUDA launchers (host code only).
#pragma once
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>

namespace medfast {

// Blocks of `threads` for n grid-stride work items: enough to fill the GPU, never more than needed.
inline int64_t grid_blocks(int64_t n, int threads) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, sms * 64));
}

}  // namespace medfast

// Launch-size helper shared by the CUDA launchers (host code only).
#pragma once
#include <ATen/cuda/CUDAContext.h>

#include <cstdint>

#include "common/launch_geometry.h"

namespace medfast {

// The device's multiprocessor count.
inline int64_t sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Blocks of `threads` for n grid-stride work items: enough to fill the GPU, never more than needed.
inline int64_t grid_blocks(int64_t n, int threads) { return grid_blocks_for(n, threads, sm_count()); }

}  // namespace medfast

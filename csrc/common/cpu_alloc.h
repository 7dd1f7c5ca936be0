// Allocation helpers for large CPU results.
#pragma once
#include <ATen/ATen.h>

namespace medfast {

// at::empty for a result that a kernel will write in full. A large fresh allocation (glibc maps
// blocks of 32 MiB and more anew on every call) is advised to use transparent huge pages where the
// system allows them: its first touch then costs 1/512 of the page faults (13 ms -> 3 ms for 32 MiB
// on one core). Memory already in use (heap reuse) is left as it is.
at::Tensor empty_large_cpu(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace medfast

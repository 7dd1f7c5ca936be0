#include "common/cpu_alloc.h"

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace medfast {

namespace {

constexpr uintptr_t kHuge = uintptr_t(2) << 20;  // x86-64 / arm64 (4 KiB base pages) THP size

void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end < begin + 2 * kHuge) return;
  // Only a range nothing has touched yet: a reused heap block has its pages already.
  unsigned char resident = 0;
  if (mincore(reinterpret_cast<void*>(begin), size_t(sysconf(_SC_PAGESIZE)), &resident) != 0 || (resident & 1))
    return;
  madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice only: failure is harmless
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace

at::Tensor empty_large_cpu(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (t.device().is_cpu() && t.nbytes() >= 4 * kHuge) advise_huge_pages(t.mutable_data_ptr(), t.nbytes());
  return t;
}

}  // namespace medfast

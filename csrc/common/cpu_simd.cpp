#include "common/cpu_simd.h"

#include <atomic>

namespace medfast {
namespace {
std::atomic<bool> g_simd_enabled{true};
}  // namespace

bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
bool cpu_simd_available() { return cpu_has_avx2() && g_simd_enabled.load(std::memory_order_relaxed); }
void set_cpu_simd(bool enabled) { g_simd_enabled.store(enabled); }

}  // namespace medfast

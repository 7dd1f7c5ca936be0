// Runtime choice of the CPU's vector paths: AVX2 + FMA when the CPU has them and the testing switch
// (medfast._C._set_cpu_simd) has not turned them off. Shared by every op family's CPU launcher.
#pragma once

// Marks a function compiled for AVX2 + FMA; the always-inline helpers it calls are compiled with it.
#define MEDFAST_AVX2 __attribute__((target("avx2,fma")))

namespace medfast {

bool cpu_has_avx2();        // what the CPU supports
bool cpu_simd_available();  // cpu_has_avx2() and not switched off
void set_cpu_simd(bool enabled);

}  // namespace medfast

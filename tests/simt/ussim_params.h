// The ussim Params of one emulated call, from the plain values the tests pass through ctypes (shared by
// the ultrasound emulation libraries).
#pragma once
#include <cstdint>

#include "ussim/ussim.h"

inline medfast::ussim::Params emu_params(int64_t V, int64_t D, int64_t H, int64_t W, int64_t S, int64_t rows,
                                         uint64_t seed, const double* G, double att, const double* bg,
                                         const double* sharp,
                                         const int64_t* volume_index) {
  medfast::ussim::Params P{};
  P.V = V;
  P.volume_index = volume_index;
  P.D = D;
  P.H = H;
  P.W = W;
  P.S = S;
  P.noise_mask = rows - 1;
  P.seed = seed;
  for (int i = 0; i < 12; ++i) P.G[i] = G[i];
  P.att = att;
  for (int i = 0; i < medfast::ussim::kProps; ++i) P.bg[i] = bg[i];
  for (int a = 0; a < 3; ++a) P.sharp[a] = sharp[a];  // per voxel axis
  return P;
}

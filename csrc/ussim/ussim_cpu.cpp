// CPU launcher of the ultrasound ray march: at::parallel_for over all rays of the batch, the
// arithmetic from ussim.h. The property gradient is scattered into the volume in a second,
// deterministic pass (in parallel over batch elements when each has its own volume).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "common/cpu_simd.h"
#include "ussim/ussim_launch.h"

namespace medfast::ussim {
namespace {

// The line-march loop, compiled twice: for the baseline x86-64 and for AVX2 + FMA (the header
// arithmetic is inlined into it, so hardware floor/round, FMA contraction), picked at run time.
template <typename T, typename A>
void lines_loop(const T* vol, int64_t vol_stride, int64_t Bv, const float* table, const Params& P, const T* st,
                const T* sp, const T* w, int64_t L, int64_t E, T* o, int64_t begin, int64_t end) {
  for (int64_t line = begin; line < end; ++line) {
    const int64_t b = line / L;
    march_line<T, A, true>(vol + frame_volume(P, b) * vol_stride, table, P, st + line * E * 3, sp + line * 3, w, E,
                           o + line * 3 * P.S, P.S);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define MEDFAST_USSIM_AVX2 1
template <typename T, typename A>
__attribute__((target("avx2,fma"))) void lines_loop_avx2(const T* vol, int64_t vol_stride, int64_t Bv,
                                                         const float* table, const Params& P, const T* st,
                                                         const T* sp, const T* w, int64_t L, int64_t E, T* o,
                                                         int64_t begin, int64_t end) {
  for (int64_t line = begin; line < end; ++line) {
    const int64_t b = line / L;
    march_line<T, A, true>(vol + frame_volume(P, b) * vol_stride, table, P, st + line * E * 3, sp + line * 3, w, E,
                           o + line * 3 * P.S, P.S);
  }
}

template <typename T, typename A>
__attribute__((target("avx2,fma"))) void backward_loop_avx2(const T* vol, int64_t vol_stride, int64_t Bv,
                                                            const float* table, const Params& P, const T* c,
                                                            const T* g, T* gv, T* gc, int64_t R, int64_t begin,
                                                            int64_t end) {
  const int64_t S = P.S;
  for (int64_t ray = begin; ray < end; ++ray) {
    const int64_t b = ray / R;
    march_ray_backward<T, A, true>(vol + frame_volume(P, b) * vol_stride, table, P, c + ray * S * 3, g + ray * S * 3,
                             gv ? gv + ray * S * kProps : nullptr, gc ? gc + ray * S * 3 : nullptr);
  }
}

bool has_avx2() { return cpu_simd_available(); }
#endif

// The PSF's forward row loops (axial then lateral), compiled for the baseline and for AVX2 + FMA
// like lines_loop (the header rows vectorise 8 wide there).
#define MEDFAST_USSIM_PSF_FORWARD_BODY                                                                     \
  at::parallel_for(0, B * L * 3, grain, [&](int64_t begin, int64_t end) {                                 \
    for (int64_t r = begin; r < end; ++r)                                                                 \
      axial_row(xp + r * S, hp + (r % 3) * K, K, S, t + r * S);                                           \
  });                                                                                                     \
  at::parallel_for(0, B * L, grain, [&](int64_t begin, int64_t end) {                                     \
    for (int64_t bl = begin; bl < end; ++bl) {                                                            \
      const int64_t b = bl / L, l = bl % L;                                                               \
      const T* y = t + b * L * 3 * S;                                                                     \
      T* re = o + (b * 2 * L + l) * S;                                                                    \
      T* im = o + ((b * 2 + 1) * L + l) * S;                                                              \
      psf_lateral_row<T, A>(y, 3 * S, wp, J, L, S, l, 0, S, re, false, false);                            \
      psf_lateral_row<T, A>(y + S, 3 * S, wp + J * S, J, L, S, l, 0, S, re, false, true);                 \
      psf_lateral_row<T, A>(y + 2 * S, 3 * S, wp + 2 * J * S, J, L, S, l, 0, S, im, false, false);        \
    }                                                                                                     \
  });

template <typename T, typename A>
void psf_forward(const T* xp, const T* hp, const T* wp, T* t, T* o, int64_t B, int64_t L, int64_t S, int64_t K,
                 int64_t J, int64_t grain) {
  const auto axial_row = [](const T* x, const T* h, int64_t K, int64_t S, T* out) {
    psf_axial_row<T, A>(x, h, K, S, 0, S, out, false);
  };
  MEDFAST_USSIM_PSF_FORWARD_BODY
}

#ifdef MEDFAST_USSIM_AVX2
template <typename T, typename A>
__attribute__((target("avx2,fma"))) void psf_forward_avx2(const T* xp, const T* hp, const T* wp, T* t, T* o,
                                                          int64_t B, int64_t L, int64_t S, int64_t K, int64_t J,
                                                          int64_t grain) {
  // float32 axial rows: the register-blocked AVX2 row of ussim_cpu_avx2.cpp (same taps, same order).
  const auto axial_row = [](const T* x, const T* h, int64_t K, int64_t S, T* out) {
    if constexpr (std::is_same_v<T, float>)
      psf_axial_row_avx2(x, h, K, S, out);
    else
      psf_axial_row<T, A>(x, h, K, S, 0, S, out, false);
  };
  MEDFAST_USSIM_PSF_FORWARD_BODY
}
#endif
#undef MEDFAST_USSIM_PSF_FORWARD_BODY

}  // namespace

Tensor march_cpu(const Tensor& props, const Tensor& coords, const Tensor& noise, const Params& P) {
  const int64_t B = coords.size(0), R = coords.size(1), S = coords.size(2);
  Tensor out = at::empty({B, R, S, 3}, coords.options());
  const int64_t vol_stride = P.D * P.H * P.W * kProps;
  AT_DISPATCH_FLOATING_TYPES(coords.scalar_type(), "medfast_ussim_march_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* vol = props.const_data_ptr<scalar_t>();
    const scalar_t* c = coords.const_data_ptr<scalar_t>();
    const float* table = noise.const_data_ptr<float>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * R, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ray = begin; ray < end; ++ray) {
        const int64_t b = ray / R;
        march_ray<scalar_t, A>(vol + frame_volume(P, b) * vol_stride, table, P, c + ray * S * 3, o + ray * S * 3);
      }
    });
  });
  return out;
}

Tensor march_lines_cpu(const Tensor& props, const Tensor& start, const Tensor& step, const Tensor& weights,
                       const Tensor& noise, const Params& P) {
  const int64_t B = start.size(0), L = start.size(1), E = start.size(2), S = P.S, Bv = props.size(0);
  Tensor out = at::empty({B, L, 3, S}, start.options());
  const int64_t vol_stride = P.D * P.H * P.W * kProps;
  if (start.scalar_type() == at::kFloat && march_lines_avx2_applies(P)) {
    const Tensor wT = weights.permute({0, 2, 1}).contiguous();  // (E, 3, S): contiguous vector loads
    const float* vol = props.const_data_ptr<float>();
    const float* st = start.const_data_ptr<float>();
    const float* sp = step.const_data_ptr<float>();
    const float* w = weights.const_data_ptr<float>();
    const float* wt = wT.const_data_ptr<float>();
    const float* table = noise.const_data_ptr<float>();
    float* o = out.mutable_data_ptr<float>();
    at::parallel_for(0, B * L, 1, [&](int64_t begin, int64_t end) {
      march_lines_avx2(vol, vol_stride, Bv, table, P, st, sp, w, wt, L, E, o, begin, end);
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(start.scalar_type(), "medfast_ussim_march_lines_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* vol = props.const_data_ptr<scalar_t>();
    const scalar_t* st = start.const_data_ptr<scalar_t>();
    const scalar_t* sp = step.const_data_ptr<scalar_t>();
    const scalar_t* w = weights.const_data_ptr<scalar_t>();
    const float* table = noise.const_data_ptr<float>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * L, 1, [&](int64_t begin, int64_t end) {
#ifdef MEDFAST_USSIM_AVX2
      if (has_avx2()) {
        lines_loop_avx2<scalar_t, A>(vol, vol_stride, Bv, table, P, st, sp, w, L, E, o, begin, end);
        return;
      }
#endif
      lines_loop<scalar_t, A>(vol, vol_stride, Bv, table, P, st, sp, w, L, E, o, begin, end);
    });
  });
  return out;
}

Tensor psf_cpu(const Tensor& x, const Tensor& h, const Tensor& w, bool transpose) {
  const int64_t B = x.size(0), S = x.size(3), L = transpose ? x.size(2) : x.size(1);
  const int64_t K = h.size(1), J = w.size(1);
  Tensor tmp = at::empty({B, L, 3, S}, x.options());
  Tensor out = transpose ? at::empty({B, L, 3, S}, x.options()) : at::empty({B, 2, L, S}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "medfast_ussim_psf_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* t = tmp.mutable_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 4096 / S);
    if (!transpose) {
#ifdef MEDFAST_USSIM_AVX2
      if (has_avx2()) {
        psf_forward_avx2<scalar_t, A>(xp, hp, wp, t, o, B, L, S, K, J, grain);
        return;
      }
#endif
      psf_forward<scalar_t, A>(xp, hp, wp, t, o, B, L, S, K, J, grain);
    } else {
      at::parallel_for(0, B * L * 3, grain, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t c = r % 3, l = (r / 3) % L, b = r / (3 * L);
          const scalar_t* g = xp + (b * 2 + (c < 2 ? 0 : 1)) * L * S;
          psf_lateral_row<scalar_t, A>(g, S, wp + c * J * S, J, L, S, l, 0, S, t + r * S, true, false);
        }
      });
      at::parallel_for(0, B * L * 3, grain, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r)
          psf_axial_row<scalar_t, A>(t + r * S, hp + (r % 3) * K, K, S, 0, S, o + r * S, true);
      });
    }
  });
  return out;
}

std::tuple<Tensor, Tensor> march_backward_cpu(const Tensor& grad, const Tensor& props, const Tensor& coords,
                                              const Tensor& noise, const Params& P, bool props_grad,
                                              bool coords_grad) {
  const int64_t B = coords.size(0), R = coords.size(1), S = coords.size(2), Bv = props.size(0);
  const int64_t vol_stride = P.D * P.H * P.W * kProps;
  Tensor gvals = props_grad ? at::empty({B, R, S, kProps}, coords.options()) : Tensor();
  Tensor gcoords = coords_grad ? at::empty(coords.sizes(), coords.options()) : at::empty({0}, coords.options());
  Tensor gprops = props_grad ? at::zeros(props.sizes(), props.options()) : at::empty({0}, props.options());
  AT_DISPATCH_FLOATING_TYPES(coords.scalar_type(), "medfast_ussim_march_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* vol = props.const_data_ptr<scalar_t>();
    const scalar_t* c = coords.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const float* table = noise.const_data_ptr<float>();
    scalar_t* gv = props_grad ? gvals.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gc = coords_grad ? gcoords.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, B * R, 1, [&](int64_t begin, int64_t end) {
#ifdef MEDFAST_USSIM_AVX2
      if (has_avx2()) {
        backward_loop_avx2<scalar_t, A>(vol, vol_stride, Bv, table, P, c, g, gv, gc, R, begin, end);
        return;
      }
#endif
      for (int64_t ray = begin; ray < end; ++ray) {
        const int64_t b = ray / R;
        march_ray_backward<scalar_t, A, true>(vol + frame_volume(P, b) * vol_stride, table, P, c + ray * S * 3,
                                        g + ray * S * 3, gv ? gv + ray * S * kProps : nullptr,
                                        gc ? gc + ray * S * 3 : nullptr);
      }
    });
    if (props_grad) {
      scalar_t* gp = gprops.mutable_data_ptr<scalar_t>();
      const auto add = [](scalar_t* dst, scalar_t v) { *dst += v; };
      // One task per (volume, slab of the first volume axis): the frames of a volume are added in frame
      // and sample order, each voxel by exactly one task (deterministic, the same sums as one serial
      // pass). Slabs where a volume may take several frames (one volume, or a volume index).
      const int64_t V = props.size(0), per_frame = R * S;
      const bool shared = V == 1 || P.volume_index != nullptr;
      const int64_t slabs = shared ? std::min<int64_t>(P.D, 4 * at::get_num_threads()) : 1;
      at::parallel_for(0, V * slabs, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t v = task / slabs, slab = task % slabs;
          const int64_t i_lo = slab * P.D / slabs, i_hi = (slab + 1) * P.D / slabs;
          for (int64_t b = 0; b < B; ++b) {
            if (frame_volume(P, b) != v) continue;
            for (int64_t k = b * per_frame; k < (b + 1) * per_frame; ++k) {
              A gk[kProps];
              for (int q = 0; q < kProps; ++q) gk[q] = static_cast<A>(gv[k * kProps + q]);
              scatter_props<A>(gp + v * vol_stride, P, static_cast<A>(c[3 * k]), static_cast<A>(c[3 * k + 1]),
                               static_cast<A>(c[3 * k + 2]), gk, add, slabs == 1 ? int64_t(0) : i_lo,
                               slabs == 1 ? INT64_MAX : i_hi);
            }
          }
        }
      });
    }
  });
  return {gprops, gcoords};
}

}  // namespace medfast::ussim

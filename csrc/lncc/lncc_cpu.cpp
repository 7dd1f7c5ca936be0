// CPU launcher of the LNCC family (per-voxel arithmetic in lncc.h). The five local sums are box
// filters computed separably, in place, by running sums along each axis: O(1) work per voxel and
// axis whatever the window size. Along an inner axis the running sums of a chunk of adjacent
// lines advance together (the loop over the chunk vectorizes); they are accumulated in double, so
// no drift builds up along a line. No reduction crosses threads: bitwise reproducible.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "lncc/lncc_launch.h"

namespace medfast::lncc {
namespace {

constexpr int64_t kChunk = 64;  // adjacent lines advanced together along a non-contiguous axis

// In-place zero-padded box sum of radius r along the middle axis of data laid out [outer][n][inner].
template <typename T>
void box_axis(T* data, int64_t outer, int64_t n, int64_t inner, int64_t r) {
  if (r == 0) return;
  const int64_t chunks = (inner + kChunk - 1) / kChunk;
  at::parallel_for(0, outer * chunks, inner == 1 ? 64 : 1, [&](int64_t begin, int64_t end) {
    std::vector<T> copy(static_cast<size_t>(n * std::min(inner, kChunk)));
    std::vector<double> acc(static_cast<size_t>(std::min(inner, kChunk)));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t o = task / chunks, c0 = (task - o * chunks) * kChunk;
      const int64_t len = std::min(kChunk, inner - c0);
      T* base = data + o * n * inner + c0;
      T* cp = copy.data();
      double* a = acc.data();
      for (int64_t i = 0; i < n; ++i) std::copy(base + i * inner, base + i * inner + len, cp + i * len);
      for (int64_t v = 0; v < len; ++v) a[v] = 0.0;
      for (int64_t j = 0; j <= std::min(r, n - 1); ++j)
        for (int64_t v = 0; v < len; ++v) a[v] += static_cast<double>(cp[j * len + v]);
      for (int64_t i = 0; i < n; ++i) {
        if (i > 0) {
          if (i + r < n) {
            const T* add = cp + (i + r) * len;
            for (int64_t v = 0; v < len; ++v) a[v] += static_cast<double>(add[v]);
          }
          if (i - r - 1 >= 0) {
            const T* sub = cp + (i - r - 1) * len;
            for (int64_t v = 0; v < len; ++v) a[v] -= static_cast<double>(sub[v]);
          }
        }
        T* out = base + i * inner;
        for (int64_t v = 0; v < len; ++v) out[v] = static_cast<T>(a[v]);
      }
    }
  });
}

// buf [kFields][bc * volume] <- products of (t, p), box-summed along every axis.
template <typename T>
void local_sums(const Geometry& g, const T* t, const T* p, T* buf) {
  const int64_t M = g.total();
  at::parallel_for(0, M, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T f[kFields];
      products(t[i], p[i], f);
      for (int k = 0; k < kFields; ++k) buf[k * M + i] = f[k];
    }
  });
  for (int a = 0; a < 3; ++a) box_axis(buf, g.outer(a), g.n[a], g.inner(a), g.r[a]);
}

}  // namespace

Tensor lncc_cpu(const Tensor& pred, const Tensor& target, at::IntArrayRef kernel_size, double nr, double dr) {
  const Geometry g(pred, kernel_size);
  const Tensor p = pred.contiguous(), t = target.contiguous();
  Tensor out = at::empty_like(p);
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "medfast_lncc_cpu", [&] {
    using T = scalar_t;
    const int64_t M = g.total();
    Tensor buffer = at::empty({kFields * M}, p.options());
    T* buf = buffer.mutable_data_ptr<T>();
    local_sums(g, t.const_data_ptr<T>(), p.const_data_ptr<T>(), buf);
    T* o = out.mutable_data_ptr<T>();
    const T N = static_cast<T>(g.window), tnr = static_cast<T>(nr), tdr = static_cast<T>(dr);
    at::parallel_for(0, M, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        T s[kFields];
        for (int k = 0; k < kFields; ++k) s[k] = buf[k * M + i];
        o[i] = ncc_voxel(s, N, tnr, tdr);
      }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor> lncc_backward_cpu(const Tensor& grad, const Tensor& pred, const Tensor& target,
                                             at::IntArrayRef kernel_size, double nr, double dr) {
  const Geometry g(pred, kernel_size);
  const Tensor p = pred.contiguous(), t = target.contiguous(), gr = grad.contiguous();
  Tensor grad_pred = at::empty_like(p), grad_target = at::empty_like(t);
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "medfast_lncc_backward_cpu", [&] {
    using T = scalar_t;
    const int64_t M = g.total();
    const T* tp = t.const_data_ptr<T>();
    const T* pp = p.const_data_ptr<T>();
    const T* gp = gr.const_data_ptr<T>();
    Tensor buffer = at::empty({kFields * M}, p.options());
    T* b = buffer.mutable_data_ptr<T>();
    local_sums(g, tp, pp, b);
    const T N = static_cast<T>(g.window), tnr = static_cast<T>(nr), tdr = static_cast<T>(dr);
    at::parallel_for(0, M, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        T s[kFields];
        for (int k = 0; k < kFields; ++k) s[k] = b[k * M + i];
        adjoint_voxel(s, gp[i], N, tnr, tdr);
        for (int k = 0; k < kFields; ++k) b[k * M + i] = s[k];
      }
    });
    for (int a = 0; a < 3; ++a) box_axis(b, g.outer(a), g.n[a], g.inner(a), g.r[a]);
    T* gpo = grad_pred.mutable_data_ptr<T>();
    T* gto = grad_target.mutable_data_ptr<T>();
    at::parallel_for(0, M, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        T s[kFields];
        for (int k = 0; k < kFields; ++k) s[k] = b[k * M + i];
        combine_voxel(s, tp[i], pp[i], gto[i], gpo[i]);
      }
    });
  });
  return {grad_pred, grad_target};
}

}  // namespace medfast::lncc

// CPU launcher of the LNCC family (per-voxel arithmetic in lncc.h). The five local sums are box
// filters computed separably by running sums: O(1) work per voxel and axis whatever the window.
// Three passes over a field-major buffer [kFields][B * C * volume]:
//   1. along the last (contiguous) axis, line by line, computing the products on the fly;
//   2. along the middle axis, in place, the running sums of a chunk of adjacent lines advancing
//      together (the loop over the chunk vectorizes);
//   3. along the first axis, likewise, with the per-voxel epilogue (ncc, or the input gradients)
//      applied as each voxel's sums are complete.
// The forward keeps the complete sums (5 values per voxel) for the backward, which computes the
// adjoints while reading them in its first pass: 3 + 3 passes in all.
// Running sums are accumulated in double (no drift along a line). No reduction crosses threads:
// results are bitwise reproducible.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "lncc/lncc_launch.h"

namespace medfast::lncc {
namespace {

constexpr int64_t kChunk = 64;  // adjacent lines advanced together along a non-contiguous axis

// Running box sums of radius r along one line of n voxels for the five fields:
// fetch(j, f) gives the five values at j, store(i, a) receives the five sums at i.
template <typename T, typename Fetch, typename Store>
inline void running_line(int64_t n, int64_t r, Fetch fetch, Store store) {
  double a[kFields] = {0, 0, 0, 0, 0};
  T f[kFields];
  for (int64_t j = 0; j <= std::min(r, n - 1); ++j) {
    fetch(j, f);
    for (int k = 0; k < kFields; ++k) a[k] += static_cast<double>(f[k]);
  }
  for (int64_t i = 0; i < n; ++i) {
    if (i > 0) {
      if (i + r < n) {
        fetch(i + r, f);
        for (int k = 0; k < kFields; ++k) a[k] += static_cast<double>(f[k]);
      }
      if (i - r - 1 >= 0) {
        fetch(i - r - 1, f);
        for (int k = 0; k < kFields; ++k) a[k] -= static_cast<double>(f[k]);
      }
    }
    store(i, a);
  }
}

// Pass 1 from the images: buf <- box sums of the products along the last axis.
template <typename T>
void last_axis_products(const Geometry& g, const T* t, const T* p, T* buf) {
  const int64_t M = g.total(), n = g.n[2], r = g.r[2];
  at::parallel_for(0, M / n, 16, [&](int64_t l0, int64_t l1) {
    for (int64_t l = l0; l < l1; ++l) {
      const T* tl = t + l * n;
      const T* pl = p + l * n;
      T* out = buf + l * n;
      running_line<T>(
          n, r, [&](int64_t j, T* f) { products(tl[j], pl[j], f); },
          [&](int64_t i, const double* a) {
            for (int k = 0; k < kFields; ++k) out[k * M + i] = static_cast<T>(a[k]);
          });
    }
  });
}

// Backward pass 1: buf <- box sums along the last axis of the adjoints of the five complete local
// sums `sums` (field-major [kFields][M], left untouched) for the upstream gradient g.
template <typename T>
void last_axis_adjoints(const Geometry& g, const T* sums, const T* grad, T* buf, T N, T nr, T dr) {
  const int64_t M = g.total(), n = g.n[2], r = g.r[2];
  at::parallel_for(0, M / n, 16, [&](int64_t l0, int64_t l1) {
    std::vector<T> adj(static_cast<size_t>(kFields * n));
    for (int64_t l = l0; l < l1; ++l) {
      const int64_t x0 = l * n;
      for (int64_t j = 0; j < n; ++j) {
        T s[kFields];
        for (int k = 0; k < kFields; ++k) s[k] = sums[k * M + x0 + j];
        adjoint_voxel(s, grad[x0 + j], N, nr, dr);
        for (int k = 0; k < kFields; ++k) adj[k * n + j] = s[k];
      }
      const T* c = adj.data();
      T* line = buf + x0;
      running_line<T>(
          n, r, [&](int64_t j, T* f) {
            for (int k = 0; k < kFields; ++k) f[k] = c[k * n + j];
          },
          [&](int64_t i, const double* a) {
            for (int k = 0; k < kFields; ++k) line[k * M + i] = static_cast<T>(a[k]);
          });
    }
  });
}

// Pass 2: in-place box sums of radius r along the middle axis of data laid out [outer][n][inner].
template <typename T>
void middle_axis(T* data, int64_t outer, int64_t n, int64_t inner, int64_t r) {
  if (r == 0 || n == 1) return;
  const int64_t chunks = (inner + kChunk - 1) / kChunk;
  at::parallel_for(0, outer * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> copy(static_cast<size_t>(n * kChunk));
    double a[kChunk];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t o = task / chunks, c0 = (task - o * chunks) * kChunk;
      const int64_t len = std::min(kChunk, inner - c0);
      T* base = data + o * n * inner + c0;
      T* cp = copy.data();
      for (int64_t i = 0; i < n; ++i) std::copy(base + i * inner, base + i * inner + len, cp + i * len);
      for (int64_t v = 0; v < len; ++v) a[v] = 0.0;
      for (int64_t j = 0; j <= std::min(r, n - 1); ++j)
        for (int64_t v = 0; v < len; ++v) a[v] += static_cast<double>(cp[j * len + v]);
      for (int64_t i = 0; i < n; ++i) {
        if (i > 0 && i + r < n)
          for (int64_t v = 0; v < len; ++v) a[v] += static_cast<double>(cp[(i + r) * len + v]);
        if (i > 0 && i - r - 1 >= 0)
          for (int64_t v = 0; v < len; ++v) a[v] -= static_cast<double>(cp[(i - r - 1) * len + v]);
        T* out = base + i * inner;
        for (int64_t v = 0; v < len; ++v) out[v] = static_cast<T>(a[v]);
      }
    }
  });
}

// Pass 3: box sums along the first axis of all five fields together, then epi(x, s) for every
// voxel x (flat index in [0, M)) with its five complete sums s. epi may overwrite buf at x.
template <typename T, typename Epi>
void first_axis(const Geometry& g, T* buf, Epi epi) {
  const int64_t M = g.total(), n = g.n[0], r = g.r[0], inner = g.inner(0);
  const int64_t chunks = (inner + kChunk - 1) / kChunk;
  at::parallel_for(0, g.bc * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> copy(static_cast<size_t>(kFields * n * kChunk));
    std::vector<double> acc(static_cast<size_t>(kFields * kChunk));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bc = task / chunks, c0 = (task - bc * chunks) * kChunk;
      const int64_t len = std::min(kChunk, inner - c0);
      const int64_t x0 = bc * n * inner + c0;  // flat index of (bc, row 0, c0)
      for (int k = 0; k < kFields; ++k) {
        T* cp = copy.data() + k * n * len;
        const T* base = buf + k * M + x0;
        for (int64_t i = 0; i < n; ++i) std::copy(base + i * inner, base + i * inner + len, cp + i * len);
        double* a = acc.data() + k * len;
        for (int64_t v = 0; v < len; ++v) a[v] = 0.0;
        for (int64_t j = 0; j <= std::min(r, n - 1); ++j)
          for (int64_t v = 0; v < len; ++v) a[v] += static_cast<double>(cp[j * len + v]);
      }
      for (int64_t i = 0; i < n; ++i) {
        for (int k = 0; k < kFields; ++k) {
          const T* cp = copy.data() + k * n * len;
          double* a = acc.data() + k * len;
          if (i > 0 && i + r < n)
            for (int64_t v = 0; v < len; ++v) a[v] += static_cast<double>(cp[(i + r) * len + v]);
          if (i > 0 && i - r - 1 >= 0)
            for (int64_t v = 0; v < len; ++v) a[v] -= static_cast<double>(cp[(i - r - 1) * len + v]);
        }
        const int64_t xi = x0 + i * inner;
        for (int64_t v = 0; v < len; ++v) {
          T s[kFields];
          for (int k = 0; k < kFields; ++k) s[k] = static_cast<T>(acc[k * len + v]);
          epi(xi + v, s);
        }
      }
    }
  });
}

// Passes 1 and 2 from the images: buf holds the sums along the last two axes.
template <typename T>
void partial_sums(const Geometry& g, const T* t, const T* p, T* buf) {
  last_axis_products(g, t, p, buf);
  middle_axis(buf, g.outer(1), g.n[1], g.inner(1), g.r[1]);
}

}  // namespace

std::tuple<Tensor, Tensor> lncc_cpu(const Tensor& pred, const Tensor& target, at::IntArrayRef kernel_size,
                                    double nr, double dr) {
  const Geometry g(pred, kernel_size);
  const Tensor p = pred.contiguous(), t = target.contiguous();
  Tensor out = at::empty_like(p);
  Tensor sums = at::empty(sums_shape(p), p.options());
  if (p.numel() == 0) return {out, sums};  // (an empty last axis: no lines, and M / n would divide by zero)
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "medfast_lncc_cpu", [&] {
    using T = scalar_t;
    const int64_t M = g.total();
    T* buf = sums.mutable_data_ptr<T>();
    partial_sums(g, t.const_data_ptr<T>(), p.const_data_ptr<T>(), buf);
    T* o = out.mutable_data_ptr<T>();
    const T N = static_cast<T>(g.window), tnr = static_cast<T>(nr), tdr = static_cast<T>(dr);
    first_axis(g, buf, [&](int64_t x, const T* s) {
      o[x] = ncc_voxel(s, N, tnr, tdr);
      for (int k = 0; k < kFields; ++k) buf[k * M + x] = s[k];  // keep the complete sums
    });
  });
  return {out, sums};
}

std::tuple<Tensor, Tensor> lncc_backward_cpu(const Tensor& grad, const Tensor& pred, const Tensor& target,
                                             const Tensor& sums, at::IntArrayRef kernel_size, double nr, double dr) {
  const Geometry g(pred, kernel_size);
  const Tensor p = pred.contiguous(), t = target.contiguous(), gr = grad.contiguous(), sm = sums.contiguous();
  Tensor grad_pred = at::empty_like(p), grad_target = at::empty_like(t);
  if (p.numel() == 0) return {grad_pred, grad_target};  // (as the forward: nothing to sum, no division by n = 0)
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "medfast_lncc_backward_cpu", [&] {
    using T = scalar_t;
    const T* tp = t.const_data_ptr<T>();
    const T* pp = p.const_data_ptr<T>();
    Tensor buffer = at::empty({kFields * g.total()}, p.options());
    T* b = buffer.mutable_data_ptr<T>();
    const T N = static_cast<T>(g.window), tnr = static_cast<T>(nr), tdr = static_cast<T>(dr);
    // adjoints of the saved sums, box-summed (the box is self-adjoint), combined with the images
    last_axis_adjoints(g, sm.const_data_ptr<T>(), gr.const_data_ptr<T>(), b, N, tnr, tdr);
    middle_axis(b, g.outer(1), g.n[1], g.inner(1), g.r[1]);
    T* gpo = grad_pred.mutable_data_ptr<T>();
    T* gto = grad_target.mutable_data_ptr<T>();
    first_axis(g, b, [&](int64_t x, const T* s) { combine_voxel(s, tp[x], pp[x], gto[x], gpo[x]); });
  });
  return {grad_pred, grad_target};
}

}  // namespace medfast::lncc

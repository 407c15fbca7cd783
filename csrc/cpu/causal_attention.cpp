// CPU kernel of rllc_fast::causal_attention and its backward: causal softmax attention of
// q, k, v [batch, heads, T, D] (float32, T <= 128, D in 8, 16, 32, 64, any strides but stride 1 along D)
// for the engine's short sequences and small heads, where torch's CPU flash attention runs far below the
// machine's rate (its tiles are sized for long sequences). Each (batch, head) pair is one thread's work,
// with the keys and values transposed into a [D, T] scratch; queries (and, in the backward's second pass,
// keys) go in register tiles of a few rows, so that each vector load of 16 keys serves every row of the
// tile. The forward keeps the row log-sum-exp; the backward recomputes the probabilities from it (as
// flash attention does), keeps P and dS of the pair in scratch, and forms dV = P^T dO, dK = dS^T Q by key
// tiles. Vectors are GCC's generic vectors (csrc/cpu/vec.h); on x86-64 GCC builds each entry function is
// compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2) and the baseline, picked at load time.
// The reference it is tested against is the PyTorch fallback in rllc_fast/ops.py (tests/test_cpu_kernels.py).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "../tensor_info.h"
#include "vec.h"

namespace {
using namespace rllc_fast::vec;
constexpr int MAX_T = 128;  // longest sequence the kernel takes (the op's check says so)

template <int D> struct Row { typedef float type __attribute__((vector_size(D * 4))); };  // one row of q, k, v

template <int D> RLLC_INLINE typename Row<D>::type load_row(const float* p) {
  typename Row<D>::type v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <int D> RLLC_INLINE void store_row(float* p, typename Row<D>::type v) { std::memcpy(p, &v, sizeof v); }

// A [B, H, T, D] float32 tensor with unit stride along D: element (b, h, t, e) at p[b sb + h sh + t st + e].
template <class F> struct View {
  F* p;
  int64_t sb, sh, st, H;
  inline __attribute__((always_inline)) F* rows(int64_t bh) const { return p + (bh / H) * sb + (bh % H) * sh; }  // row t at + t * st
};
template <class F> View<F> view(const at::Tensor& t, F* p) { return {p, t.stride(0), t.stride(1), t.stride(2), t.size(1)}; }

// x [T, D] (rows st apart) -> xt [D, TP], zero padded
RLLC_INLINE void transpose(const float* x, int64_t st, float* xt, int T, int TP, int D) {
  for (int e = 0; e < D; ++e) {
    float* row = xt + e * TP;
    for (int j = 0; j < T; ++j) row[j] = x[j * st + e];
    for (int j = T; j < TP; ++j) row[j] = 0.f;
  }
}

// Rows per register tile: QT query (or key) rows share every vector load of the other operand.
template <int D> constexpr int tile_rows() { return D <= 16 ? 8 : 4; }

RLLC_INLINE vf lane_index(int blk) {  // the key positions of block blk
  vf v;
  for (int l = 0; l < W; ++l) v[l] = (float)(blk * W + l);
  return v;
}

// acc[u] = a_u . b_j for the 16 columns j of block blk of b^T [D, TP], for rows a_u = arow[u] (QT rows)
template <int D, int QT> RLLC_INLINE void tile_dots(const float* const* arow, const float* bt, int TP, int blk, vf* acc) {
  for (int u = 0; u < QT; ++u) acc[u] = vf{};
  for (int e = 0; e < D; ++e) {
    const vf col = load(bt + e * TP + blk * W);
    for (int u = 0; u < QT; ++u) acc[u] += arow[u][e] * col;
  }
}

// acc[u] = sum_{j < n} w[u ws + j] x_j over rows x_j = x + j sx of D floats (QT weighted sums at once)
template <int D, int QT>
RLLC_INLINE void tile_weighted(const float* w, int64_t ws, const float* x, int64_t sx, int n, typename Row<D>::type* acc) {
  for (int u = 0; u < QT; ++u) acc[u] = typename Row<D>::type{};
  for (int j = 0; j < n; ++j) {
    const typename Row<D>::type xj = load_row<D>(x + j * sx);
    for (int u = 0; u < QT; ++u) acc[u] += w[u * ws + j] * xj;
  }
}

// (batch, head) pairs [b0, b1): out and the row log-sum-exp lse [B*H, T] (contiguous). Queries in tiles of
// QT rows: scores tile by key block of 16 (masked past the diagonal), softmax rows, then P V.
template <int D>
RLLC_CLONES void forward_range(View<const float> q, View<const float> k, View<const float> v, View<float> out,
                               float* lse, int64_t b0, int64_t b1, int T, float scale) {
  constexpr int QT = tile_rows<D>();
  const int TP = (T + W - 1) / W * W;
  std::vector<float> kt(D * TP), S(QT * TP);
  for (int64_t bh = b0; bh < b1; ++bh) {
    const float *qb = q.rows(bh), *vb = v.rows(bh);
    float* ob = out.rows(bh);
    transpose(k.rows(bh), k.st, kt.data(), T, TP, D);
    for (int i0 = 0; i0 < T; i0 += QT) {
      const int rows = std::min(QT, T - i0), last = i0 + rows - 1, nb = last / W + 1;
      const float* qrow[QT];
      for (int u = 0; u < QT; ++u) qrow[u] = qb + std::min(i0 + u, last) * q.st;  // rows past T repeat the last
      vf mv[QT];
      for (int u = 0; u < QT; ++u) mv[u] = splat(-INFINITY);
      for (int blk = 0; blk < nb; ++blk) {
        vf acc[QT];
        tile_dots<D, QT>(qrow, kt.data(), TP, blk, acc);
        const vf key = lane_index(blk);
        for (int u = 0; u < QT; ++u) {
          const vf x = key <= (float)(i0 + u) ? acc[u] * scale : splat(-INFINITY);
          store(S.data() + u * TP + blk * W, x);
          mv[u] = x > mv[u] ? x : mv[u];
        }
      }
      float m[QT], total[QT];
      for (int u = 0; u < QT; ++u) {
        m[u] = hmax(mv[u]);
        vf sum = {};
        for (int blk = 0; blk < nb; ++blk) {
          vf e = exp_nonpositive(load(S.data() + u * TP + blk * W) - m[u]);
          e = lane_index(blk) <= (float)(i0 + u) ? e : vf{};
          sum += e;
          store(S.data() + u * TP + blk * W, e);
        }
        total[u] = hsum(sum);
      }
      typename Row<D>::type acc[QT];
      tile_weighted<D, QT>(S.data(), TP, vb, v.st, last + 1, acc);
      for (int u = 0; u < rows; ++u) {
        store_row<D>(ob + (i0 + u) * out.st, acc[u] * (1.f / total[u]));
        lse[bh * T + i0 + u] = m[u] + std::log(total[u]);
      }
    }
  }
}

// (batch, head) pairs [b0, b1): dq, dk, dv. Pass 1, by query tiles: P = exp(scores - lse) and dS = P (dP - delta)
// scale (dP = dO V^T, delta = sum_j P dP = dO . out) into [T, TP] scratch, and dQ = dS K. Pass 2, by key tiles:
// dV = P^T dO, dK = dS^T Q. Scratch entries past the diagonal are zero, as far as a key tile reaches.
template <int D>
RLLC_CLONES void backward_range(View<const float> q, View<const float> k, View<const float> v,
                                View<const float> o, View<const float> g, const float* lse, View<float> dq,
                                View<float> dk, View<float> dv, int64_t b0, int64_t b1, int T, float scale) {
  constexpr int QT = tile_rows<D>();
  typedef typename Row<D>::type R;
  const int TP = (T + W - 1) / W * W;
  std::vector<float> kt(D * TP), vt(D * TP), P((T + QT) * TP), S((T + QT) * TP);
  for (int64_t bh = b0; bh < b1; ++bh) {
    const float *qb = q.rows(bh), *kb = k.rows(bh), *ob = o.rows(bh), *gb = g.rows(bh);
    transpose(kb, k.st, kt.data(), T, TP, D);
    transpose(v.rows(bh), v.st, vt.data(), T, TP, D);
    for (int i0 = 0; i0 < T; i0 += QT) {
      const int rows = std::min(QT, T - i0), last = i0 + rows - 1, nb = last / W + 1;
      const int nz = std::min(TP / W, (last + QT - 1) / W + 1);  // blocks a key tile of pass 2 reads
      const float *qrow[QT], *grow[QT];
      float delta[QT], li[QT];
      for (int u = 0; u < QT; ++u) {
        const int i = std::min(i0 + u, last);
        qrow[u] = qb + i * q.st;
        grow[u] = gb + i * g.st;
        delta[u] = lane_sum(load_row<D>(grow[u]) * load_row<D>(ob + i * o.st));
        li[u] = lse[bh * T + i];
      }
      for (int blk = 0; blk < nb; ++blk) {
        vf sacc[QT], dacc[QT];
        tile_dots<D, QT>(qrow, kt.data(), TP, blk, sacc);
        tile_dots<D, QT>(grow, vt.data(), TP, blk, dacc);
        const vf key = lane_index(blk);
        for (int u = 0; u < QT; ++u) {
          vf p = exp_nonpositive(sacc[u] * scale - li[u]);
          p = key <= (float)(i0 + u) ? p : vf{};
          store(P.data() + (i0 + u) * TP + blk * W, p);
          store(S.data() + (i0 + u) * TP + blk * W, p * (dacc[u] - delta[u]) * scale);
        }
      }
      for (int blk = nb; blk < nz; ++blk)
        for (int u = 0; u < QT; ++u) {
          store(P.data() + (i0 + u) * TP + blk * W, vf{});
          store(S.data() + (i0 + u) * TP + blk * W, vf{});
        }
      R acc[QT];
      tile_weighted<D, QT>(S.data() + i0 * TP, TP, kb, k.st, last + 1, acc);
      for (int u = 0; u < rows; ++u) store_row<D>(dq.rows(bh) + (i0 + u) * dq.st, acc[u]);
    }
    for (int j0 = 0; j0 < T; j0 += QT) {  // keys j0 .. j0 + QT - 1: dV_j = sum_{i >= j} P_ij dO_i, dK_j = sum dS_ij Q_i
      const int cols = std::min(QT, T - j0);
      R av[QT], ak[QT];
      for (int u = 0; u < QT; ++u) av[u] = ak[u] = R{};
      for (int i = j0; i < T; ++i) {
        const R gi = load_row<D>(gb + i * g.st), qi = load_row<D>(qb + i * q.st);
        const float *pi = P.data() + i * TP + j0, *si = S.data() + i * TP + j0;
        for (int u = 0; u < QT; ++u) {
          av[u] += pi[u] * gi;
          ak[u] += si[u] * qi;
        }
      }
      for (int u = 0; u < cols; ++u) {
        store_row<D>(dv.rows(bh) + (j0 + u) * dv.st, av[u]);
        store_row<D>(dk.rows(bh) + (j0 + u) * dk.st, ak[u]);
      }
    }
  }
}

int64_t grain(int64_t T, int64_t D) { return std::max<int64_t>(1, 16384 / (T * T + T * D)); }

// An output like `t`: dense, in the order of t's strides (so a [B, T, H, D] layout stays one), unless that order
// would not put D innermost (an input that overlaps itself with stride 1 along another dimension): then contiguous.
// ops.py's fallback and fake kernel allocate by the same rule (_attention_output_like).
at::Tensor output_like(const at::Tensor& t) {
  at::Tensor out = at::empty_like(t);
  return out.stride(-1) == 1 ? out : at::empty_like(t, at::MemoryFormat::Contiguous);
}

std::tuple<at::Tensor, at::Tensor> causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    double scale) {
  using rllc_fast::tensor_info;
  rllc_fast::raise_value_error(rllc_fast::check_causal_attention_args(tensor_info(q), tensor_info(k), tensor_info(v)));
  const int64_t BH = q.size(0) * q.size(1), T = q.size(2), D = q.size(3);
  at::Tensor out = output_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), T}, q.options());
  if (BH == 0 || T == 0) return {out, lse};
  const auto qv = view(q, q.const_data_ptr<float>()), kv = view(k, k.const_data_ptr<float>()),
             vv = view(v, v.const_data_ptr<float>());
  const auto ov = view(out, out.mutable_data_ptr<float>());
  float* lp = lse.mutable_data_ptr<float>();
  const float s = static_cast<float>(scale);
  const int t = static_cast<int>(T);
  at::parallel_for(0, BH, grain(T, D), [&](int64_t b0, int64_t b1) {
    switch (D) {
      case 8: forward_range<8>(qv, kv, vv, ov, lp, b0, b1, t, s); break;
      case 16: forward_range<16>(qv, kv, vv, ov, lp, b0, b1, t, s); break;
      case 32: forward_range<32>(qv, kv, vv, ov, lp, b0, b1, t, s); break;
      default: forward_range<64>(qv, kv, vv, ov, lp, b0, b1, t, s); break;
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, double scale) {
  using rllc_fast::tensor_info;
  rllc_fast::raise_value_error(rllc_fast::check_causal_attention_backward_args(
      tensor_info(grad_out), tensor_info(q), tensor_info(k), tensor_info(v), tensor_info(out), tensor_info(lse)));
  const int64_t BH = q.size(0) * q.size(1), T = q.size(2), D = q.size(3);
  at::Tensor dq = output_like(q), dk = output_like(k), dv = output_like(v);
  if (BH == 0 || T == 0) return {dq, dk, dv};
  const auto qv = view(q, q.const_data_ptr<float>()), kv = view(k, k.const_data_ptr<float>()),
             vv = view(v, v.const_data_ptr<float>()), ov = view(out, out.const_data_ptr<float>()),
             gv = view(grad_out, grad_out.const_data_ptr<float>());
  const auto dqv = view(dq, dq.mutable_data_ptr<float>()), dkv = view(dk, dk.mutable_data_ptr<float>()),
             dvv = view(dv, dv.mutable_data_ptr<float>());
  const float* lp = lse.const_data_ptr<float>();
  const float s = static_cast<float>(scale);
  const int t = static_cast<int>(T);
  at::parallel_for(0, BH, grain(T, D), [&](int64_t b0, int64_t b1) {
    switch (D) {
      case 8: backward_range<8>(qv, kv, vv, ov, gv, lp, dqv, dkv, dvv, b0, b1, t, s); break;
      case 16: backward_range<16>(qv, kv, vv, ov, gv, lp, dqv, dkv, dvv, b0, b1, t, s); break;
      case 32: backward_range<32>(qv, kv, vv, ov, gv, lp, dqv, dkv, dvv, b0, b1, t, s); break;
      default: backward_range<64>(qv, kv, vv, ov, gv, lp, dqv, dkv, dvv, b0, b1, t, s); break;
    }
  });
  return {dq, dk, dv};
}
}  // namespace

TORCH_LIBRARY_IMPL(rllc_fast, CPU, m) {
  m.impl("causal_attention", &causal_attention);
  m.impl("causal_attention_backward", &causal_attention_backward);
}

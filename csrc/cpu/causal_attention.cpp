// CPU kernel of rllc_fast::causal_attention and its backward: causal softmax attention of
// q, k, v [batch, heads, T, D] (float32, T <= 128, D in 8, 16, 32, 64) for the engine's short sequences
// and small heads, where torch's CPU flash attention runs far below the machine's rate (its tiles are
// sized for long sequences). Per (batch, head), in one thread, with the keys and values transposed into
// a [D, T] scratch so that a query's scores against 16 keys are D multiply-adds of 16-lane vectors;
// the forward keeps the row log-sum-exp, the backward recomputes the probabilities from it (as flash
// attention does) and forms dV = P^T dO, dK = dS^T Q in a second pass over the keys.
// Vectors are GCC's generic vectors; on x86-64 GCC builds each entry function is compiled for
// x86-64-v4 (AVX-512), x86-64-v3 (AVX2) and the baseline, picked at load time (target_clones).
// The reference it is tested against is the PyTorch fallback in rllc_fast/ops.py (tests/test_attention.py).
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

// scale * (q_i . k_j) for the 16 keys j of block blk, from K^T [D, TP] (four accumulation chains)
template <int D> RLLC_INLINE vf scores(const float* qi, const float* kt, int TP, int blk, float scale) {
  vf a0 = {}, a1 = {}, a2 = {}, a3 = {};
  for (int e = 0; e + 4 <= D; e += 4) {
    a0 += qi[e] * load(kt + e * TP + blk * W);
    a1 += qi[e + 1] * load(kt + (e + 1) * TP + blk * W);
    a2 += qi[e + 2] * load(kt + (e + 2) * TP + blk * W);
    a3 += qi[e + 3] * load(kt + (e + 3) * TP + blk * W);
  }
  return ((a0 + a1) + (a2 + a3)) * scale;
}

RLLC_INLINE vf lane_index(int blk) {  // the key positions of block blk
  vf v;
  for (int l = 0; l < W; ++l) v[l] = (float)(blk * W + l);
  return v;
}

// sum_{j < n} w[j sw] x_j over rows x_j = x + j sx of D floats (four accumulation chains)
template <int D>
RLLC_INLINE typename Row<D>::type weighted_rows(const float* w, int64_t sw, const float* x, int64_t sx, int n) {
  typedef typename Row<D>::type R;
  R a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int j = 0;
  for (; j + 4 <= n; j += 4) {
    a0 += w[j * sw] * load_row<D>(x + j * sx);
    a1 += w[(j + 1) * sw] * load_row<D>(x + (j + 1) * sx);
    a2 += w[(j + 2) * sw] * load_row<D>(x + (j + 2) * sx);
    a3 += w[(j + 3) * sw] * load_row<D>(x + (j + 3) * sx);
  }
  for (; j < n; ++j) a0 += w[j * sw] * load_row<D>(x + j * sx);
  return (a0 + a1) + (a2 + a3);
}

// (batch, head) pairs [b0, b1): out and the row log-sum-exp lse [B*H, T] (contiguous)
template <int D>
RLLC_CLONES void forward_range(View<const float> q, View<const float> k, View<const float> v, View<float> out,
                               float* lse, int64_t b0, int64_t b1, int T, float scale) {
  const int TP = (T + W - 1) / W * W;
  std::vector<float> kt(D * TP), p(TP);
  for (int64_t bh = b0; bh < b1; ++bh) {
    const float *qb = q.rows(bh), *vb = v.rows(bh);
    float* ob = out.rows(bh);
    transpose(k.rows(bh), k.st, kt.data(), T, TP, D);
    for (int i = 0; i < T; ++i) {
      const int nb = i / W + 1;  // key blocks with a key at or before i
      vf s[MAX_T / W];
      vf mv = splat(-INFINITY);
      for (int blk = 0; blk < nb; ++blk) {
        vf x = scores<D>(qb + i * q.st, kt.data(), TP, blk, scale);
        x = lane_index(blk) <= (float)i ? x : splat(-INFINITY);
        s[blk] = x;
        mv = x > mv ? x : mv;
      }
      const float m = hmax(mv);
      vf sum = {};
      for (int blk = 0; blk < nb; ++blk) {
        vf e = exp_nonpositive(s[blk] - m);
        e = lane_index(blk) <= (float)i ? e : (vf){};
        sum += e;
        store(p.data() + blk * W, e);
      }
      const float total = hsum(sum);
      store_row<D>(ob + i * out.st, weighted_rows<D>(p.data(), 1, vb, v.st, i + 1) * (1.f / total));
      lse[bh * T + i] = m + std::log(total);
    }
  }
}

// (batch, head) pairs [b0, b1): dq, dk, dv. Probabilities P and score gradients dS = P (dP - delta) scale of
// the pair are kept in [T, TP] scratch; dQ = dS K row by row, then dV = P^T dO and dK = dS^T Q key by key.
template <int D>
RLLC_CLONES void backward_range(View<const float> q, View<const float> k, View<const float> v,
                                View<const float> o, View<const float> g, const float* lse, View<float> dq,
                                View<float> dk, View<float> dv, int64_t b0, int64_t b1, int T, float scale) {
  const int TP = (T + W - 1) / W * W;
  std::vector<float> kt(D * TP), vt(D * TP), P(T * TP), S(T * TP);
  for (int64_t bh = b0; bh < b1; ++bh) {
    const float *qb = q.rows(bh), *kb = k.rows(bh), *ob = o.rows(bh), *gb = g.rows(bh);
    transpose(kb, k.st, kt.data(), T, TP, D);
    transpose(v.rows(bh), v.st, vt.data(), T, TP, D);
    for (int i = 0; i < T; ++i) {
      const int nb = i / W + 1;
      const float* gi = gb + i * g.st;
      const float delta = lane_sum(load_row<D>(gi) * load_row<D>(ob + i * o.st));  // sum_j P_ij dP_ij
      const float li = lse[bh * T + i];
      for (int blk = 0; blk < nb; ++blk) {
        vf pr = exp_nonpositive(scores<D>(qb + i * q.st, kt.data(), TP, blk, scale) - li);
        pr = lane_index(blk) <= (float)i ? pr : (vf){};
        const vf dp = scores<D>(gi, vt.data(), TP, blk, 1.f);
        store(P.data() + i * TP + blk * W, pr);
        store(S.data() + i * TP + blk * W, pr * (dp - delta) * scale);
      }
      store_row<D>(dq.rows(bh) + i * dq.st, weighted_rows<D>(S.data() + i * TP, 1, kb, k.st, i + 1));
    }
    for (int j = 0; j < T; ++j) {  // dV_j = sum_{i >= j} P_ij dO_i, dK_j = sum_{i >= j} dS_ij Q_i
      store_row<D>(dv.rows(bh) + j * dv.st, weighted_rows<D>(P.data() + j * TP + j, TP, gb + j * g.st, g.st, T - j));
      store_row<D>(dk.rows(bh) + j * dk.st, weighted_rows<D>(S.data() + j * TP + j, TP, qb + j * q.st, q.st, T - j));
    }
  }
}

int64_t grain(int64_t T, int64_t D) { return std::max<int64_t>(1, 16384 / (T * T + T * D)); }

// Outputs keep the order of their input's strides (empty_like: dense, so a [B, T, H, D] layout stays one).
std::tuple<at::Tensor, at::Tensor> causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    double scale) {
  using rllc_fast::tensor_info;
  rllc_fast::raise_value_error(rllc_fast::check_causal_attention_args(tensor_info(q), tensor_info(k), tensor_info(v)));
  const int64_t BH = q.size(0) * q.size(1), T = q.size(2), D = q.size(3);
  at::Tensor out = at::empty_like(q);
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
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
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

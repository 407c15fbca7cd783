// CPU kernel of rllc_fast::token_cross_entropy_: per row of logits [rows, V] (float32), the next-token
// loss log(sum_j exp(x_j)) - x[target] and, when asked, the row's gradient softmax(x) - onehot(target)
// written over the logits. One row at a time in one thread (a row of a few thousand floats stays in the
// L1/L2 cache across its three passes: max, exp and sum, scale), where the PyTorch form
// (rllc_fast/ops.py: token_cross_entropy_rows, the reference it is tested against) makes about eight passes over
// a block of rows.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <algorithm>

#include "../tensor_info.h"
#include "vec.h"

namespace {
using namespace rllc_fast::vec;

// Rows [r0, r1): losses into loss[r]; with grad, x <- softmax(x) - onehot. Targets are in [0, V) (checked by
// the caller before any row is written).
RLLC_CLONES void rows_cross_entropy(float* logits, const int64_t* targets, float* loss, int64_t r0, int64_t r1,
                                    int64_t V, bool grad) {
  const int64_t VB = V / W * W;
  for (int64_t r = r0; r < r1; ++r) {
    float* x = logits + r * V;
    const int64_t t = targets[r];
    vf mv = splat(-INFINITY);
    for (int64_t j = 0; j < VB; j += W) {
      const vf a = load(x + j);
      mv = a > mv ? a : mv;
    }
    float m = hmax(mv);
    for (int64_t j = VB; j < V; ++j) m = x[j] > m ? x[j] : m;
    const float picked = x[t];
    vf sv = {};
    for (int64_t j = 0; j < VB; j += W) {
      const vf e = exp_nonpositive(load(x + j) - m);
      sv += e;
      if (grad) store(x + j, e);
    }
    float s = hsum(sv);
    for (int64_t j = VB; j < V; ++j) {
      const float e = std::exp(x[j] - m);
      s += e;
      if (grad) x[j] = e;
    }
    loss[r] = std::log(s) + m - picked;
    if (grad) {
      const float inv = 1.f / s;
      for (int64_t j = 0; j < VB; j += W) store(x + j, load(x + j) * inv);
      for (int64_t j = VB; j < V; ++j) x[j] *= inv;
      x[t] -= 1.f;
    }
  }
}

at::Tensor token_cross_entropy_(at::Tensor& logits, const at::Tensor& targets, bool need_grad) {
  rllc_fast::raise_value_error(
      rllc_fast::check_token_cross_entropy_args(rllc_fast::tensor_info(logits), rllc_fast::tensor_info(targets)));
  const int64_t rows = logits.size(0), V = logits.size(1);
  at::Tensor loss = at::empty({rows}, logits.options());
  if (rows == 0) return loss;
  float* x = logits.mutable_data_ptr<float>();
  const int64_t* t = targets.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)  // every target before any row is written: a bad one leaves the logits as they were
    if (t[r] < 0 || t[r] >= V) rllc_fast::raise_value_error(rllc_fast::token_targets_message(V));
  float* l = loss.mutable_data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / V),
                   [&](int64_t r0, int64_t r1) { rows_cross_entropy(x, t, l, r0, r1, V, need_grad); });
  return loss;
}
}  // namespace

TORCH_LIBRARY_IMPL(rllc_fast, CPU, m) { m.impl("token_cross_entropy_", &token_cross_entropy_); }

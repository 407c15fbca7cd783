// Argument checks of the rllc_fast ops in plain C++ (no torch headers): the CUDA ops and the CPU kernels
// (csrc/cpu/) call them through csrc/tensor_info.h; tests/test_emulated_kernels.py calls the CUDA ops' checks
// through the CPU emulation build, tests/test_cpu_kernels.py the CPU kernels' through the ops themselves. They make the checks of rllc_fast/ops.py (check_sgld_args and the others), in the
// same order and with the same messages; a test compares the two on every bad input it can make.
// Each returns "" when the arguments are fine, else the message of the first failed check. Only
// metadata is read (dims before sizes), never data.
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace rllc_fast {

// What the checks read of a tensor.
struct TensorInfo {
  bool defined = false;        // false: an absent optional tensor
  std::vector<int64_t> sizes;
  std::string dtype;           // as torch names it, without "torch.": float32, bfloat16, int64, ...
  std::string device;          // as torch prints it: cpu, cuda:0, meta
  bool contiguous = true;
  bool unit_last_stride = true;  // stride 1 along the last dimension (or a last dimension of size <= 1)
  int64_t dim() const { return static_cast<int64_t>(sizes.size()); }
};

// "[5, 37]", as Python prints list(t.shape).
inline std::string shape_str(const std::vector<int64_t>& sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

inline std::string shape_str(const TensorInfo& t) { return shape_str(t.sizes); }

// printf's %.6g, as Python's f"{x:.6g}".
inline std::string number_str(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.6g", x);
  return buf;
}

inline std::string contiguous_message(const std::string& op, const std::string& name) {
  return op + ": " + name + " must be contiguous (pass " + name + ".contiguous())";
}

inline std::string check_rng_state(const std::string& op, const TensorInfo& rng_state) {
  if (!(rng_state.dim() == 1 && rng_state.sizes[0] == 2 && rng_state.dtype == "int64"))
    return op + ": rng_state must be int64 [2] = [seed, offset], got " + rng_state.dtype + " " + shape_str(rng_state);
  if (!rng_state.contiguous) return contiguous_message(op, "rng_state");
  return "";
}

inline std::string check_sgld_args(const TensorInfo& w, const TensorInfo& grad, const TensorInfo& w_star,
                                   const TensorInfo& lengths, const TensorInfo& noise, const TensorInfo& rng_state,
                                   const TensorInfo& square_avg, double rmsprop_alpha, double rmsprop_eps) {
  const std::string op = "sgld_step";
  if (w.dim() != 2) return op + ": w must be 2-D [replicas, n], got shape " + shape_str(w);
  if (!(w.dtype == "float32" || w.dtype == "bfloat16" || w.dtype == "float16"))
    return op + ": w must be float32, bfloat16 or float16, got " + w.dtype;
  if (!w.contiguous) return op + ": w must be contiguous (it is updated in place: keep the replicas in one contiguous buffer)";
  for (const auto& [name, t] : {std::pair<std::string, const TensorInfo*>{"grad", &grad}, {"w_star", &w_star}}) {
    if (t->sizes != w.sizes) return op + ": " + name + " must have w's shape " + shape_str(w) + ", got " + shape_str(*t);
    if (t->dtype != w.dtype) return op + ": " + name + " must have w's dtype " + w.dtype + ", got " + t->dtype;
    if (t->device != w.device) return op + ": " + name + " must be on w's device " + w.device + ", got " + t->device;
    if (!t->contiguous) return contiguous_message(op, name);
  }
  if (!(lengths.dim() == 1 && lengths.sizes[0] == w.sizes[0]))
    return op + ": lengths must be [replicas] = [" + std::to_string(w.sizes[0]) + "], got shape " + shape_str(lengths);
  if (lengths.dtype != "int64") return op + ": lengths must be int64, got " + lengths.dtype;
  if (lengths.device != w.device) return op + ": lengths must be on w's device " + w.device + ", got " + lengths.device;
  if (!lengths.contiguous) return contiguous_message(op, "lengths");
  if (noise.defined) {
    if (noise.sizes != w.sizes) return op + ": noise must have w's shape " + shape_str(w) + ", got " + shape_str(noise);
    if (noise.dtype != "float32") return op + ": noise must be float32, got " + noise.dtype;
    if (noise.device != w.device) return op + ": noise must be on w's device " + w.device + ", got " + noise.device;
    if (!noise.contiguous) return contiguous_message(op, "noise");
  } else if (!rng_state.defined) {
    return op + ": pass noise or rng_state ([seed, offset] int64)";
  }
  if (rng_state.defined) {
    const std::string message = check_rng_state(op, rng_state);
    if (!message.empty()) return message;
    if (rng_state.device != w.device) return op + ": rng_state must be on w's device " + w.device + ", got " + rng_state.device;
  }
  if (square_avg.defined) {
    if (square_avg.sizes != w.sizes)
      return op + ": square_avg must have w's shape " + shape_str(w) + ", got " + shape_str(square_avg);
    if (square_avg.dtype != "float32") return op + ": square_avg must be float32, got " + square_avg.dtype;
    if (square_avg.device != w.device) return op + ": square_avg must be on w's device " + w.device + ", got " + square_avg.device;
    if (!square_avg.contiguous) return contiguous_message(op, "square_avg");
    if (!(0.0 <= rmsprop_alpha && rmsprop_alpha < 1.0))
      return op + ": rmsprop_alpha must be in [0, 1), got " + number_str(rmsprop_alpha);
    if (!(rmsprop_eps > 0.0)) return op + ": rmsprop_eps must be > 0, got " + number_str(rmsprop_eps);
  }
  return "";
}

inline std::string check_rademacher_args(int64_t num_probes, int64_t n, const TensorInfo& rng_state) {
  if (!(num_probes >= 1 && n >= 1))
    return "rademacher: num_probes and n must be >= 1, got " + std::to_string(num_probes) + ", " + std::to_string(n);
  return check_rng_state("rademacher", rng_state);
}

// The values of `offsets` (rising from 0 to n) are not read here: the CPU op checks them, the CUDA
// kernel marks the blocks of bad offsets NaN (no host sync).
inline std::string check_blocked_dot_args(const TensorInfo& v, const TensorInfo& hv, const TensorInfo& offsets) {
  const std::string op = "blocked_dot";
  if (v.dim() != 2) return op + ": v must be 2-D [probes, n], got shape " + shape_str(v);
  if (hv.sizes != v.sizes) return op + ": hv must have v's shape " + shape_str(v) + ", got " + shape_str(hv);
  if (v.dtype != "float32") return op + ": v must be float32, got " + v.dtype;
  if (hv.dtype != "float32") return op + ": hv must be float32, got " + hv.dtype;
  if (hv.device != v.device) return op + ": hv must be on v's device " + v.device + ", got " + hv.device;
  if (!(offsets.dim() == 1 && offsets.sizes[0] >= 2 && offsets.dtype == "int64"))
    return op + ": offsets must be int64 [blocks + 1] with blocks >= 1, got " + offsets.dtype + " " + shape_str(offsets);
  if (offsets.device != v.device) return op + ": offsets must be on v's device " + v.device + ", got " + offsets.device;
  if (!v.contiguous) return contiguous_message(op, "v");
  if (!hv.contiguous) return contiguous_message(op, "hv");
  if (!offsets.contiguous) return contiguous_message(op, "offsets");
  return "";
}

// causal_attention (CPU kernel: csrc/cpu/causal_attention.cpp): q, k, v float32 [batch, heads, T, D] of one
// shape, on one device, with stride 1 along D (any other strides); T <= 128 and D one of 8, 16, 32, 64 (the
// kernel's sizes; longer sequences and other head sizes take torch's scaled_dot_product_attention in the
// engine).
inline std::string check_attention_tensor(const std::string& op, const std::string& name, const TensorInfo& t,
                                          const TensorInfo& q) {
  if (t.sizes != q.sizes) return op + ": " + name + " must have q's shape " + shape_str(q) + ", got " + shape_str(t);
  if (t.dtype != "float32") return op + ": " + name + " must be float32, got " + t.dtype;
  if (t.device != q.device) return op + ": " + name + " must be on q's device " + q.device + ", got " + t.device;
  if (!t.unit_last_stride)
    return op + ": " + name + " must have stride 1 along its last dimension (pass " + name + ".contiguous())";
  return "";
}

inline std::string check_attention_qkv(const std::string& op, const TensorInfo& q, const TensorInfo& k,
                                       const TensorInfo& v) {
  if (q.dim() != 4) return op + ": q must be 4-D [batch, heads, T, D], got shape " + shape_str(q);
  if (q.sizes[2] > 128) return op + ": T must be at most 128 positions, got " + std::to_string(q.sizes[2]);
  const int64_t d = q.sizes[3];
  if (!(d == 8 || d == 16 || d == 32 || d == 64)) return op + ": D must be 8, 16, 32 or 64, got " + std::to_string(d);
  for (const auto& [name, t] : {std::pair<std::string, const TensorInfo*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    const std::string message = check_attention_tensor(op, name, *t, q);
    if (!message.empty()) return message;
  }
  return "";
}

inline std::string check_causal_attention_args(const TensorInfo& q, const TensorInfo& k, const TensorInfo& v) {
  return check_attention_qkv("causal_attention", q, k, v);
}

inline std::string check_causal_attention_backward_args(const TensorInfo& grad_out, const TensorInfo& q,
                                                        const TensorInfo& k, const TensorInfo& v,
                                                        const TensorInfo& out, const TensorInfo& lse) {
  const std::string op = "causal_attention_backward";
  std::string message = check_attention_qkv(op, q, k, v);
  if (message.empty()) message = check_attention_tensor(op, "out", out, q);
  if (message.empty()) message = check_attention_tensor(op, "grad_out", grad_out, q);
  if (!message.empty()) return message;
  const std::vector<int64_t> rows(q.sizes.begin(), q.sizes.end() - 1);
  if (lse.sizes != rows) return op + ": lse must be [batch, heads, T] = " + shape_str(rows) + ", got " + shape_str(lse);
  if (lse.dtype != "float32") return op + ": lse must be float32, got " + lse.dtype;
  if (lse.device != q.device) return op + ": lse must be on q's device " + q.device + ", got " + lse.device;
  if (!lse.contiguous) return contiguous_message(op, "lse");
  return "";
}

// token_cross_entropy_ (CPU kernel: csrc/cpu/token_cross_entropy.cpp): logits float32 [rows, V], V >= 1,
// contiguous (overwritten by the gradient when asked); targets int64 [rows] on its device, contiguous. The
// target values are checked by the op itself (token_targets_message).
inline std::string check_token_cross_entropy_args(const TensorInfo& logits, const TensorInfo& targets) {
  const std::string op = "token_cross_entropy_";
  if (!(logits.dim() == 2 && logits.sizes[1] >= 1))
    return op + ": logits must be 2-D [rows, vocabulary] with a vocabulary >= 1, got shape " + shape_str(logits);
  if (logits.dtype != "float32") return op + ": logits must be float32, got " + logits.dtype;
  if (!logits.contiguous) return contiguous_message(op, "logits");
  if (!(targets.dim() == 1 && targets.sizes[0] == logits.sizes[0]))
    return op + ": targets must be [rows] = [" + std::to_string(logits.sizes[0]) + "], got shape " + shape_str(targets);
  if (targets.dtype != "int64") return op + ": targets must be int64, got " + targets.dtype;
  if (targets.device != logits.device)
    return op + ": targets must be on logits' device " + logits.device + ", got " + targets.device;
  if (!targets.contiguous) return contiguous_message(op, "targets");
  return "";
}

inline std::string token_targets_message(int64_t vocab) {
  return "token_cross_entropy_: targets must be token ids in [0, " + std::to_string(vocab) + ")";
}

}  // namespace rllc_fast

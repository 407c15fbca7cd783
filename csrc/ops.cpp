// Schemas of the rllc_fast ops. Kernels: csrc/cuda/*.cu (CUDA), csrc/cpu/*.cpp (CPU: causal_attention, token_cross_entropy_);
// the other implementations are the pure-PyTorch fallbacks registered from rllc_fast/ops.py, which
// keeps a copy of these strings (tests/test_ops.py checks that the two agree).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(rllc_fast, m) {
  m.def("sgld_step(Tensor(a!) w, Tensor grad, Tensor w_star, Tensor lengths, Tensor? noise, Tensor? rng_state, float step_size, float nbeta, float localization, Tensor(b!)? square_avg=None, float rmsprop_alpha=0.99, float rmsprop_eps=0.1) -> Tensor",
        {at::Tag::nondeterministic_seeded});
  m.def("rademacher(int num_probes, int n, Tensor rng_state) -> Tensor",
        {at::Tag::nondeterministic_seeded});
  m.def("blocked_dot(Tensor v, Tensor hv, Tensor offsets) -> Tensor");
  m.def("causal_attention(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def("causal_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("token_cross_entropy_(Tensor(a!) logits, Tensor targets, bool need_grad) -> Tensor");
}

// `import rllc_fast._C` loads this library, which runs the registrations above.
static struct PyModuleDef rllc_fast_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&rllc_fast_module); }

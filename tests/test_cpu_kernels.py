"""The compiled CPU kernels (csrc/cpu/): causal attention and the token cross-entropy.

Each kernel is checked against its PyTorch fallback in rllc_fast/ops.py (the reference; the fallback is in
turn checked against torch's own ``scaled_dot_product_attention`` and ``cross_entropy``), on the shapes
the engine gives them and on awkward ones; their C++ argument checks against the Python ones (same
message); and the engine's routing: which calls take the kernels, and that an estimate with them equals
one without them to float rounding.
"""
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import rllc_fast as r
from rllc_fast import ops
from rllc_fast.engine import attention

ROOT = Path(__file__).resolve().parents[1]
needs_kernels = pytest.mark.skipif(not ops.CPU_KERNELS, reason="the extension was built without its CPU kernels")
engine_uses_kernels = pytest.mark.skipif(ops._cpu_capability() not in ops.CPU_KERNEL_CAPABILITIES,
                                         reason="the engine uses the CPU kernels on AVX-512 CPUs only")
TOL = dict(rtol=1e-4, atol=1e-5)  # float32 rounding of sums of up to 128 x 64 terms (both sides ~4e-6 from float64)


def _qkv(B, H, T, D, seed=0, strided=False):
    """q, k, v [B, H, T, D]; ``strided``: views of [B, T, H, D] buffers (q and k interleaved, as the engine's)."""
    g = torch.Generator().manual_seed(seed)
    if strided:
        qk = torch.randn(B, T, 2, H, D, generator=g)
        v = torch.randn(B, T, H, D, generator=g)
        return qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2), v.transpose(1, 2)
    return tuple(torch.randn(B, H, T, D, generator=g) for _ in range(3))


def _grads(fn, q, k, v, g):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), g))


def _sdpa(scale):
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


SHAPES = [(2, 3, 1, 8), (2, 3, 15, 16), (3, 2, 16, 16), (2, 2, 17, 32), (4, 4, 63, 16), (2, 2, 64, 8),
          (1, 2, 100, 64), (2, 1, 128, 16), (0, 2, 5, 8)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fallback_attention_is_sdpa(shape):
    """The reference: the fallback's output, row log-sum-exp and gradients are SDPA's / the written formula's."""
    q, k, v = _qkv(*shape)
    scale = shape[3] ** -0.5
    out, lse = ops._causal_attention_fallback(q, k, v, scale)
    T = shape[2]
    scores = (q @ k.transpose(-1, -2)) * scale + torch.full((T, T), float("-inf")).triu(1)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), **TOL)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ref = _grads(_sdpa(scale), q, k, v, g)
    fb = _grads(lambda *a: _FallbackAttention.apply(*a, scale), q, k, v, g)
    for a, b in zip(ref, fb):
        torch.testing.assert_close(b, a, **TOL)


class _FallbackAttention(torch.autograd.Function):
    """The fallback forward and backward as one differentiable function (for comparing gradients)."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse = ops._causal_attention_fallback(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, g):
        return (*ops._causal_attention_backward_fallback(g.contiguous(), *ctx.saved_tensors, ctx.scale), None)


@needs_kernels
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_kernel_equals_the_fallback(shape, strided):
    q, k, v = _qkv(*shape, strided=strided)
    scale = 0.37
    out, lse = torch.ops.rllc_fast.causal_attention(q, k, v, scale)
    ref_out, ref_lse = ops._causal_attention_fallback(q, k, v, scale)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(lse, ref_lse, **TOL)
    assert out.stride() == ref_out.stride() == torch.empty_like(q).stride()  # q's stride order, dense
    g = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    if strided:  # the engine's gradient arrives as a view of a [B, T, H, D] buffer
        g = g.transpose(1, 2).contiguous().transpose(1, 2)
    got = torch.ops.rllc_fast.causal_attention_backward(g, q, k, v, out, lse, scale)
    want = ops._causal_attention_backward_fallback(g, q, k, v, ref_out, ref_lse, scale)
    for a, b, t in zip(got, want, (q, k, v)):
        torch.testing.assert_close(a, b, **TOL)
        assert a.stride() == b.stride() == torch.empty_like(t).stride()


@needs_kernels
def test_attention_outputs_of_an_input_that_overlaps_itself():
    """Sliding windows of one buffer (stride 1 along T as well as D): the stride order would put T innermost, so
    the outputs are contiguous, as the fallback's; the values are the fallback's (found by review: the kernel
    wrote rows of D floats into an output laid out with T innermost)."""
    base = torch.randn(200, generator=torch.Generator().manual_seed(7))
    shape, strides = (2, 2, 40, 8), (3, 1, 1, 1)
    q, k, v = (base[i:].as_strided(shape, strides) for i in range(3))
    assert torch.empty_like(q).stride(-1) != 1  # the case: the inferred order puts another dimension innermost
    out, lse = torch.ops.rllc_fast.causal_attention(q, k, v, 0.3)
    ref_out, ref_lse = ops._causal_attention_fallback(q, k, v, 0.3)
    assert out.stride(-1) == 1 and out.is_contiguous() and ref_out.is_contiguous()
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(lse, ref_lse, **TOL)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    got = torch.ops.rllc_fast.causal_attention_backward(g, q, k, v, out, lse, 0.3)
    want = ops._causal_attention_backward_fallback(g, q, k, v, ref_out, ref_lse, 0.3)
    for a, b in zip(got, want):
        assert a.is_contiguous()
        torch.testing.assert_close(a, b, **TOL)


@needs_kernels
def test_attention_kernel_through_autograd_equals_sdpa():
    """``ops.causal_attention`` (the differentiable entry point) against SDPA, through views as the engine uses it."""
    q, k, v = _qkv(3, 4, 63, 16, seed=3, strided=True)
    g = torch.randn(3, 4, 63, 16, generator=torch.Generator().manual_seed(4))
    ref = _grads(_sdpa(0.25), q, k, v, g)
    got = _grads(lambda *a: ops.causal_attention(*a, 0.25), q, k, v, g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **TOL)


@needs_kernels
def test_attention_kernel_is_the_same_on_any_thread_count():
    """Each (batch, head) pair is one thread's work: the result does not depend on how pairs are split."""
    q, k, v = _qkv(7, 5, 63, 16, seed=5)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out, lse = torch.ops.rllc_fast.causal_attention(q, k, v, 0.25)
            outs.append((out, lse, *torch.ops.rllc_fast.causal_attention_backward(torch.ones_like(q), q, k, v, out,
                                                                                  lse, 0.25)))
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


@needs_kernels
def test_a_nan_pair_leaves_the_other_pairs_bit_identical():
    """A diverged replica's NaN (in q, k or v) stays in its own (batch, head) pair, forward and backward. Within
    the pair it may reach other positions (as ``p @ v`` of the reference does: a zero weight times NaN)."""
    q, k, v = _qkv(3, 2, 40, 16, seed=6)
    out, lse = torch.ops.rllc_fast.causal_attention(q, k, v, 0.3)
    grads = torch.ops.rllc_fast.causal_attention_backward(torch.ones_like(q), q, k, v, out, lse, 0.3)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[1, 0, 7, 3] = float("nan")
    k2[2, 1, 30, 0] = float("nan")
    v2[0, 1, 12, 5] = float("inf")
    out2, lse2 = torch.ops.rllc_fast.causal_attention(q2, k2, v2, 0.3)
    grads2 = torch.ops.rllc_fast.causal_attention_backward(torch.ones_like(q), q2, k2, v2, out2, lse2, 0.3)
    keep = torch.ones(3, 2, dtype=torch.bool)
    keep[1, 0] = keep[2, 1] = keep[0, 1] = False
    for a, b in zip((out, lse, *grads), (out2, lse2, *grads2)):
        assert torch.equal(a[keep], b[keep])
    assert out2[1, 0, 7].isnan().all() and lse2[1, 0, 7].isnan()
    assert out2[2, 1, 30:].isnan().all()  # the NaN key reaches the queries that attend to it


def _ce_reference(x, t):
    losses = F.cross_entropy(x, t, reduction="none")
    return losses, torch.softmax(x, 1) - F.one_hot(t, x.shape[1]).float()


CE_SHAPES = [(5, 1), (7, 5), (9, 16), (9, 17), (300, 256), (33, 5000), (0, 12)]


@pytest.mark.parametrize("kernel", [False, pytest.param(True, marks=needs_kernels)], ids=["fallback", "kernel"])
@pytest.mark.parametrize("shape", CE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_token_cross_entropy_is_torchs(shape, kernel):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 4
    if shape[0] > 2:
        x[1] += 80.0  # large logits: the max is taken out before exp
        x[2, : shape[1] // 2] = float("-inf")
    t = torch.randint(0, shape[1], (shape[0],), generator=g)
    if shape[0] > 2:
        t[2] = shape[1] - 1  # a finite logit
    op = torch.ops.rllc_fast.token_cross_entropy_ if kernel else ops._token_cross_entropy_fallback
    want_loss, want_grad = _ce_reference(x, t)
    y = x.clone()
    loss = op(y, t, False)
    torch.testing.assert_close(loss, want_loss, **TOL)
    assert torch.equal(y, x)  # without need_grad the logits are left as they are
    loss = op(y, t, True)
    torch.testing.assert_close(loss, want_loss, **TOL)
    torch.testing.assert_close(y, want_grad, **TOL)


@pytest.mark.parametrize("kernel", [False, pytest.param(True, marks=needs_kernels)], ids=["fallback", "kernel"])
@pytest.mark.parametrize("bad", [-1, 7])
def test_token_cross_entropy_refuses_targets_outside_the_vocabulary(bad, kernel):
    op = torch.ops.rllc_fast.token_cross_entropy_ if kernel else ops._token_cross_entropy_fallback
    t = torch.tensor([0, 3, bad, 6])
    x = torch.randn(4, 7)
    y = x.clone()
    with pytest.raises(ValueError, match=r"targets must be token ids in \[0, 7\)"):
        op(y, t, True)
    assert torch.equal(y, x)  # refused before any row was written


BAD_ATTENTION = {
    "q 3-D": (torch.ones(2, 5, 8), torch.ones(2, 5, 8), torch.ones(2, 5, 8)),
    "T 129": (torch.ones(1, 1, 129, 8), torch.ones(1, 1, 129, 8), torch.ones(1, 1, 129, 8)),
    "D 12": (torch.ones(1, 1, 5, 12), torch.ones(1, 1, 5, 12), torch.ones(1, 1, 5, 12)),
    "k shape": (torch.ones(1, 2, 5, 8), torch.ones(1, 2, 4, 8), torch.ones(1, 2, 5, 8)),
    "v float64": (torch.ones(1, 2, 5, 8), torch.ones(1, 2, 5, 8), torch.ones(1, 2, 5, 8).double()),
    "q bfloat16": (torch.ones(1, 2, 5, 8).bfloat16(), torch.ones(1, 2, 5, 8), torch.ones(1, 2, 5, 8)),
    "k float8": (torch.ones(1, 2, 5, 8), torch.ones(1, 2, 5, 8).to(torch.float8_e4m3fn), torch.ones(1, 2, 5, 8)),
    "k strided along D": (torch.ones(1, 2, 5, 8), torch.ones(1, 2, 5, 16)[..., ::2], torch.ones(1, 2, 5, 8)),
}
BAD_CE = {
    "logits 1-D": (torch.ones(5), torch.zeros(5, dtype=torch.long)),
    "no vocabulary": (torch.ones(5, 0), torch.zeros(5, dtype=torch.long)),
    "logits float64": (torch.ones(5, 3).double(), torch.zeros(5, dtype=torch.long)),
    "logits strided": (torch.ones(5, 6)[:, ::2], torch.zeros(5, dtype=torch.long)),
    "targets rows": (torch.ones(5, 3), torch.zeros(4, dtype=torch.long)),
    "targets int32": (torch.ones(5, 3), torch.zeros(5, dtype=torch.int32)),
    "targets uint16": (torch.ones(5, 3), torch.zeros(5, dtype=torch.uint16)),
    "targets strided": (torch.ones(5, 3), torch.zeros(10, dtype=torch.long)[::2]),
}


def _message(fn, *args) -> str:
    try:
        fn(*args)
    except ValueError as e:
        return str(e)
    return ""


@needs_kernels
@pytest.mark.parametrize("case", list(BAD_ATTENTION))
def test_cpp_attention_checks_say_what_the_python_checks_say(case):
    q, k, v = BAD_ATTENTION[case]
    python = _message(ops.check_causal_attention_args, q, k, v)
    assert python.startswith("causal_attention: ")
    assert _message(torch.ops.rllc_fast.causal_attention, q, k, v, 1.0) == python  # the C++ check, on CPU
    out, lse = torch.ones_like(q), torch.ones(q.shape[:-1]) if q.dim() == 4 else torch.ones(1)
    python = _message(ops.check_causal_attention_backward_args, q, q, k, v, out, lse)
    assert python.startswith("causal_attention_backward: ")
    assert _message(torch.ops.rllc_fast.causal_attention_backward, q, q, k, v, out, lse, 1.0) == python


@needs_kernels
def test_cpp_attention_backward_checks_its_own_arguments():
    q, k, v = _qkv(1, 2, 5, 8)
    out, lse = torch.ops.rllc_fast.causal_attention(q, k, v, 1.0)
    for args in [(q[..., :4], q, k, v, out, lse), (q, q, k, v, out, lse[..., :4]), (q, q, k, v, out, lse.double()),
                 (q, q, k, v, out[..., :1], lse), (q, q, k, v, out, lse.transpose(1, 2).contiguous().transpose(1, 2))]:
        python = _message(ops.check_causal_attention_backward_args, *args)
        assert python and _message(torch.ops.rllc_fast.causal_attention_backward, *args, 1.0) == python


@needs_kernels
@pytest.mark.parametrize("case", list(BAD_CE))
def test_cpp_cross_entropy_checks_say_what_the_python_checks_say(case):
    logits, targets = BAD_CE[case]
    python = _message(ops.check_token_cross_entropy_args, logits, targets)
    assert python.startswith("token_cross_entropy_: ")
    assert _message(torch.ops.rllc_fast.token_cross_entropy_, logits, targets, True) == python


def _small_model():
    return r.models.attn_only(n_layers=2, d_model=64, n_heads=4, d_head=16, n_ctx=32, d_vocab=61, seed=0)


def _rllc_ops_called(fn):
    """Names of the rllc_fast ops ``fn()`` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "rllc_fast":
                seen.add(func._opname)
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen


@needs_kernels
@engine_uses_kernels
def test_the_engine_takes_the_kernels_on_the_cpu_and_not_under_autocast():
    model = _small_model()
    tokens = torch.randint(0, 61, (16, 32), generator=torch.Generator().manual_seed(0))
    cfg = r.SGLDConfig(num_chains=2, num_draws=2, batch_size=4, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        used = _rllc_ops_called(lambda: r.estimate_llc(model, tokens, cfg, components=r.heads(model)))
        assert {"causal_attention", "causal_attention_backward", "token_cross_entropy_"} <= used
        used = _rllc_ops_called(lambda: r.estimate_llc(model, tokens, cfg, components=r.heads(model),
                                                       matmul_precision="bf16"))
    assert "causal_attention" not in used  # bf16 autocast keeps torch's SDPA
    assert not attention.kernel_applies(torch.ones(1, 1, 129, 16))  # past the kernel's length
    assert not attention.kernel_applies(torch.ones(1, 1, 12, 12))  # a head size it does not take
    assert not attention.kernel_applies(torch.ones(1, 1, 12, 16, dtype=torch.float64))


@needs_kernels
@engine_uses_kernels
def test_an_estimate_with_the_kernels_equals_one_without(monkeypatch):
    """The engine's estimates with the compiled kernels equal those with torch's SDPA and cross-entropy passes
    to float rounding (the chains see the same noise; the kernels change only the evaluation order)."""
    model = _small_model()
    tokens = torch.randint(0, 61, (32, 32), generator=torch.Generator().manual_seed(1))
    cfg = r.SGLDConfig(num_chains=2, num_draws=12, batch_size=8, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = r.estimate_llc(model, tokens, cfg, components=r.heads(model))
        monkeypatch.setattr(ops, "cpu_kernels_serve", lambda t: False)
        plain = r.estimate_llc(model, tokens, cfg, components=r.heads(model))
    for name in plain.estimates:
        a, b = fast[name], plain[name]
        torch.testing.assert_close(torch.as_tensor(a.loss_trace), torch.as_tensor(b.loss_trace), rtol=1e-4, atol=1e-5)
        assert abs(a.llc_mean - b.llc_mean) < 1e-3 * max(1.0, abs(b.llc_mean)), name


def test_the_fallbacks_serve_without_the_extension():
    """With ``rllc_fast._C`` unimportable, the two ops run their PyTorch fallbacks on the CPU."""
    code = """
import sys
sys.modules["rllc_fast._C"] = None
import torch
import torch.nn.functional as F
from rllc_fast import ops
from rllc_fast.engine import attention
assert not ops.CPU_KERNELS and not attention.kernel_applies(torch.ones(1, 1, 5, 8))
q, k, v = (torch.randn(2, 3, 9, 8) for _ in range(3))
out, lse = torch.ops.rllc_fast.causal_attention(q, k, v, 0.5)
torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5))
x = torch.randn(4, 6); t = torch.tensor([0, 5, 2, 1])
torch.testing.assert_close(torch.ops.rllc_fast.token_cross_entropy_(x.clone(), t, False),
                           F.cross_entropy(x, t, reduction="none"))
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr

"""Host syncs and aten dispatches per SGLD step of ``estimate_llc``, counted on the ``meta`` device.

Adapted from ``../shared/tools/meta_step_cost.py`` (the figures of issue 19): nothing is computed on
``meta``, so any shape runs in seconds to a minute on a CPU machine. Per-step figures are the
difference between a run of ``d2`` and one of ``d1`` draws divided by ``d2 - d1`` (setup excluded).
Sync points counted (and stubbed so the run goes on): ``.item/.tolist/.numpy/.cpu``, ``bool/float/
int/index`` of a tensor, boolean-mask indexing, ``nonzero``/``masked_select``/``unique``, and copies
from the device to the CPU. Unlike the shared tool, the patches are installed only inside
``counting()`` and removed after, so a test process is left as it was.

    python tests/meta_cost.py paper 40GB       # the paper's shape (64 head replicas, batch 8 x 1024)
    python tests/meta_cost.py pythia 40GB      # Pythia-70m's shape (192 head replicas, batch 8 x 512)
    python tests/meta_cost.py paper 40GB --math-sdpa   # attention as meta's decomposed math path
"""
from __future__ import annotations

import collections
import contextlib
import sys
import warnings

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

DEV = "meta"
_SYNC_OPS = ("aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique2", "aten._local_scalar_dense")


def _fake(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == DEV


class _Watch(TorchDispatchMode):
    def __init__(self, counter):
        super().__init__()
        self.c = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.c["ops"] += 1
        name = str(func.overloadpacket)
        self.c["op:" + name] += 1
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if name in _SYNC_OPS and any(_fake(a) for a in tensors):
            self.c["sync"] += 1
        if (name == "aten.copy_" and len(args) > 1 and isinstance(args[1], torch.Tensor)
                and args[1].device.type == DEV and args[0].device.type == "cpu"):
            self.c["sync"] += 1
        if name == "aten._to_copy" and tensors and _fake(tensors[0]) and str(kwargs.get("device", "")) == "cpu":
            self.c["sync"] += 1
        return func(*args, **kwargs)


class _Peak(TorchDispatchMode):
    """Live bytes of the meta storages created inside, swept of freed ones at every op; keeps the peak."""

    def __init__(self):
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef
        self.ref, self.live, self.now, self.peak = StorageWeakRef, {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]
        for t in torch.utils._pytree.tree_leaves(out):
            if _fake(t):
                st = t.untyped_storage()
                key = st._cdata
                if key not in self.live:
                    self.live[key] = (self.ref(st), st.nbytes())
                    self.now += st.nbytes()
        self.peak = max(self.peak, self.now)
        return out


@contextlib.contextmanager
def cuda_like_sdpa():
    """On ``meta``, ``F.scaled_dot_product_attention`` decomposes into the math path (scores materialized,
    ~20 ops); CUDA runs one fused kernel. Inside this context, meta inputs go to CUDA's memory-efficient
    attention op (one op forward, one backward; saves only the output and log-sum-exp), so counts and
    peaks model a CUDA run. Other devices are untouched."""
    F = torch.nn.functional
    orig = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if _fake(q) and attn_mask is None and dropout_p == 0.0 and not kw:
            grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
            return torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, None, grad, 0.0, is_causal, scale=scale)[0]
        return orig(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = orig


@contextlib.contextmanager
def peak_bytes():
    """Yield a ``_Peak`` whose ``.peak`` is the most bytes of meta tensors created inside and alive at once."""
    with _Peak() as p:
        yield p


@contextlib.contextmanager
def counting():
    """Yield a Counter of ``sync``, ``ops`` and ``op:<name>`` for the code run inside; patches removed after."""
    c = collections.Counter()
    names = ("tolist", "item", "numpy", "__bool__", "__float__", "__int__", "__index__", "__getitem__", "cpu")
    orig = {n: getattr(torch.Tensor, n) for n in names}
    dummies = {
        "tolist": lambda t: np.zeros(tuple(t.shape)).tolist(), "item": lambda t: 0.0,
        "numpy": lambda t: np.zeros(tuple(t.shape)), "__bool__": lambda t: True, "__float__": lambda t: 0.0,
        "__int__": lambda t: 0, "__index__": lambda t: 0, "cpu": lambda t: torch.zeros(t.shape, dtype=t.dtype),
    }

    def wrap(name):
        def f(self, *a, **k):
            if _fake(self):
                c["sync"] += 1
                c["sync:" + name] += 1
                return dummies[name](self)
            return orig[name](self, *a, **k)
        return f

    def getitem(self, idx):
        if isinstance(idx, torch.Tensor) and idx.dtype == torch.bool and (_fake(idx) or _fake(self)):
            c["sync"] += 1
            c["sync:boolmask"] += 1
            return self
        return orig["__getitem__"](self, idx)

    mem = torch.cuda.mem_get_info
    try:
        for n in names[:-2] + ("cpu",):
            setattr(torch.Tensor, n, wrap(n))
        torch.Tensor.__getitem__ = getitem
        torch.cuda.mem_get_info = lambda device=None: (80 * 10**9, 141 * 10**9)
        with _Watch(c):
            yield c
    finally:
        for n, f in orig.items():
            setattr(torch.Tensor, n, f)
        torch.cuda.mem_get_info = mem


def model_and_tokens(shape: str, seed: int = 0):
    """``(model on meta, CPU tokens [64, T], batch size)`` for ``"paper"``, ``"pythia"`` or ``"small"``."""
    import rllc_fast as r

    if shape == "paper":   # 2L, d256, 8 heads, vocab 5000, ctx 1024: 16 heads
        model, T, N = r.models.attn_only(seed=seed), 1024, 8
    elif shape == "pythia":  # Pythia-70m: 6L x 8 heads = 48 heads, vocab 50304
        model, T, N = r.models.pythia_like(seed=seed), 512, 8
    elif shape == "small":  # 2L x 4 heads, d64, vocab 256, ctx 64: the test's shape
        model, T, N = r.models.attn_only(n_layers=2, d_model=64, n_heads=4, d_head=16, n_ctx=64, d_vocab=256,
                                         seed=seed), 64, 8
    else:
        raise ValueError(f"shape must be 'paper', 'pythia' or 'small', got {shape!r}")
    V = model.cfg.d_vocab
    tokens = torch.randint(0, V, (64, T), generator=torch.Generator().manual_seed(0))
    try:
        model.to(DEV, print_details=False)
    except TypeError:
        model.to(DEV)
    return model, tokens, N


def step_cost(shape: str = "paper", max_memory="40GB", chains: int = 4, draws=(2, 4), cuda_sdpa: bool = True,
              **estimate_kwargs):
    """``(syncs per step, dispatches per step, Counter of per-step op counts)`` of the default engine
    (with ``cuda_sdpa``, attention counted as CUDA's fused kernel: ``cuda_like_sdpa``)."""
    import rllc_fast as r

    model, tokens, N = model_and_tokens(shape)
    comps = r.heads(model)
    runs = {}
    for D in draws:
        cfg = r.SGLDConfig(num_chains=chains, num_draws=D, batch_size=N, seed=0)
        sdpa = cuda_like_sdpa() if cuda_sdpa else contextlib.nullcontext()
        with warnings.catch_warnings(), sdpa, counting() as c:
            warnings.simplefilter("ignore")
            try:
                r.estimate_llc(model, tokens, cfg, components=comps, max_memory=max_memory, **estimate_kwargs)
            except r.ChainsDivergedError:
                pass  # meta tensors hold no values: dummy losses may read as diverged; the step work was done
        runs[D] = c
    d1, d2 = draws
    per = collections.Counter({k: (runs[d2][k] - runs[d1][k]) / (d2 - d1) for k in runs[d2] | runs[d1]})
    return per["sync"], per["ops"], per


if __name__ == "__main__":
    shape = sys.argv[1] if len(sys.argv) > 1 else "paper"
    budget = sys.argv[2] if len(sys.argv) > 2 else "40GB"
    raw = "--math-sdpa" in sys.argv
    syncs, ops, per = step_cost(shape, budget, cuda_sdpa=not raw)
    how = "SDPA decomposed (meta's math path)" if raw else "SDPA as one fused op (as on CUDA)"
    print(f"{shape} shape, max_memory={budget}, on meta, {how}: {syncs:.1f} host syncs/step, "
          f"{ops:.0f} aten dispatches/step")
    top = sorted(((v, k) for k, v in per.items() if k.startswith(("op:", "sync:")) and v), reverse=True)[:25]
    for v, k in top:
        print(f"  {v:10.1f}  {k}")

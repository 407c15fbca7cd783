"""CUDA-graph replay of the engine's step (``estimate_llc(cuda_graph=True)``, ``rllc_fast.engine.graph``).

A replayed graph re-runs the operations of the step it captured, with the scalar arguments they had then.
On the CPU, the proxy for "a replay does what an eager step does": every step's closures issue the same
stream of operations with the same non-tensor arguments as the step that would be captured, burn-in,
thinned-out and kept steps alike (a Python step or draw index baked into an operation, or a branch taken
on the host, would change the stream). On a GPU, graphs against eager runs, chain for chain.
"""
import warnings

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rllc_fast as r
from rllc_fast.engine import batched, graph
from rllc_fast.engine.graph import WARMUP_STEPS, cuda_graph_problem
from devices import cuda_only


@pytest.fixture(scope="module")
def small_tl():
    model = r.models.attn_only(n_layers=2, d_model=32, n_heads=4, d_head=8, n_ctx=24, d_vocab=64, seed=5)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (32, 24), generator=g)
    probes = {"a": torch.randint(0, 64, (5, 24), generator=g), "b": torch.randint(0, 64, (3, 17), generator=g)}
    return model, tokens, probes


def _signature(value, external=None):
    """What a replay fixes about an argument: a tensor's shape, dtype and device, and for a tensor made
    before the closure ran (``external`` maps its storage to itself) its address; other values by ``repr``."""
    if isinstance(value, torch.Tensor):
        where = "made here"
        if external is not None:
            ptr = value.untyped_storage().data_ptr()
            where = external.get(ptr, "made here")
        return ("tensor", tuple(value.shape), str(value.dtype), str(value.device), where)
    if isinstance(value, (list, tuple)):
        return tuple(_signature(v, external) for v in value)
    if isinstance(value, torch.Generator):  # the CPU's per-replica noise streams (CUDA draws Philox noise instead)
        return "generator"
    return repr(value)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


class _OpStream(TorchDispatchMode):
    """Every aten operation with its non-tensor arguments; tensors by shape, dtype and device, and tensors the
    closure did not make (buffers, weights, the batch) by their storage's address too: a replayed graph reads
    the addresses it captured, so a buffer swapped for another between steps would be read stale."""

    def __init__(self):
        super().__init__()
        self.ops = []
        self.made = set()      # storages this closure's operations returned
        self.external = {}     # storage address -> itself, for tensors from outside the closure

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in _tensors((args, kwargs)):
            ptr = t.untyped_storage().data_ptr() if t.device.type != "meta" else 0
            if ptr not in self.made and ptr not in self.external:
                self.external[ptr] = ptr
        self.ops.append((str(func), _signature(args, self.external), _signature(sorted(kwargs.items()), self.external)))
        out = func(*args, **kwargs)
        for t in _tensors(out):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.external:
                self.made.add(ptr)
        return out


class _RecordingGraphs:
    """Stands in for ``StepGraphs`` on the CPU: runs each closure eagerly and keeps its operation stream."""

    streams = {}

    def __init__(self, enabled: bool, warmup: int = WARMUP_STEPS, device=None):
        assert enabled is False  # the CPU run: the closures the GPU would capture
        type(self).streams = {}

    def __call__(self, name, fn):
        with _OpStream() as mode:
            out = fn()
        type(self).streams.setdefault(name, []).append(mode.ops)
        return out


def test_every_step_issues_the_operation_stream_a_graph_would_replay(small_tl, monkeypatch):
    model, tokens, probes = small_tl
    monkeypatch.setattr(batched, "StepGraphs", _RecordingGraphs)
    cfg = r.SGLDConfig(num_chains=2, num_draws=6, num_burnin=3, thinning=2, batch_size=8, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r.estimate_llc(model, tokens, cfg, components=r.heads(model), observables=probes, observe_every=2)
    streams = _RecordingGraphs.streams
    assert set(streams) == {"gradients", "update"}
    for name, per_step in streams.items():
        assert len(per_step) == cfg.num_steps
        captured = per_step[WARMUP_STEPS]
        assert len(captured) > 20, name
        for t in range(WARMUP_STEPS, cfg.num_steps):  # burn-in, thinned-out and kept steps alike
            assert per_step[t] == captured, (name, t)


def test_the_step_counter_and_spare_column_keep_draws_where_the_config_says(small_tl):
    """Kept draws land in their columns; burn-in and thinned-out steps write only the spare column: the
    batched engine's chains equal the reference engine's with burn-in and thinning."""
    model, tokens, _ = small_tl
    cfg = r.SGLDConfig(num_chains=2, num_draws=5, num_burnin=3, thinning=3, batch_size=8, seed=2)
    comps = {k: v for k, v in r.heads(model).items() if k in ("0:1", "1:2")}
    ref = r.estimate_llc(model, tokens, cfg, components=comps, engine="reference")
    bat = r.estimate_llc(model, tokens, cfg, components=comps, engine="batched")
    np.testing.assert_allclose(bat.loss_trace, ref.loss_trace, rtol=1e-5, atol=1e-6)
    for name in comps:
        np.testing.assert_allclose(bat[name].distance_trace, ref[name].distance_trace, rtol=1e-4, atol=1e-6)


def test_cuda_graph_is_refused_where_it_cannot_run(small_tl):
    model, tokens, _ = small_tl
    cfg = r.SGLDConfig(num_chains=1, num_draws=2, batch_size=8)
    with pytest.raises(r.CudaGraphUnsupported, match="needs a CUDA device, but the model is on cpu"):
        r.estimate_llc(model, tokens, cfg, components=r.heads(model), cuda_graph=True)
    with pytest.raises(TypeError, match="cuda_graph must be True or False"):
        r.estimate_llc(model, tokens, cfg, components=r.heads(model), cuda_graph="yes")
    cuda = torch.device("cuda")
    assert cuda_graph_problem(cuda, "batched", "fp32", []) is None
    assert cuda_graph_problem(cuda, "batched", "tf32", []) is None
    assert "engine='batched'" in cuda_graph_problem(cuda, "reference", "fp32", [])
    assert "'bf16'" in cuda_graph_problem(cuda, "batched", "bf16", [])
    message = cuda_graph_problem(cuda, "batched", "fp32", ["whole", "L1", "a", "b", "c"])
    assert "whole, L1, a, b, ..." in message and "separate call" in message


def test_graphs_off_run_the_closures_as_they_are():
    steps = graph.StepGraphs(False)
    assert steps("x", lambda: 7) == 7 and steps.captured == []


def _run(model, tokens, probes, cuda_graph, comps=None, cfg=None):
    cfg = cfg or r.SGLDConfig(num_chains=2, num_draws=12, num_burnin=2, batch_size=8, seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = r.estimate_llc(model, tokens, cfg, components=comps or r.heads(model), observables=probes,
                             cuda_graph=cuda_graph)
    return res, [str(w.message) for w in caught if "CUDA graph" in str(w.message)]


@cuda_only
def test_cuda_graphs_give_the_eager_chains_and_probe_losses(small_tl):
    import copy

    model, tokens, probes = small_tl
    model = copy.deepcopy(model).cuda()
    eager, _ = _run(model, tokens, probes, False)
    graphed, failures = _run(model, tokens, probes, True)
    assert failures == []  # captured, not fallen back to eager
    np.testing.assert_allclose(graphed.loss_trace, eager.loss_trace, rtol=1e-6, atol=1e-7)
    for name in eager.components:
        np.testing.assert_allclose(graphed[name].distance_trace, eager[name].distance_trace, rtol=1e-6, atol=1e-7)
    for name in probes:
        np.testing.assert_allclose(graphed.observations[name], eager.observations[name], rtol=1e-6, atol=1e-7)


def _diverging(model, tokens, cuda_graph):
    """A run whose chains blow up at different steps (``ChainsDivergedError`` carries what was measured)."""
    cfg = r.SGLDConfig(num_chains=2, num_draws=20, batch_size=8, seed=4, step_size=3.0, nbeta=300.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return r.estimate_llc(model, tokens, cfg, components=r.heads(model), cuda_graph=cuda_graph)
        except r.ChainsDivergedError as err:
            return err.result


@cuda_only
def test_under_cuda_graphs_divergence_is_flagged_at_the_eager_runs_steps(small_tl):
    """Divergence is found and frozen on the device inside the replayed graph exactly as in the eager step
    (which the CPU tests check against the reference engine): same steps, same traces of the survivors."""
    import copy

    model, tokens, _ = small_tl
    model = copy.deepcopy(model).cuda()
    eager, graphed = _diverging(model, tokens, False), _diverging(model, tokens, True)
    at = np.concatenate([eager[n].diverged_at for n in eager.components])
    assert (at >= WARMUP_STEPS).any()  # some replica diverged while the graphs were replaying
    for name in eager.components:
        np.testing.assert_array_equal(graphed[name].diverged_at, eager[name].diverged_at)
        np.testing.assert_allclose(graphed[name].loss_trace, eager[name].loss_trace, rtol=1e-6, atol=1e-7)


def test_cuda_graph_needs_minibatches_of_one_shape(small_tl, monkeypatch):
    """Checked before sampling (a DataLoader may end an epoch with a smaller batch); the device check is passed
    here so that the data check is reached on this CPU."""
    from rllc_fast import llc

    model, tokens, _ = small_tl
    monkeypatch.setattr(llc, "cuda_graph_problem", lambda *a: None)
    loader = torch.utils.data.DataLoader(tokens, batch_size=10)
    with pytest.raises(r.CudaGraphUnsupported, match="minibatches of one shape"):
        r.estimate_llc(model, loader, r.SGLDConfig(num_chains=1, num_draws=2, batch_size=None),
                       components=r.heads(model), cuda_graph=True)

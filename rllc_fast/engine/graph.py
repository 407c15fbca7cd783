"""CUDA-graph replay of the batched engine's steady-state step (opt-in: ``estimate_llc(cuda_graph=True)``).

The engine writes one SGLD step as two closures over static device buffers (no per-step Python argument,
no host sync): the replicas' losses and gradients with the divergence bookkeeping, then the update. With
graphs on, each closure runs eagerly for the first ``WARMUP_STEPS`` steps (on a side stream, as CUDA graph
capture asks), is then captured once and replayed every later step: one graph launch instead of a kernel
launch per operation. Probe-set passes (observables) and the host reads every ``SYNC_EVERY`` steps stay
eager, between the two replays. The same closures run eagerly on every device when graphs are off, so the
CPU tests exercise the code that is captured.

If capture fails (an operation that cannot be captured, or out of memory), a ``RuntimeWarning`` says why
and the run goes on eagerly from the same step: nothing is lost and no step is run twice (capture
executes nothing).
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional

import torch

WARMUP_STEPS = 3
"""Eager steps before capture (cuBLAS handles, the autograd engine's and the allocator's first-use work)."""


class CudaGraphUnsupported(ValueError):
    """``cuda_graph=True`` asked where it cannot run (the message says why and what to do)."""


def cuda_graph_problem(device, engine: str, matmul_precision: str, generic: List[str]) -> Optional[str]:
    """Why ``cuda_graph=True`` cannot be honoured (None when it can): a device that is not CUDA, an engine
    other than ``"batched"``, bfloat16 autocast, or components on the generic path (``generic``: their
    names; the loop over replicas decides on the host which to run)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"cuda_graph=True needs a CUDA device, but the model is on {device}: leave cuda_graph off"
    if engine != "batched":
        return f"cuda_graph=True needs engine='batched', got {engine!r}"
    if matmul_precision == "bf16":
        return ("cuda_graph=True does not support matmul_precision='bf16' (autocast's cast cache cannot be "
                "captured): use 'fp32' or 'tf32', or leave cuda_graph off")
    if generic:
        shown = ", ".join(generic[:4]) + (", ..." if len(generic) > 4 else "")
        return (f"cuda_graph=True needs every component on the structured path (single attention heads, query "
                f"heads or key/value groups of a TransformerLens model, token or KL loss); these are not: "
                f"{shown}. Estimate them in a separate call without cuda_graph")
    return None


class StepGraphs:
    """Run named step closures eagerly, or (``enabled``) capture each once after ``WARMUP_STEPS`` eager calls
    and replay it; ``captured`` names the closures that run as graphs."""

    def __init__(self, enabled: bool, warmup: int = WARMUP_STEPS, device=None):
        """device: the model's CUDA device (streams, the memory pool and capture belong to it, whatever the
        current device is)."""
        self.enabled = enabled
        self.warmup = warmup
        self.device = torch.device(device) if device is not None else None
        self.graphs: Dict[str, torch.cuda.CUDAGraph] = {}
        self.outputs: Dict[str, object] = {}
        self.calls: Dict[str, int] = {}
        self.pool = self.side = None
        if enabled:
            with torch.cuda.device(self.device):
                self.pool = torch.cuda.graph_pool_handle()
                self.side = torch.cuda.Stream()

    @property
    def captured(self) -> List[str]:
        return list(self.graphs)

    def __call__(self, name: str, fn: Callable[[], object]) -> object:
        """``fn()``'s result: eagerly, or by replaying its graph (the same static output tensors every step)."""
        if not self.enabled:
            return fn()
        with torch.cuda.device(self.device):
            if name in self.graphs:
                self.graphs[name].replay()
                return self.outputs[name]
            calls = self.calls.get(name, 0)
            self.calls[name] = calls + 1
            if calls < self.warmup:
                return self._on_side_stream(fn)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self.pool):
                    out = fn()
            except Exception as err:  # noqa: BLE001 - any capture failure: warn and go on eagerly
                self.enabled = False
                self.graphs, self.outputs = {}, {}  # the other closure's graph and its pool go too
                warnings.warn(f"CUDA graph capture of the engine's {name} failed ({type(err).__name__}: {err}); the "
                              "run continues without CUDA graphs from this step", RuntimeWarning, stacklevel=3)
                torch.cuda.synchronize()
                return fn()
            self.graphs[name], self.outputs[name] = graph, out
            graph.replay()  # capture ran nothing: this is the step's work
            return out

    def _on_side_stream(self, fn: Callable[[], object]) -> object:
        current = torch.cuda.current_stream()
        self.side.wait_stream(current)
        with torch.cuda.stream(self.side):
            out = fn()
        current.wait_stream(self.side)
        return out

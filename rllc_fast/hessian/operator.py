"""Hessian-vector products of a loss with respect to the weights of some components, many probes at once.

Vectors live in one flat coordinate system, the *support*: the parameters that any of the components
touches, each flattened, concatenated in model order (``Support.numel`` entries). Entries of those
parameters that no component covers are masked to zero in every probe, so ``H v`` is the Hessian of the
loss as a function of the components' weights only (the paper's weight refinement), applied to ``v``.
Per component, ``Support.index[name]`` lists its flat positions.

Two ways to compute ``H v`` for ``J`` probes on one batch (``BatchHessian``):

- ``"double-backward"``: the gradient graph is built once per batch (``create_graph=True``) and
  differentiated again for each chunk of probes (``is_grads_batched`` over a chunk; a plain loop for
  chunks of 1). This is what PyHessian does, without rebuilding the graph per probe.
- ``"forward-over-reverse"``: ``torch.func.jvp`` of ``torch.func.grad``, ``vmap``-ed over a chunk.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .. import ops
from ..components import Component

METHODS = ("double-backward", "forward-over-reverse")

#: ``hvp="auto"``: the method, and the probe chunk for supports of fewer / at least ``SMALL_SUPPORT`` weights,
#: per device type. Measured on this project's 2-core CPU (README, Hessian section): double backward with the
#: graph reused beat forward-over-reverse at both sizes; batching probes (``is_grads_batched``) was ~6x faster
#: per HVP for a tiny model (600 weights, chunk 32) but ~2x slower for the paper-shape heads (526k weights,
#: chunk 4 or 8). No GPU was measured: CUDA uses batched chunks of 8, unmeasured.
AUTO = {"cpu": ("double-backward", 16, 1), "cuda": ("double-backward", 8, 8)}
SMALL_SUPPORT = 100_000


class Support:
    """The flat coordinates of the components' weights (see module doc).

    names:  the support's parameter names (model order); shapes: their shapes; numel: total entries.
    mask:   [numel] bool, True where some component covers the entry.
    index:  {component: LongTensor of its flat positions}; sizes: {component: count}.
    """

    def __init__(self, model: nn.Module, components: Dict[str, Component], device):
        params = dict(model.named_parameters())
        for comp in components.values():
            comp.check_model(model)
        wanted = {s.param for comp in components.values() for s in comp.slices}
        self.names: List[str] = [n for n in params if n in wanted]
        self.shapes = [tuple(params[n].shape) for n in self.names]
        sizes = [params[n].numel() for n in self.names]
        self.offsets = dict(zip(self.names, torch.tensor([0] + sizes).cumsum(0).tolist()))
        self.numel = int(sum(sizes))
        self.device = torch.device(device)
        self.index: Dict[str, torch.Tensor] = {}
        for name, comp in components.items():
            parts = []
            for s in comp.slices:
                positions = torch.arange(params[s.param].numel()).view(s.param_shape)
                parts.append(s.view(positions).reshape(-1) + self.offsets[s.param])
            self.index[name] = torch.unique(torch.cat(parts)).to(self.device)
        self.sizes = {name: int(idx.numel()) for name, idx in self.index.items()}
        self.mask = torch.zeros(self.numel, dtype=torch.bool, device=self.device)
        for idx in self.index.values():
            self.mask[idx] = True
        self._cat_index = torch.cat(list(self.index.values()))
        self._block_offsets = torch.tensor([0] + list(self.sizes.values()), device=self.device).cumsum(0)

    @property
    def component_names(self) -> List[str]:
        return list(self.index)

    def parameters(self, model: nn.Module) -> List[torch.Tensor]:
        params = dict(model.named_parameters())
        return [params[n] for n in self.names]

    def unflatten(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """``[J, numel]`` -> per support parameter ``[J, *shape]`` (views)."""
        sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        return [part.view(flat.shape[0], *shape) for part, shape in zip(flat.split(sizes, dim=1), self.shapes)]

    def flatten(self, parts: Sequence[Optional[torch.Tensor]], rows: int) -> torch.Tensor:
        """Per parameter ``[J, *shape]`` (None = zero) -> ``[J, numel]``."""
        out = []
        for part, shape in zip(parts, self.shapes):
            n = int(torch.Size(shape).numel())
            out.append(torch.zeros(rows, n, device=self.device) if part is None else part.reshape(rows, n))
        return torch.cat(out, dim=1)

    def _rng_states(self, seed: int, streams: Sequence[int]) -> torch.Tensor:
        """``[len(streams), 2]`` int64 ``[seed, stream]`` rows on the device, made in one host-to-device copy
        (row j is the ``rng_state`` of probe j)."""
        return torch.tensor([[seed, s] for s in streams], dtype=torch.int64).to(self.device)

    def shared_probes(self, seed: int, streams: Sequence[int]) -> torch.Tensor:
        """``[len(streams), numel]`` Rademacher probes over every component's weights (zero elsewhere);
        row j depends only on ``(seed, streams[j])``, so chunking does not change the probes."""
        states = self._rng_states(seed, streams)
        rows = [ops.rademacher(1, self.numel, state) for state in states]
        return torch.cat(rows) * self.mask

    def component_probes(self, owners: Sequence[str], seed: int, streams: Sequence[int]) -> torch.Tensor:
        """``[len(owners), numel]``: row j is a Rademacher probe on component ``owners[j]``'s weights only."""
        out = torch.zeros(len(owners), self.numel, device=self.device)
        for j, (name, state) in enumerate(zip(owners, self._rng_states(seed, streams))):
            idx = self.index[name]
            out[j, idx] = ops.rademacher(1, idx.numel(), state)[0]
        return out

    def restrict(self, flat: torch.Tensor, owners: Sequence[str]) -> torch.Tensor:
        """Row j of ``flat`` with every entry outside component ``owners[j]`` set to zero."""
        out = torch.zeros_like(flat)
        for j, name in enumerate(owners):
            idx = self.index[name]
            out[j, idx] = flat[j, idx]
        return out

    def block_dots(self, v: torch.Tensor, hv: torch.Tensor) -> torch.Tensor:
        """``[J, components]``: per probe and component ``v_V . (Hv)_V`` (the ``blocked_dot`` op)."""
        idx = self._cat_index
        return ops.blocked_dot(v[:, idx].float().contiguous(), hv[:, idx].float().contiguous(), self._block_offsets)

    def component_dots(self, v: torch.Tensor, w: torch.Tensor, owners: Sequence[str]) -> torch.Tensor:
        """``[J]``: row j's dot product over component ``owners[j]``'s weights."""
        return torch.stack([(v[j, self.index[n]] * w[j, self.index[n]]).sum() for j, n in enumerate(owners)])


class _LossModule(nn.Module):
    """``loss_fn(model, batch)`` as a module, so ``torch.func.functional_call`` can swap its weights."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def default_loss(data, model: nn.Module, loss_fn: Optional[Callable]) -> Callable:
    """``loss_fn``, or next-token cross-entropy once ``data`` checks out as tokens ``[N, T]`` for ``model``."""
    if loss_fn is not None:
        return loss_fn
    from ..losses import NextTokenLoss, check_tokens

    check_tokens(data, model, what="data")
    return NextTokenLoss()


def check_scalar_loss(loss) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar (0-dim) tensor, got {shape}; reduce it (e.g. .mean())")
    if not loss.dtype.is_floating_point:
        raise ValueError(f"loss_fn must return a floating-point scalar, got {loss.dtype}")
    return loss


@contextlib.contextmanager
def only_grad_for(model: nn.Module, names: Sequence[str]):
    """Inside: exactly the named parameters require grad and the model is in eval mode; restored after."""
    wanted = set(names)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    training = model.training
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in wanted)
        model.eval()
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(before[n])
        model.train(training)


def unused_parameters(model: nn.Module, loss_fn: Callable, batch, support: Support) -> List[str]:
    """Support parameters the loss on ``batch`` does not depend on (no gradient path)."""
    params = support.parameters(model)
    with torch.enable_grad():
        loss = check_scalar_loss(loss_fn(model, batch))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [n for n, g in zip(support.names, grads) if g is None]


class BatchHessian:
    """``H v`` on one batch for flat probes ``[J, numel]`` (call ``apply``); the loss on the batch is ``loss``
    (a 0-dim tensor on the device, so building the operator does not wait for the device).

    Use inside ``only_grad_for(model, support.names)``."""

    def __init__(self, model: nn.Module, loss_fn: Callable, batch, support: Support, method: str = "double-backward",
                 chunk: int = 1):
        if method not in METHODS:
            raise ValueError(f"hvp method must be one of {METHODS}, got {method!r}")
        if chunk < 1:
            raise ValueError(f"probe chunk must be >= 1, got {chunk}")
        self.support, self.method, self.chunk = support, method, chunk
        params = support.parameters(model)
        if method == "double-backward":
            with torch.enable_grad():
                loss = check_scalar_loss(loss_fn(model, batch))
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            # gradients with no graph of their own (constant in the weights) add nothing to H v
            self._pairs = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]
            self._params = params
            self.loss = loss.detach()
        else:
            from torch.func import functional_call, grad

            module = _LossModule(model, loss_fn)
            names = ["model." + n for n in support.names]
            self._primals = {n: p.detach() for n, p in zip(names, params)}
            self._names = names
            self._grad = grad(lambda pd: functional_call(module, pd, (batch,), strict=False))
            with torch.no_grad():
                self.loss = check_scalar_loss(loss_fn(model, batch))

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """``[J, numel]`` probes -> ``[J, numel]`` Hessian-vector products (float32)."""
        out = [self._apply_chunk(v[i:i + self.chunk]) for i in range(0, v.shape[0], self.chunk)]
        return torch.cat(out) * self.support.mask

    def _apply_chunk(self, v: torch.Tensor) -> torch.Tensor:
        J = v.shape[0]
        parts = self.support.unflatten(v)
        if self.method == "double-backward":
            if not self._pairs:
                return torch.zeros_like(v)
            outputs = [g for _, g in self._pairs]
            inputs = self._params
            if J == 1:
                hv = torch.autograd.grad(outputs, inputs, grad_outputs=[parts[i][0] for i, _ in self._pairs],
                                         retain_graph=True, allow_unused=True)
                hv = [None if h is None else h[None] for h in hv]
            else:
                hv = torch.autograd.grad(outputs, inputs, grad_outputs=[parts[i] for i, _ in self._pairs],
                                         retain_graph=True, allow_unused=True, is_grads_batched=True)
            return self.support.flatten(hv, J)
        from torch.func import jvp, vmap

        def one(*tangent):
            return jvp(self._grad, (self._primals,), (dict(zip(self._names, tangent)),))[1]

        with torch.no_grad():
            hv = vmap(one)(*parts) if J > 1 else {k: t[None] for k, t in one(*(p[0] for p in parts)).items()}
        return self.support.flatten([hv[n] for n in self._names], J)


def resolve_method(hvp: str, device, probe_chunk: Optional[int], numel: int):
    """``(method, chunk)`` for ``hvp`` ("auto" or a method name) on ``device`` for a support of ``numel`` weights."""
    kind = torch.device(device).type
    auto_method, small, large = AUTO.get(kind, AUTO["cpu"])
    auto_chunk = small if numel < SMALL_SUPPORT else large
    method = auto_method if hvp == "auto" else hvp
    if method not in METHODS:
        raise ValueError(f"hvp must be 'auto' or one of {METHODS}, got {hvp!r}")
    chunk = probe_chunk if probe_chunk is not None else (auto_chunk if method == auto_method else 4)
    if chunk < 1:
        raise ValueError(f"probe_chunk must be >= 1, got {chunk}")
    return method, chunk


class DataHessian:
    """The Hessian of the mean loss over ``batches``, restricted per row to a component: ``matvec(v, owners)``.

    With ``keep_graphs`` every batch's gradient graph is built once and kept (memory grows with the
    number of batches); otherwise it is rebuilt for each call. ``on_hvp(count)`` is called after each batch."""

    def __init__(self, model, loss_fn, batches, support: Support, method: str, chunk: int, keep_graphs: bool = True,
                 on_hvp: Callable[[int], None] = lambda n: None):
        self.model, self.loss_fn, self.batches, self.support = model, loss_fn, batches, support
        self.method, self.chunk, self.on_hvp = method, chunk, on_hvp
        self._ops = [self._build(b) for b in batches] if keep_graphs else None

    def _build(self, batch) -> BatchHessian:
        return BatchHessian(self.model, self.loss_fn, batch, self.support, self.method, self.chunk)

    def matvec(self, v: torch.Tensor, owners: Optional[Sequence[str]] = None) -> torch.Tensor:
        """``[J, numel]`` -> mean over batches of ``H_b v``, row j restricted to ``owners[j]`` (None: the support)."""
        total = torch.zeros_like(v)
        for i, batch in enumerate(self.batches):
            op = self._ops[i] if self._ops is not None else self._build(batch)
            total += op.apply(v)
            self.on_hvp(v.shape[0])
        total /= len(self.batches)
        return total if owners is None else self.support.restrict(total, owners)


def hvp(model: nn.Module, batch, vectors: Dict[str, torch.Tensor], loss_fn: Optional[Callable] = None,
        method: str = "double-backward", chunk: int = 4) -> Dict[str, torch.Tensor]:
    """Hessian-vector products on one batch: ``vectors`` maps parameter names to ``[J, *param.shape]``
    (J probes); returns the same for ``H v``, with ``H`` the Hessian of ``loss_fn(model, batch)`` (default:
    next-token cross-entropy of tokens ``[N, T]``) as a function of those parameters only."""
    from ..components import from_params

    if not vectors:
        raise ValueError("vectors: give at least one {parameter name: [J, *shape]} entry")
    loss_fn = default_loss(batch, model, loss_fn)
    comp = from_params(model, list(vectors), name="hvp")
    device = next(model.parameters()).device
    support = Support(model, {"hvp": comp}, device)
    rows = {int(t.shape[0]) for t in vectors.values()}
    if len(rows) != 1:
        raise ValueError(f"vectors: every entry needs the same number of probes J on dim 0, got {sorted(rows)}")
    J = rows.pop()
    for name, shape in zip(support.names, support.shapes):
        if tuple(vectors[name].shape[1:]) != shape:
            raise ValueError(f"vectors[{name!r}] has shape {tuple(vectors[name].shape)}, expected [J, {shape}]")
    flat = support.flatten([vectors[n].to(device=device, dtype=torch.float32) for n in support.names], J)
    with only_grad_for(model, support.names):
        out = BatchHessian(model, loss_fn, batch, support, method, chunk).apply(flat)
    return dict(zip(support.names, support.unflatten(out)))

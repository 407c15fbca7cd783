"""A FLOP-and-bytes model of one SGLD step of the structured (head-replica) path, and a roofline projection of
its time on a device. Projections, not measurements: a figure from here is labelled "projection".

What one step computes (``engine/batched.py``, ``engine/structured.py``, ``engine/head_replicas.py``, ``engine/unembed_loss.py``), for a batch of
``N`` contexts of ``T`` tokens, ``P = T - 1`` predicted positions, and ``R`` head replicas, replica ``r`` of
layer ``l_r``:

- **shared** (once per step, at ``w*``, no gradient): ``l(w*)`` on the batch (the whole model, by the
  structured path's own blocks when every component takes it, with logits at the ``P`` predicted positions), and the shared pass ``HeadReplicas.shared``: blocks ``0 .. max(l_r)`` on ``[N, T]``;
- **per replica**, forward and backward (gradients flow to the replica's own head weights only, so the
  backward of a frozen weight's matmul is the input gradient alone):
  - *own head*: its Q, K, V projections, scores, pattern x V, output projection, and the ``w*`` head's
    output taken out (``star``, forward only);
  - *layers above*: the own layer's MLP (sequential blocks only; a parallel block's MLP output is shared)
    and every block above ``l_r`` in full, on ``[N, P]``;
  - *unembedding*: logits ``x W_U`` and the loss gradient ``(softmax - onehot) W_U^T``, formed in the
    forward pass (``unembed_loss``); its backward is a scaling;
  - *SGLD update*: the ``sgld_step`` op and the gradient's way into the packed buffer (bytes only).

FLOPs are matrix-product FLOPs (``2 m n k`` per product, as ``torch.utils.flop_counter`` counts them), the
work tensor cores do; elementwise work (softmax, norms, activations) is counted in bytes only. Attention
scores are full ``P x P`` products, as computed today (no causal skipping). ``tests/test_cost_model.py``
checks the FLOPs against ``FlopCounterMode`` on the real path and the bytes against a count of every
operator's reads and writes.

Bytes are HBM traffic with no cache reuse: every matrix product reads its operands and writes its output
once, and elementwise passes over score-, logit- and activation-sized tensors are counted per element
(``ELEMENTWISE_PASSES``). ``attention="fused"`` / ``unembedding="fused"`` model a flash-attention kernel and
a fused unembedding loss, whose ``[P, P]`` scores and ``[P, vocab]`` logits never reach memory.

Time is a roofline per part: ``max(FLOPs / peak FLOP/s, bytes / peak bandwidth)``, summed; vendor peaks are
not reached in practice, so a projection is a lower bound on the time of the modelled computation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

#: Elementwise passes (reads + writes, in tensor-sizes of float32) per element, counted in today's eager code
#: (TransformerLens 3.9) by a dispatch-mode count of every operator's reads and writes on the meta device at
#: the paper's and Pythia-70m's shapes, less the matrix products' own reads and writes: over the own head's
#: ``[N, P, P]`` scores (scale, mask, softmax and its backward, a reshape copy); over each upper-layer head's
#: scores (TransformerLens's attention: scale, ``torch.where`` masks, NaN check, softmax and backward); over
#: the ``[N, P, vocab]`` logits (log-sum-exp, softmax in place, target gather and scatter); per replica over
#: ``[N, P, d_model]`` (own head, residual sums, final norm, loss gradient), per upper layer (norms,
#: residuals, attention reshapes), extra with rotary embeddings, over the MLP's ``[N, P, d_mlp]`` and, in a
#: sequential block, over ``[N, P, d_model]`` around the replica's own layer's MLP (a GPT-2-like shape); and
#: the same for the forward-only blocks of the shared ``w*`` pass and ``l(w*)`` (``[N, T]``), and l(w*)'s logits.
#: Elementwise passes over a factored last-layer replica's ``[N, P, vocab]`` logits beyond the plain loss's (the
#: shared product's broadcast add, the scale's division, the bias, and the scale's gradient: a subtraction, a
#: product and a sum), counted in ``unembed_loss._low_rank_rows``.
FACTORED_EXTRA_PASSES = 8.0
#: Stale since the engine's fused norms, fused attention and one-pass token loss (2026-11-30): the modelled
#: bytes are now an overestimate (1.6-1.8x the counted traffic at tiny shapes; tests/test_cost_model.py), so
#: the bytes-bound parts of the projections are pessimistic until these are re-taken.
ELEMENTWISE_PASSES = {
    "own_scores": 15.0,
    "upper_scores": 23.75,
    "logits": 8.0,
    "own_activations": 59.0,
    "own_rotary": 10.0,
    "upper_activations": 186.0,
    "upper_rotary": 81.0,
    "mlp_hidden": 5.0,
    "own_mlp_activations": 51.0,
    # forward only, no gradient (the shared w* pass and l(w*)): per block and over l(w*)'s logits
    "shared_scores": 14.5,
    "shared_activations": 71.0,
    "shared_rotary": 22.0,
    "shared_mlp_hidden": 2.25,
    "shared_logits": 7.8,
}

#: Passes over a replica's packed head weights ``[4 d_model d_head + 3 d_head]`` per step outside the model,
#: read from ``engine/batched.py``: gradient zeroed (1), the row cloned into the autograd leaf (2), its gradient
#: written and copied into the buffer (3), the CPU noise drawn (1), ``sgld_step`` reading w, grad, w*, noise
#: and writing w (5), and reading w, w* again for the distance (2).
UPDATE_PASSES = 14.0

#: Vendor peak figures for one NVIDIA H200 SXM (dense, no sparsity): FP32 non-tensor 67 TFLOP/s, TF32
#: tensor 495 TFLOP/s, BF16 tensor 990 TFLOP/s; HBM3e 4.8 TB/s. Peaks, not what kernels reach.
H200 = {"name": "NVIDIA H200 SXM (vendor peaks)", "flops": {"fp32": 67e12, "tf32": 495e12, "bf16": 990e12},
        "bytes_per_s": 4.8e12}

PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass
class Part:
    """One part of a step: ``flops`` (matrix-product FLOPs) and ``bytes`` (HBM traffic), ``shared`` or not."""

    name: str
    shared: bool
    flops: float = 0.0
    bytes: float = 0.0


@dataclass
class StepCost:
    """The modelled cost of one SGLD step: its ``parts`` and the shape it was modelled for."""

    parts: List[Part]
    shape: Dict[str, object] = field(default_factory=dict)

    @property
    def flops(self) -> float:
        return sum(p.flops for p in self.parts)

    @property
    def bytes(self) -> float:
        return sum(p.bytes for p in self.parts)

    def part(self, name: str) -> Part:
        return next(p for p in self.parts if p.name == name)

    def seconds(self, device: Mapping = H200, precision: str = "tf32") -> float:
        """Projected seconds per step on ``device`` (``{"flops": {precision: FLOP/s}, "bytes_per_s": B/s}``):
        per part the slower of compute and memory at peak, summed."""
        if precision not in device["flops"]:
            raise ValueError(f"precision must be one of {sorted(device['flops'])}, got {precision!r}")
        peak, bw = device["flops"][precision], device["bytes_per_s"]
        return sum(max(p.flops / peak, p.bytes / bw) for p in self.parts)

    def summary(self, device: Mapping = H200, steps: int = 200) -> Dict[str, object]:
        """A JSON-able projection: FLOPs and bytes per part, and seconds per step and per ``steps``-step
        checkpoint at each precision of ``device`` (all labelled as projections)."""
        total = self.flops
        return {
            "label": f"projection (roofline at {device['name']}), not a measurement",
            "shape": self.shape,
            "tflop_per_step": total / 1e12,
            "gb_per_step": self.bytes / 1e9,
            "parts": {p.name: {"shared": p.shared, "tflop": p.flops / 1e12, "flop_share": p.flops / total,
                               "gb": p.bytes / 1e9} for p in self.parts},
            "seconds_per_step": {q: self.seconds(device, q) for q in device["flops"]},
            "seconds_per_checkpoint": {q: steps * self.seconds(device, q) for q in device["flops"]},
            "steps_per_checkpoint": steps,
        }


def _get(cfg, name, default=None):
    return cfg.get(name, default) if isinstance(cfg, Mapping) else getattr(cfg, name, default)


class _Counter:
    """Accumulates matrix products and elementwise passes into one ``Part``."""

    def __init__(self, part: Part, elem: int):
        self.part, self.elem = part, elem

    def mm(self, m: float, k: float, n: float, count: float = 1.0, out: bool = True, a: bool = True,
           b: bool = True) -> None:
        """``count`` products ``[m, k] x [k, n]``; ``a``/``b``/``out`` say whether that operand moves through
        memory (False: never materialised, e.g. flash attention's scores, or amortised shared weights)."""
        self.part.flops += count * 2 * m * k * n
        self.part.bytes += count * self.elem * ((m * k if a else 0) + (k * n if b else 0) + (m * n if out else 0))

    def passes(self, elements: float, passes: float) -> None:
        self.part.bytes += 4 * elements * passes  # elementwise work runs in float32


def _block_forward(c: _Counter, cfg, rows: float, n_ctx: float, batch: float, fused_attention: bool,
                   mlp: bool = True) -> None:
    """Forward matmuls of one whole block (frozen weights: reads amortised) on ``rows = batch * n_ctx``."""
    d, H, dh, m = cfg["d_model"], cfg["n_heads"], cfg["d_head"], cfg["d_mlp"]
    c.mm(rows, d, 3 * H * dh, b=False)                                            # Q, K, V
    c.mm(n_ctx, dh, n_ctx, count=batch * H, out=not fused_attention)              # scores
    c.mm(n_ctx, n_ctx, dh, count=batch * H, a=not fused_attention)                # pattern x V
    c.mm(rows, H * dh, d, b=False)                                                # W_O
    if mlp and m:
        c.mm(rows, d, m, b=False)
        c.mm(rows, m, d, b=False)


def _block_backward(c: _Counter, cfg, rows: float, n_ctx: float, batch: float, fused_attention: bool,
                    mlp: bool = True) -> None:
    """Input-gradient matmuls of one whole block with frozen weights."""
    d, H, dh, m = cfg["d_model"], cfg["n_heads"], cfg["d_head"], cfg["d_mlp"]
    if mlp and m:
        c.mm(rows, d, m, b=False)
        c.mm(rows, m, d, b=False)
    c.mm(rows, d, H * dh, b=False)                                                # dz
    if fused_attention:  # a fused kernel keeps no scores: its backward recomputes them
        c.mm(n_ctx, dh, n_ctx, count=batch * H, out=False)
    c.mm(n_ctx, dh, n_ctx, count=batch * H, out=not fused_attention)              # d pattern
    c.mm(n_ctx, n_ctx, dh, count=batch * H, a=not fused_attention)                # dV
    c.mm(n_ctx, n_ctx, dh, count=2 * batch * H, a=not fused_attention)            # dQ, dK
    c.mm(rows, 3 * H * dh, d, b=False)                                            # d input of Q, K, V


def _config(cfg) -> Dict[str, object]:
    names = ("n_layers", "d_model", "n_heads", "d_head", "d_vocab")
    out = {n: _get(cfg, n) for n in names}
    missing = [n for n, v in out.items() if not isinstance(v, int) or v < 1]
    if missing:
        raise ValueError(f"cfg: needs positive integers {', '.join(missing)} (a HookedTransformerConfig or a dict "
                         "like rllc_fast.models.PAPER_CONFIG)")
    attn_only = bool(_get(cfg, "attn_only", False))
    out["d_mlp"] = 0 if attn_only else int(_get(cfg, "d_mlp", None) or 4 * out["d_model"])
    out["parallel"] = bool(_get(cfg, "parallel_attn_mlp", False))
    out["rotary"] = _get(cfg, "positional_embedding_type", "standard") == "rotary"
    return out


def step_cost(cfg, layers: Sequence[int], batch: int, context: int, precision: str = "fp32",
              attention: str = "materialized", unembedding: str = "materialized",
              unembed_block_rows: Optional[int] = None, last_layer: str = "plain") -> StepCost:
    """The modelled cost of one SGLD step of the structured path (see the module doc).

    cfg:       a TransformerLens config (or a dict with its fields: ``n_layers, d_model, n_heads, d_head,
               d_vocab``, and ``attn_only, d_mlp, parallel_attn_mlp, positional_embedding_type``).
    layers:    the layer of each head replica (e.g. 16 heads x 4 chains of a 2-layer model: 32 zeros, 32 ones).
    batch, context: the token batch ``[batch, context]``.
    precision: "fp32" or "tf32" (4-byte matmul operands) or "bf16" (2-byte); elementwise work is float32.
    attention, unembedding: "materialized" (today's eager code) or "fused" (scores / logits never in memory).
    unembed_block_rows: rows per unembedding block, each re-reading ``W_U`` twice (today's CPU-cache blocks:
               ``max(64, 2**20 // d_vocab)`` rows); None: left out, as every frozen weight's reads are (blocks
               sized from a GPU memory budget read it a few times a step).
    last_layer: "plain" or "factored": the last layer's replicas by ``HeadReplicas.final_logit_parts`` (what the
               engine does on CUDA in float32, for attention-only and parallel blocks; ``unembed_loss.FACTORED_DEVICES``):
               ``A = resid @ W`` once per step (one chunk of them), and per replica the products of inner size
               ``2 d_head`` and ``d_head`` instead of ``d_model``, plus ``W_O W`` and its gradient.
    """
    c = _config(cfg)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    for name, value in (("attention", attention), ("unembedding", unembedding)):
        if value not in ("materialized", "fused"):
            raise ValueError(f"{name} must be 'materialized' or 'fused', got {value!r}")
    if last_layer not in ("plain", "factored"):
        raise ValueError(f"last_layer must be 'plain' or 'factored', got {last_layer!r}")
    layers = [int(l) for l in layers]
    if not layers or any(not 0 <= l < c["n_layers"] for l in layers):
        raise ValueError(f"layers: give the layer (0..{c['n_layers'] - 1}) of each replica, got {layers!r}")
    if batch < 1 or context < 2:
        raise ValueError(f"batch must be >= 1 and context >= 2, got {batch} and {context}")
    elem = 2 if precision == "bf16" else 4
    fused_attn, fused_unembed = attention == "fused", unembedding == "fused"
    N, T, P = batch, context, context - 1
    d, dh, V, H, m = c["d_model"], c["d_head"], c["d_vocab"], c["n_heads"], c["d_mlp"]
    B = N * P
    e = ELEMENTWISE_PASSES

    def shared_blocks(k: _Counter, count: int) -> None:
        for _ in range(count):
            _block_forward(k, c, N * T, T, N, fused_attn)
            if not fused_attn:
                k.passes(N * H * T * T, e["shared_scores"])
            k.passes(N * T * d, e["shared_activations"] + (e["shared_rotary"] if c["rotary"] else 0))
            k.passes(N * T * m, e["shared_mlp_hidden"])

    lstar = Part("shared: l(w*)", True)
    k = _Counter(lstar, elem)
    shared_blocks(k, c["n_layers"])
    k.mm(N * P, d, V, b=False, out=not fused_unembed)
    if not fused_unembed:
        k.passes(N * P * V, e["shared_logits"])
    shared = Part("shared: w* pass", True)
    shared_blocks(_Counter(shared, elem), max(layers) + 1)

    own, upper, unembed = (Part("per-replica: own head", False), Part("per-replica: layers above", False),
                           Part("per-replica: unembedding", False))
    ko, ku, kv = _Counter(own, elem), _Counter(upper, elem), _Counter(unembed, elem)
    factored = last_layer == "factored" and (not c["d_mlp"] or c["parallel"]) and c["n_layers"] - 1 in layers
    if factored:  # the w* stream after the last layer times the folded unembedding, shared by its replicas
        _Counter(shared, elem).mm(B, d, V, b=False)
    for layer in layers:
        # own head, forward: projections of the (shared, frozen) normed input with the replica's weights
        ko.mm(B, d, dh, count=3, a=False)
        ko.mm(P, dh, P, count=N, out=not fused_attn)
        ko.mm(P, P, dh, count=N, a=not fused_attn)
        ko.mm(B, dh, d)                                        # own W_O
        ko.mm(B, dh, d)                                        # the w* head's output, taken out
        # backward: weight gradients of the own head; input gradients inside it
        ko.mm(dh, B, d)                                        # dW_O
        ko.mm(B, d, dh)                                        # dz
        if fused_attn:                                         # scores recomputed by the fused backward
            ko.mm(P, dh, P, count=N, out=False)
        ko.mm(P, dh, P, count=N, out=not fused_attn)           # d pattern
        ko.mm(P, P, dh, count=3 * N, a=not fused_attn)         # dV, dQ, dK
        ko.mm(d, B, dh, count=3, a=False)                      # dW_Q, dW_K, dW_V
        if not fused_attn:
            ko.passes(N * P * P, e["own_scores"])
        ko.passes(B * d, e["own_activations"] + (e["own_rotary"] if c["rotary"] else 0))
        if m and not c["parallel"]:                            # the own layer's MLP, on the new residual
            ku.mm(B, d, m, b=False)
            ku.mm(B, m, d, b=False)
            ku.mm(B, d, m, b=False)
            ku.mm(B, m, d, b=False)
            ku.passes(B * m, e["mlp_hidden"])
            ku.passes(B * d, e["own_mlp_activations"])
        for _ in range(c["n_layers"] - layer - 1):
            _block_forward(ku, c, B, P, N, fused_attn)
            _block_backward(ku, c, B, P, N, fused_attn)
            if not fused_attn:
                ku.passes(N * H * P * P, e["upper_scores"])
            ku.passes(B * d, e["upper_activations"] + (e["upper_rotary"] if c["rotary"] else 0))
            if m:
                ku.passes(B * m, e["mlp_hidden"])
        if factored and layer == c["n_layers"] - 1:
            kv.mm(dh, d, V)                                    # M = W_O W
            kv.mm(B, 2 * dh, V, b=False)                       # logits less the shared A: [z, z*] @ [M; -M*]
            kv.mm(B, V, dh, a=False)                           # d z = dlogits M^T
            kv.mm(dh, B, V, b=False)                           # d M = z^T dlogits
            kv.mm(dh, V, d, b=False)                           # d W_O = d M W^T
            kv.passes(B * V, e["logits"] + FACTORED_EXTRA_PASSES)
            continue
        kv.mm(B, d, V, b=False, out=not fused_unembed)         # logits
        kv.mm(B, V, d, b=False, a=not fused_unembed)           # (softmax - onehot) W_U^T
        if not fused_unembed:
            kv.passes(B * V, e["logits"])
        if unembed_block_rows:
            kv.part.bytes += 2 * elem * d * V * -(-B // unembed_block_rows)
    update = Part("per-replica: SGLD update", False, bytes=4 * UPDATE_PASSES * len(layers) * (4 * d * dh + 3 * dh))
    shape = dict(n_layers=c["n_layers"], d_model=d, n_heads=H, d_head=dh, d_mlp=m, d_vocab=V, replicas=len(layers),
                 batch=N, context=T, precision=precision, attention=attention, unembedding=unembedding)
    return StepCost([lstar, shared, own, upper, unembed, update], shape)


def replica_layers(n_layers: int, n_heads: int, chains: int) -> List[int]:
    """The layer of each replica of an all-heads run: ``n_heads x chains`` replicas per layer."""
    return [l for l in range(n_layers) for _ in range(n_heads * chains)]


def projections(steps: int = 200, device: Mapping = H200) -> Dict[str, Dict[str, object]]:
    """Projected time per ``steps``-step checkpoint at the paper's shape (16 heads x 4 chains, context 1024)
    and Pythia-70m's (48 heads x 4 chains, context 512), batch 8 and 16, for today's computation
    ("materialized") and with fused attention and unembedding ("fused"), and in fp32 with the factored last layer
    the engine uses on CUDA (keys ending " factored"); every figure is a projection."""
    from .models import PAPER_CONFIG, PYTHIA_70M_CONFIG

    out = {}
    for name, cfg, context in (("paper", PAPER_CONFIG, 1024), ("pythia-70m", PYTHIA_70M_CONFIG, 512)):
        layers = replica_layers(cfg["n_layers"], cfg["n_heads"], 4)
        for batch in (8, 16):
            for kind in ("materialized", "fused"):
                for precision, last in [(p, "plain") for p in PRECISIONS] + [("fp32", "factored")]:
                    cost = step_cost(cfg, layers, batch, context, precision, attention=kind, unembedding=kind,
                                     last_layer=last)
                    key = f"{name} batch {batch} {kind} {precision}" + (" factored" if last == "factored" else "")
                    out[key] = {"tflop_per_step": cost.flops / 1e12, "gb_per_step": cost.bytes / 1e9,
                                "projected_seconds_per_checkpoint": steps * cost.seconds(device, precision)}
    return out


"""Many head-perturbed copies of a TransformerLens model, sharing everything below the head.

A *head replica* is the model at ``w*`` except that one unit of attention block ``l`` (a ``Unit``: ``head_of``
tells which component is which) has its own weights, packed in one row in the order of the component's slices
(``row_layout``; ``d = d_model``, ``dh = d_head``):

- ``"head"``, ``components.head`` without grouped-query attention: ``W_Q, W_K, W_V [d, dh]``, ``b_Q, b_K, b_V
  [dh]``, ``W_O [dh, d]`` (``4 d dh + 3 dh`` floats);
- ``"query"``, ``components.head`` under grouped-query attention (``cfg.n_key_value_heads``): query head ``h``'s
  ``W_Q [d, dh], b_Q [dh], W_O [dh, d]`` (``2 d dh + dh``); it reads its group's keys and values at ``w*``;
- ``"group"``, ``components.group``: key/value group ``G``'s ``W_K, W_V [d, dh]``, ``b_K, b_V [dh]`` (TransformerLens's
  ``_W_K[G]`` ...), then its ``k = n_heads / n_key_value_heads`` query heads' ``W_Q [k, d, dh], b_Q [k, dh],
  W_O [k, dh, d]`` (``2 d dh + 2 dh + k (2 d dh + dh)``).

For one token batch ``[N, T]``:

- ``shared(tokens)`` runs the model at ``w*`` once, up to the highest layer needed, and keeps for
  each needed layer the residual stream entering it, its heads' ``z`` and its attention output
  (and, for parallel attention/MLP blocks, its MLP output): this work is common to all replicas;
- ``replica_logits(shared, layer, heads, rows)`` computes, for ``R`` replicas of one layer, only
  their own query heads (batched matrix products over replicas), swaps them into the layer's shared
  attention output in place of the ``w*`` heads, and runs the layers above and the unembedding on
  ``[R*N, T, d_model]`` with the model's own modules (weights at ``w*``).

The model code knows nothing of SGLD; the batched engine supplies the rows and takes gradients
with respect to them only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import causal as causal_attention
from ..components import GROUP_KV_PARAMS, HEAD_PARAMS, QUERY_HEAD_PARAMS, Component, group, head, kv_groups

ATTENTION = ("sdpa", "materialized")
FACTORED_WORDS_PER_KV = 8
"""Float32 words per (own query-head dimension x vocabulary entry) a factored last-layer replica holds at its
peak (``final_logit_parts`` and ``unembed_loss._low_rank_rows``): ``M``, its ``w*`` counterpart, their
concatenation (two), the gradient ``d M`` and one block's product added to it, and what autograd keeps beside
them; about 7.2 measured on the meta device (tests/test_step_cost.py)."""
DEFAULT_ATTENTION = "sdpa"  # the engine's choice; "materialized" is kept as the checked alternative
_QK_NORM_ARCHITECTURES = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


def unsupported_reason(model: nn.Module) -> Optional[str]:
    """Why ``model`` cannot use the head-replica path (None when it can)."""
    try:
        from transformer_lens import HookedTransformer
        from transformer_lens.components.transformer_block import POST_NORM_ARCHITECTURES
    except ImportError:  # pragma: no cover - transformer_lens is a dependency
        return "transformer_lens is not installed"
    if not isinstance(model, HookedTransformer):
        return f"{type(model).__name__} is not a TransformerLens HookedTransformer"
    cfg = model.cfg
    checks = [
        (cfg.positional_embedding_type in ("standard", "shortformer", "rotary"),
         f"positional_embedding_type={cfg.positional_embedding_type!r}"),
        (getattr(cfg, "n_key_value_heads", None) is None or hasattr(model.blocks[0].attn, "_W_K"),
         "grouped-query attention without TransformerLens's shared _W_K/_W_V parameters"),
        (cfg.attention_dir == "causal", "bidirectional attention"),
        (getattr(cfg, "attn_types", None) is None, "local attention (attn_types)"),
        (not getattr(cfg, "use_attn_in", False) and not getattr(cfg, "use_split_qkv_input", False),
         "use_attn_in / use_split_qkv_input"),
        (not getattr(cfg, "use_normalization_before_and_after", False), "use_normalization_before_and_after"),
        (cfg.original_architecture not in POST_NORM_ARCHITECTURES, "post-norm blocks"),
        (cfg.original_architecture not in _QK_NORM_ARCHITECTURES and not getattr(cfg, "use_qk_norm", False),
         "q/k normalisation"),
        ((getattr(cfg, "attn_scores_soft_cap", -1.0) or -1.0) <= 0, "attention score soft cap"),
        (getattr(cfg, "clip_qkv", None) is None, "clip_qkv"),
        (not getattr(cfg, "use_logn_attn", False), "use_logn_attn"),
        (not getattr(cfg, "use_attention_sinks", False), "attention sinks"),
        (not getattr(cfg, "load_in_4bit", False), "4-bit weights"),
        ((getattr(cfg, "output_logits_soft_cap", -1.0) or -1.0) <= 0, "output logit soft cap"),
    ]
    for ok, what in checks:
        if not ok:
            return f"the head-replica path does not implement {what}"
    return None


KINDS = ("head", "query", "group")


class Unit(NamedTuple):
    """What a structured replica perturbs in attention block ``layer``: ``kind`` ``"head"`` (head ``index`` with
    its own keys and values), ``"query"`` (query head ``index`` under grouped-query attention) or ``"group"``
    (key/value group ``index`` and its query heads); the row layouts are ``row_layout``'s."""

    layer: int
    index: int
    kind: str = "head"


def heads_per_group(model: nn.Module) -> int:
    """Query heads per key/value group: ``n_heads / n_key_value_heads`` (1 without grouped-query attention)."""
    n_groups = kv_groups(model)
    return 1 if n_groups is None else model.cfg.n_heads // n_groups


def row_layout(model: nn.Module, kind: str) -> List[Tuple[str, Tuple[int, ...]]]:
    """``[(name, shape)]`` of a replica row of ``kind``, in the order of the component's slices (``HEAD_PARAMS``,
    ``QUERY_HEAD_PARAMS``, ``GROUP_KV_PARAMS`` then ``QUERY_HEAD_PARAMS``); names without TransformerLens's leading
    underscore (``_W_K`` is ``W_K``). ``head_of`` admits only components whose slices have exactly these shapes."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    d, dh = model.cfg.d_model, model.cfg.d_head
    one = {"W_Q": (d, dh), "W_K": (d, dh), "W_V": (d, dh), "b_Q": (dh,), "b_K": (dh,), "b_V": (dh,), "W_O": (dh, d)}
    if kind == "head":
        return [(p, one[p]) for p in HEAD_PARAMS]
    if kind == "query":
        return [(p, one[p]) for p in QUERY_HEAD_PARAMS]
    k = heads_per_group(model)
    return [(p.lstrip("_"), one[p.lstrip("_")]) for p in GROUP_KV_PARAMS] + [(p, (k,) + one[p]) for p in QUERY_HEAD_PARAMS]


def head_of(model: nn.Module, component: Component) -> Optional[Unit]:
    """The ``Unit`` that ``component`` is when it is exactly ``components.head(model, l, h)`` (kind ``"head"``, or
    ``"query"`` under grouped-query attention) or ``components.group(model, l, G)`` (``"group"``), biases
    included; otherwise None (the generic path takes it)."""
    sl = component.slices
    if not sl or len(sl[0].index) != 1 or not isinstance(sl[0].index[0], int):
        return None
    parts = sl[0].param.split(".")
    if len(parts) != 4 or parts[0] != "blocks" or not parts[1].isdigit() or parts[2] != "attn":
        return None
    layer, index = int(parts[1]), sl[0].index[0]
    gqa = kv_groups(model) is not None
    if parts[3] == "W_Q":
        kind, build = ("query" if gqa else "head"), head
    elif parts[3] == "_W_K" and gqa:
        kind, build = "group", group
    else:
        return None
    try:
        expected = build(model, layer, index)
    except ValueError:
        return None
    layout = row_layout(model, kind)
    if expected.slices != sl or len(sl) != len(layout):  # a model without attention biases: not this layout
        return None
    for s, (name, shape) in zip(sl, layout):
        if s.param.rsplit(".", 1)[1].lstrip("_") != name or s.numel != math.prod(shape):
            return None
    return Unit(layer, index, kind)


def _identity(params) -> tuple:
    """What a cache built from ``params`` is valid for: each one's object, storage and in-place write count (a
    parameter written to, or replaced by another tensor, gives another key)."""
    return tuple((id(p), p.data_ptr(), p._version) for p in params if p is not None)


def _has_hooks(module: nn.Module) -> bool:
    """Whether any submodule (HookPoints included) has forward/backward hooks attached."""
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in module.modules())


def norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a TransformerLens ``LayerNorm``, ``LayerNormPre``, ``RMSNorm`` or ``RMSNormPre``
    as one fused ``F.layer_norm`` / ``F.rms_norm`` (the same maths, float rounding apart: one kernel
    instead of about eight elementwise passes and their autograd nodes). A module of another class, one
    with hooks attached, or a model whose ``cfg.dtype`` is not float32/float64 (TransformerLens normalizes
    those in float32 and casts back) is called as it is."""
    from transformer_lens.components import LayerNorm, LayerNormPre, RMSNorm, RMSNormPre

    kind = type(module)
    if (kind not in (LayerNorm, LayerNormPre, RMSNorm, RMSNormPre) or x.dtype not in (torch.float32, torch.float64)
            or module.cfg.dtype not in (torch.float32, torch.float64) or _has_hooks(module)):
        return module(x)
    shape = (x.shape[-1],)
    if kind is LayerNorm:
        return F.layer_norm(x, shape, module.w, module.b, module.eps)
    if kind is LayerNormPre:
        return F.layer_norm(x, shape, None, None, module.eps)
    return F.rms_norm(x, shape, module.w if kind is RMSNorm else None, module.eps)


@dataclass
class SharedPass:
    """The ``w*`` computation of one token batch, shared by every replica (no autograd graph)."""

    tokens: torch.Tensor                      # [N, T]
    resid_pre: Dict[int, torch.Tensor]        # layer -> [N, T, d_model]
    z: Dict[int, torch.Tensor]                # layer -> [N, T, n_heads, d_head]
    attn_out: Dict[int, torch.Tensor]         # layer -> [N, T, d_model] (b_O included)
    mlp_out: Dict[int, torch.Tensor]          # layer -> [N, T, d_model] (parallel blocks only)
    pos_embed: Optional[torch.Tensor]         # [1, T, d_model] (shortformer only)


class OwnHeads(NamedTuple):
    """``R`` replicas of one layer on ``[N, T]`` tokens (``K = k d_head`` for ``k`` own query heads): their heads'
    output is ``z @ W_O`` (gradients flow to both), the ``w*`` heads they replace output ``z_star @ W_O_star``,
    and ``base = resid_post - z_star @ W_O_star`` is the layer's output stream without them."""

    z: torch.Tensor            # [R, N, T, K]
    W_O: torch.Tensor          # [R, K, d]
    z_star: torch.Tensor       # [R, N, T, K] (no gradient)
    W_O_star: torch.Tensor     # [R, K, d]
    base: torch.Tensor         # [R, N, T, d]
    resid_post: torch.Tensor   # [N, T, d]: the w* stream after the layer (b_O included)
    query_heads: torch.Tensor  # [R] or [R, k]: the query heads replaced


class LowRankLogits(NamedTuple):
    """``logits[r, m] = (resid_post[m] @ W + z[r, m] @ M[r] - z_star[r, m] @ M_star[r]) / scale[r, m] + bias``
    (``HeadReplicas.final_logit_parts``; ``scale`` None: 1)."""

    resid_post: torch.Tensor       # [M, d]: the w* stream after the last layer (no gradient)
    W: torch.Tensor                # [d, V]: W_U with the final norm folded in
    bias: torch.Tensor             # [V]
    z: torch.Tensor                # [R, M, K]
    M: torch.Tensor                # [R, K, V]: the own heads' W_O @ W
    z_star: torch.Tensor           # [R, M, K] (no gradient)
    M_star: torch.Tensor           # [R, K, V] (no gradient)
    scale: Optional[torch.Tensor]  # [R, M]


class HeadReplicas:
    """Per-replica logits of head-perturbed copies of one ``HookedTransformer``."""

    def __init__(self, model: nn.Module, attention: Optional[str] = None):
        """attention: ``DEFAULT_ATTENTION`` when None; ``"sdpa"`` (``attention.causal``: the CPU kernel or SDPA, causal, for the replica's own head and
        for every layer above it that has no hooks attached) or ``"materialized"`` (full ``[.., T, T]``
        scores, and TransformerLens's own blocks above)."""
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(reason)
        attention = DEFAULT_ATTENTION if attention is None else attention
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        self.model = model
        self.sdpa = attention == "sdpa"
        self._fused: Dict[tuple, Tuple[torch.Tensor, ...]] = {}
        self.cfg = model.cfg
        self.n_groups = kv_groups(model)                  # None without grouped-query attention
        self.per_group = heads_per_group(model)
        self.kinds = ("head",) if self.n_groups is None else ("query", "group")
        self.kind = self.kinds[0]                         # what components.head is on this model
        self.layouts = {k: row_layout(model, k) for k in self.kinds}
        self.shapes = [shape for _, shape in self.layouts[self.kind]]
        self.offsets = self._offsets(self.kind)
        self.numel = self.offsets[-1]

    def _offsets(self, kind: str) -> List[int]:
        sizes = [math.prod(shape) for _, shape in self.layouts[kind]]
        return [sum(sizes[:i]) for i in range(len(sizes) + 1)]

    def numel_of(self, kind: Optional[str] = None) -> int:
        """Floats in a replica row of ``kind`` (default: ``self.kind``, a head)."""
        return self._offsets(self._kind(kind))[-1]

    def _kind(self, kind: Optional[str]) -> str:
        kind = self.kind if kind is None else kind
        if kind not in self.kinds:
            raise ValueError(f"kind {kind!r} is not a replica kind of this model: {self.kinds}")
        return kind

    @torch.no_grad()
    def shared(self, tokens: torch.Tensor, layers: Sequence[int]) -> SharedPass:
        """Run the model at ``w*`` on ``tokens [N, T]`` up to ``max(layers)`` and keep what replicas share."""
        layers = sorted(set(layers))
        if self.sdpa and not _has_hooks(self.model):
            fast = self._shared_sdpa(tokens, layers)
            if fast is not None:
                return fast
        names = set()
        for l in layers:
            names |= {f"blocks.{l}.hook_resid_pre", f"blocks.{l}.attn.hook_z", f"blocks.{l}.hook_attn_out"}
            if self.cfg.parallel_attn_mlp and not self.cfg.attn_only:
                names.add(f"blocks.{l}.hook_mlp_out")
        shortformer = self.cfg.positional_embedding_type == "shortformer"
        if shortformer:
            names.add("hook_pos_embed")
        _, cache = self.model.run_with_cache(
            tokens, names_filter=lambda n: n in names, stop_at_layer=layers[-1] + 1, return_type=None
        )
        return SharedPass(
            tokens=tokens,
            resid_pre={l: cache[f"blocks.{l}.hook_resid_pre"] for l in layers},
            z={l: cache[f"blocks.{l}.attn.hook_z"] for l in layers},
            attn_out={l: cache[f"blocks.{l}.hook_attn_out"] for l in layers},
            mlp_out={l: cache[f"blocks.{l}.hook_mlp_out"] for l in layers if f"blocks.{l}.hook_mlp_out" in names},
            pos_embed=cache["hook_pos_embed"][:1] if shortformer else None,
        )

    def unpack(self, rows: torch.Tensor, kind: Optional[str] = None) -> List[torch.Tensor]:
        """Views ``[R, *shape]`` of the parts of ``rows [R, numel]`` in ``row_layout`` order (for kind ``"head"``:
        ``W_Q, W_K, W_V [R, d_model, d_head]``, ``b_Q, b_K, b_V [R, d_head]``, ``W_O [R, d_head, d_model]``)."""
        kind = self._kind(kind)
        R, o = rows.shape[0], self._offsets(kind)
        return [rows[:, o[i] : o[i + 1]].reshape(R, *shape) for i, (_, shape) in enumerate(self.layouts[kind])]

    def replica_logits(
        self, shared: SharedPass, layer: int, heads: torch.Tensor, rows: torch.Tensor, kind: Optional[str] = None
    ) -> torch.Tensor:
        """Logits ``[R, N, T, d_vocab]`` of ``R`` replicas of ``layer`` (the plain form, for checks).

        heads: ``[R]`` (long) head index of each replica (group index for kind ``"group"``); rows:
        ``[R, numel_of(kind)]`` packed weights (gradients flow to ``rows`` only).
        """
        x = self.replica_features(shared, layer, heads, rows, drop_last=False, kind=kind)
        return self.model.unembed(x.flatten(0, 1)).view(*x.shape[:3], -1)

    def replica_features(
        self, shared: SharedPass, layer: int, heads: torch.Tensor, rows: torch.Tensor, drop_last: bool = True,
        kind: Optional[str] = None,
    ) -> torch.Tensor:
        """The final residual stream after the last norm, ``[R, N, T', d_model]``, of ``R`` replicas of
        ``layer``; the unembedding of it gives the logits. With ``drop_last`` the last position is left
        out (``T' = T - 1``): no next-token loss uses its prediction, and under causal attention no other
        position depends on it. heads: ``[R]`` (long) head index (group index for kind ``"group"``); rows:
        ``[R, numel_of(kind)]`` packed as ``row_layout(model, kind)``; kind: default ``self.kind``.
        """
        model, cfg = self.model, self.cfg
        own = self._own_heads(shared, layer, heads, rows, drop_last, kind)
        R, N, T, d = own.base.shape
        pos = shared.pos_embed[:, :T] if shared.pos_embed is not None else None
        block = model.blocks[layer]
        own_out = torch.einsum("rntk,rkd->rntd", own.z, own.W_O)
        resid = own_out.add_(own.base).reshape(R * N, T, d)  # in place: the product's backward does not read its output
        if not cfg.attn_only and not cfg.parallel_attn_mlp:
            resid = resid + block.mlp(norm(block.ln2, resid))
        for upper in model.blocks[layer + 1 :]:
            if self.sdpa and not _has_hooks(upper):
                resid = self._block_sdpa(upper, resid, pos)
            else:  # TransformerLens's own block (materialized attention; runs any hooks attached to it)
                resid = upper(resid, shortformer_pos_embed=pos) if pos is not None else upper(resid)
        if cfg.normalization_type is not None:
            resid = norm(model.ln_final, resid)
        return resid.view(R, N, T, d)

    def low_rank_reason(self, layer: int) -> Optional[str]:
        """Why replicas of ``layer`` cannot take ``final_logit_parts`` (None when they can): the layer must be the
        last, its output must reach the final norm unchanged (attention-only or parallel attention/MLP blocks),
        and the final norm one of TransformerLens's LayerNorm, LayerNormPre, RMSNorm or RMSNormPre (or none),
        float32 or float64, without hooks."""
        from transformer_lens.components import LayerNorm, LayerNormPre, RMSNorm, RMSNormPre

        cfg = self.cfg
        if layer != cfg.n_layers - 1:
            return "not the last layer"
        if not cfg.attn_only and not cfg.parallel_attn_mlp:
            return "the last layer's MLP reads its attention output"
        if cfg.dtype != torch.float32:  # the factored products are float32 (the plain path's logits are too)
            return f"model dtype {cfg.dtype}"
        if cfg.normalization_type is not None:
            ln = self.model.ln_final
            if type(ln) not in (LayerNorm, LayerNormPre, RMSNorm, RMSNormPre) or _has_hooks(ln):
                return f"final norm {type(ln).__name__}"
        if _has_hooks(self.model.unembed):
            return "hooks on the unembedding"
        return None

    def folded_unembed(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(W [d, V], bias [V])`` with ``norm(r) @ W_U + b_U == (r @ W) / scale(r) + bias`` for the final norm
        (``final_scale``): ``W = diag(w) W_U``, centred over ``d`` for a LayerNorm (``c(r) @ A == r @ (A -
        mean_d A)``), and ``bias = b @ W_U + b_U``; cached (rebuilt if a weight is written to)."""
        from transformer_lens.components import LayerNorm, LayerNormPre

        unembed, cfg = self.model.unembed, self.cfg
        ln = self.model.ln_final if cfg.normalization_type is not None else None
        params = [unembed.W_U, unembed.b_U] + ([ln.w, ln.b] if isinstance(ln, LayerNorm) else
                                                [ln.w] if ln is not None and hasattr(ln, "w") else [])
        key = ("unembed",) + _identity(params)
        if key not in self._fused:
            self._fused = {k: v for k, v in self._fused.items() if k[0] != "unembed"}
            W = unembed.W_U.detach().float()
            bias = unembed.b_U.detach().float() if unembed.b_U is not None else torch.zeros(W.shape[1], device=W.device)
            if ln is not None and hasattr(ln, "w"):
                W = ln.w.detach().float()[:, None] * W
            if isinstance(ln, LayerNorm):
                bias = bias + ln.b.detach().float() @ unembed.W_U.detach().float()
            if isinstance(ln, (LayerNorm, LayerNormPre)):
                W = W - W.mean(0, keepdim=True)
            self._fused[key] = (W, bias)
        return self._fused[key]

    def final_scale(self, resid: torch.Tensor) -> Optional[torch.Tensor]:
        """``[...]`` the final norm's divisor of ``resid [..., d]`` (``sqrt(var + eps)`` for a LayerNorm, ``sqrt(mean
        of squares + eps)`` for an RMSNorm); None without a final norm."""
        from transformer_lens.components import LayerNorm, LayerNormPre

        if self.cfg.normalization_type is None:
            return None
        ln = self.model.ln_final
        if isinstance(ln, (LayerNorm, LayerNormPre)):
            return (resid.var(-1, unbiased=False) + ln.eps).sqrt()
        return (resid.pow(2).mean(-1) + ln.eps).sqrt()

    def final_logit_parts(self, shared: SharedPass, layer: int, heads: torch.Tensor, rows: torch.Tensor,
                          kind: Optional[str] = None) -> "LowRankLogits":
        """The logits of ``R`` replicas of the last layer (``low_rank_reason(layer)`` None) in factored form, over
        the ``M = N (T - 1)`` predicted positions: with ``A = resid_post @ W`` shared by all replicas,
        ``logits_r = (A + z_r @ (W_O_r W) - z*_r @ (W_O*_r W)) / scale_r + bias`` (``folded_unembed``): each
        replica's own part is a product of inner size ``K = k d_head`` instead of ``d_model``. Gradients flow to
        ``rows`` through ``z``, ``M`` and ``scale``."""
        own = self._own_heads(shared, layer, heads, rows, True, kind)
        R, N, P, d = own.base.shape
        W, bias = self.folded_unembed()
        scale = None
        if self.cfg.normalization_type is not None:  # the norm's divisor of the replicas' final streams
            scale = self.final_scale(own.base + torch.einsum("rntk,rkd->rntd", own.z, own.W_O))
        K = own.z.shape[-1]
        return LowRankLogits(
            resid_post=own.resid_post.reshape(N * P, d), W=W, bias=bias,
            z=own.z.reshape(R, N * P, K), M=own.W_O @ W,
            z_star=own.z_star.reshape(R, N * P, K), M_star=self._minus_head_unembed(layer)[own.query_heads].view(R, K, -1),
            scale=None if scale is None else scale.reshape(R, N * P))

    def _minus_head_unembed(self, layer: int) -> torch.Tensor:
        """``-W_O[h] @ W`` of every head of ``layer`` at ``w*`` (``folded_unembed``'s ``W``), ``[n_heads, d_head, V]``;
        cached under ``W_O``'s identity and that of every weight ``W`` is folded from (rebuilt if one is written to
        or replaced)."""
        W, _ = self.folded_unembed()
        W_O = self.model.blocks[layer].attn.W_O
        folded = next(k for k in self._fused if k[0] == "unembed")  # the key W was built under
        key = ("head_unembed", layer) + _identity([W_O]) + folded
        if key not in self._fused:
            self._fused = {k: v for k, v in self._fused.items() if k[:2] != ("head_unembed", layer)}
            self._fused[key] = (W_O.detach() @ W).neg_()
        return self._fused[key]

    def _own_heads(self, shared: SharedPass, layer: int, heads: torch.Tensor, rows: torch.Tensor, drop_last: bool,
                   kind: Optional[str]) -> "OwnHeads":
        """The replicas' own query heads and what they are added to (``OwnHeads``): everything of ``layer``'s
        output but the replicas' own heads is at ``w*``."""
        cfg = self.cfg
        kind = self._kind(kind)
        block = self.model.blocks[layer]
        attn = block.attn
        P = shared.tokens.shape[1] - (1 if drop_last else 0)
        resid_pre = shared.resid_pre[layer][:, :P]                  # [N, P, d]
        N, T, d = resid_pre.shape
        R = rows.shape[0]
        pos = shared.pos_embed[:, :P] if shared.pos_embed is not None else None
        with torch.no_grad():
            x = norm(block.ln1, resid_pre)                          # value input [N, T, d]
            xqk = x + pos if pos is not None else x
        if kind == "head":
            z, W_O = self._own_head(attn, x, xqk, pos, rows)        # [R, N, T, d_head], [R, d_head, d]
            query_heads = heads                                     # [R]
        else:
            z, W_O, query_heads = self._own_queries(block, x, xqk, heads, rows, kind)  # [R, N, T, k d_head], ...
        with torch.no_grad():  # the layer's output with the w* heads taken out, per replica's heads
            z_star = shared.z[layer][:, :P, query_heads]            # [N, T, R, (k,) d_head]
            z_star = z_star.movedim(2, 0).reshape(R, N, T, -1)      # [R, N, T, K]
            W_O_star = attn.W_O[query_heads].reshape(R, -1, d)      # [R, K, d]
            resid_post = shared.attn_out[layer][:, :P] + resid_pre  # the w* stream after the layer [N, T, d]
            if not cfg.attn_only and cfg.parallel_attn_mlp:
                resid_post = resid_post + shared.mlp_out[layer][:, :P]
            base = torch.einsum("rntk,rkd->rntd", z_star, W_O_star).neg_().add_(resid_post)  # [R, N, T, d]
        return OwnHeads(z, W_O, z_star, W_O_star, base, resid_post, query_heads)

    def _own_head(self, attn, x, xqk, pos, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(z [R, N, T, d_head], W_O [R, d_head, d])`` of each replica's own head with its own keys and values
        (kind ``"head"``), from ``rows [R, numel]`` packed ``W_Q, W_K, W_V, b_Q, b_K, b_V, W_O``; its output
        (``b_O`` left out) is ``z @ W_O``."""
        R, d = rows.shape[0], x.shape[-1]
        o = self.offsets
        W_QKV = rows[:, : o[3]].reshape(R, 3, d, -1).to(x.dtype)   # W_Q, W_K, W_V [R, 3, d, d_head]
        b_QKV = rows[:, o[3] : o[6]].reshape(R, 3, 1, 1, -1).to(x.dtype).transpose(0, 1)  # [3, R, 1, 1, d_head]
        W_O = rows[:, o[6] :].reshape(R, -1, d).to(x.dtype)        # [R, d_head, d]
        # own head: q, k, v [R, N, T, d_head], in one product where Q, K and V read the same input
        if pos is None:
            q, k, v = (torch.einsum("ntd,rcde->crnte", x, W_QKV) + b_QKV).unbind(0)
        else:
            q, k = (torch.einsum("ntd,rcde->crnte", xqk, W_QKV[:, :2]) + b_QKV[:2]).unbind(0)
            v = torch.einsum("ntd,rde->rnte", x, W_QKV[:, 2]) + b_QKV[2]
        if self.cfg.positional_embedding_type == "rotary":  # rotary acts per position: replicas as heads
            q = attn.apply_rotary(q.permute(1, 2, 0, 3)).permute(2, 0, 1, 3)
            k = attn.apply_rotary(k.permute(1, 2, 0, 3)).permute(2, 0, 1, 3)
        return self._attend(attn, q, k, v), W_O                      # [R, N, T, d_head], [R, d_head, d]

    def _own_queries(self, block, x, xqk, heads: torch.Tensor, rows: torch.Tensor, kind: str
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Under grouped-query attention: ``(z [R, N, T, k d_head], W_O [R, k d_head, d], query head indices
        [R, k])`` of each replica's own query heads (their output, ``b_O`` left out, is ``z @ W_O``). Kind ``"query"`` (``k = 1``): query head ``heads[r]`` with its group's keys and
        values at ``w*``; kind ``"group"`` (``k = n_heads / n_key_value_heads``): group ``heads[r]``'s own keys and
        values and its query heads."""
        attn, cfg = block.attn, self.cfg
        R, (N, T, d), k = rows.shape[0], x.shape, (1 if kind == "query" else self.per_group)
        parts = dict(zip((n for n, _ in self.layouts[kind]), (p.to(x.dtype) for p in self.unpack(rows, kind))))
        W_Q = parts["W_Q"].reshape(R, k, d, -1)                     # [R, k, d, d_head]
        b_Q = parts["b_Q"].reshape(R, k, -1)                        # [R, k, d_head]
        W_O = parts["W_O"].reshape(R, k, -1, d)                     # [R, k, d_head, d]
        rotary = cfg.positional_embedding_type == "rotary"
        if kind == "query":
            query_heads = heads[:, None]
            with torch.no_grad():  # the group's keys and values at w*, [R, N, T, d_head]
                W_qk, b_qk, W_v, b_v = self._fused_weights(block)[:4]
                H = cfg.n_heads * cfg.d_head
                keys = F.linear(xqk, W_qk[H:], b_qk[H:]).view(N, T, self.n_groups, -1)
                if rotary:
                    keys = attn.apply_rotary(keys)
                values = F.linear(x, W_v, b_v).view(N, T, self.n_groups, -1)
                groups = heads // self.per_group
                key = keys[:, :, groups].permute(2, 0, 1, 3)
                value = values[:, :, groups].permute(2, 0, 1, 3)
        else:
            query_heads = heads[:, None] * k + torch.arange(k, device=heads.device)
            key = torch.einsum("ntd,rde->rnte", xqk, parts["W_K"]) + parts["b_K"][:, None, None]
            value = torch.einsum("ntd,rde->rnte", x, parts["W_V"]) + parts["b_V"][:, None, None]
            if rotary:
                key = attn.apply_rotary(key.permute(1, 2, 0, 3)).permute(2, 0, 1, 3)
        q = torch.einsum("ntd,rjde->rnjte", xqk, W_Q) + b_Q[:, None, :, None]        # [R, N, k, T, d_head]
        if rotary:  # rotary acts per position: replicas and their query heads as heads
            q = attn.apply_rotary(q.permute(1, 3, 0, 2, 4).reshape(N, T, R * k, -1))
            q = q.view(N, T, R, k, -1).permute(2, 0, 3, 1, 4)
        if k > 1:  # each query head reads the group's keys and values: [R, N*k, T, d_head] for the attention
            key = key[:, :, None].expand(R, N, k, T, -1).reshape(R, N * k, T, -1)
            value = value[:, :, None].expand(R, N, k, T, -1).reshape(R, N * k, T, -1)
        z = self._attend(attn, q.reshape(R, N * k, T, -1), key, value).view(R, N, k, T, -1)
        return z.transpose(2, 3).reshape(R, N, T, -1), W_O.reshape(R, -1, d), query_heads

    def _attend(self, attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention ``z [B, H, T, d_head]`` of ``q, k, v [B, H, T, d_head]`` with ``attn``'s scale
        (``attention.causal``: the CPU kernel or SDPA; or materialized scores)."""
        if self.sdpa:  # the scores never exist whole
            return causal_attention(q, k, v, 1.0 / attn.attn_scale)
        T = q.shape[-2]
        scores = q @ k.transpose(-1, -2) / attn.attn_scale           # [B, H, T, T]
        causal = torch.ones(T, T, dtype=torch.bool, device=scores.device).triu(1)
        pattern = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
        return pattern.to(v.dtype) @ v

    def _fused_weights(self, block) -> Tuple[torch.Tensor, ...]:
        """Block ``block``'s ``w*`` projections as ``F.linear`` weights: Q and K stacked ``[(H + G)*dh, d]`` (with
        biases), V ``[G*dh, d]``, O ``[d, H*dh]``, where ``G`` is the number of key/value heads (``H`` without
        grouped-query attention); cached: the layers above a head stay at ``w*``."""
        a = block.attn
        kv = (a._W_K, a._W_V, a._b_K, a._b_V) if self.n_groups is not None else (a.W_K, a.W_V, a.b_K, a.b_V)
        params = (a.W_Q, kv[0], kv[1], a.b_Q, kv[2], kv[3], a.W_O, a.b_O)
        key = (id(block),) + _identity(params)  # rebuilt if a weight was written to or replaced
        if key not in self._fused:
            self._fused = {k: v for k, v in self._fused.items() if k[0] != id(block)}
            W_Q, W_K, W_V, b_Q, b_K, b_V, W_O, b_O = (p.detach() for p in params)
            d = W_Q.shape[1]
            w = lambda W: W.permute(0, 2, 1).reshape(-1, d)  # noqa: E731  [heads, d, dh] -> [heads*dh, d]
            self._fused[key] = (torch.cat([w(W_Q), w(W_K)]), torch.cat([b_Q.reshape(-1), b_K.reshape(-1)]),
                                w(W_V), b_V.reshape(-1), W_O.permute(2, 0, 1).reshape(d, -1), b_O)
        return self._fused[key]

    def _block_sdpa(self, block, resid: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
        """TransformerLens's pre-norm block at ``w*`` on ``resid [B, T, d]`` with causal SDPA attention
        (the maths of ``TransformerBlock.forward`` for the configurations ``unsupported_reason`` admits)."""
        return self._block_parts(block, resid, pos)[3]

    def _block_parts(self, block, resid: torch.Tensor, pos: Optional[torch.Tensor]):
        """``(z [B, T, H, dh], attn_out [B, T, d] (b_O included), mlp_out or None, resid_post)`` of
        ``block`` at ``w*`` on ``resid [B, T, d]`` (SDPA attention; under grouped-query attention query head
        ``h`` reads key/value head ``h // (H / G)``, as TransformerLens's ``repeat_interleave``)."""
        cfg, attn = self.cfg, block.attn
        W_qk, b_qk, W_v, b_v, W_o, b_o = self._fused_weights(block)
        B, T, d = resid.shape
        H, dh = cfg.n_heads, cfg.d_head
        G = H if self.n_groups is None else self.n_groups
        x = norm(block.ln1, resid)
        xqk = x + pos if pos is not None else x
        qk = F.linear(xqk, W_qk, b_qk)
        if G == H:
            q, k = qk.view(B, T, 2, H, dh).unbind(2)
        else:
            q, k = qk.split([H * dh, G * dh], dim=-1)
            q, k = q.view(B, T, H, dh), k.view(B, T, G, dh)
        v = F.linear(x, W_v, b_v).view(B, T, G, dh)
        if cfg.positional_embedding_type == "rotary":
            q, k = attn.apply_rotary(q), attn.apply_rotary(k)
        if G != H:
            k, v = k.repeat_interleave(H // G, dim=2), v.repeat_interleave(H // G, dim=2)
        z = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 1.0 / attn.attn_scale
                             ).transpose(1, 2)
        attn_out = F.linear(z.reshape(B, T, H * dh), W_o, b_o)
        out = resid + attn_out
        mlp_out = None
        if not cfg.attn_only:
            mlp_out = block.mlp(norm(block.ln2, resid if cfg.parallel_attn_mlp else out))
            out = out + mlp_out
        return z, attn_out, mlp_out, out

    @torch.no_grad()
    def final_features(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """The final residual stream after the last norm at ``w*``, ``[N, T-1, d_model]`` (the last position,
        which predicts nothing, left out), by the blocks and norms the replicas use (``l(w*)`` paired with
        their ``l(w_t)``); None where ``shared`` would take TransformerLens's own forward (``"materialized"``
        attention, hooks attached, or an input that needs an attention mask)."""
        if not self.sdpa or _has_hooks(self.model):
            return None
        run = self._sdpa_blocks(tokens, [], self.cfg.n_layers - 1)
        if run is None:
            return None
        resid = run[1][:, :-1]
        return norm(self.model.ln_final, resid) if self.cfg.normalization_type is not None else resid

    def _shared_sdpa(self, tokens: torch.Tensor, layers: List[int]) -> Optional[SharedPass]:
        """``shared`` with SDPA blocks (None when the model's input needs an attention mask)."""
        run = self._sdpa_blocks(tokens, layers, layers[-1])
        return None if run is None else run[0]

    @torch.no_grad()
    def _sdpa_blocks(self, tokens: torch.Tensor, layers: List[int], last: int
                     ) -> Optional[Tuple[SharedPass, torch.Tensor]]:
        """Blocks ``0 .. last`` at ``w*`` with SDPA attention: ``(what replicas of `layers` share, the residual
        stream after block `last` [N, T, d])``; None when the model's input needs an attention mask."""
        resid, _, pos, mask = self.model.input_to_embed(tokens)
        if mask is not None:
            return None
        out = SharedPass(tokens=tokens, resid_pre={}, z={}, attn_out={}, mlp_out={},
                         pos_embed=pos[:1] if pos is not None else None)
        for l in range(last + 1):
            z, attn_out, mlp_out, post = self._block_parts(self.model.blocks[l], resid, pos)
            if l in layers:
                out.resid_pre[l], out.z[l], out.attn_out[l] = resid, z, attn_out
                if mlp_out is not None and self.cfg.parallel_attn_mlp:
                    out.mlp_out[l] = mlp_out
            resid = post
        return out, resid

    def bytes_per_replica(self, N: int, T: int, layer: int, kind: Optional[str] = None) -> int:
        """Upper bound on the autograd memory (bytes, peak) of one replica of ``layer`` and ``kind`` (default
        ``self.kind``) on ``[N, T]`` tokens: its own query heads, the saved activations of the layers above and
        the features and their gradient (the unembedding's row blocks come on top, once per chunk:
        ``rllc_fast.engine.unembed_loss``).

        Per token, in float32 words, with ``k`` own query heads (1; ``n_heads / n_key_value_heads`` for a group)
        and ``m = 2 d_mlp`` (``3 d_mlp`` for a gated MLP; 0 attention-only): ``16 d_model + (4 + 4 k) d_head`` for
        the own heads and the final features, ``8 k d_head`` more for a group's keys and values read by its ``k``
        query heads, ``4 d_model + m`` for the own layer's MLP in a sequential block (plus ``4 k T`` with
        materialized scores); and per layer above ``4 d_model + 2 n_heads d_head + m`` (``4 n_heads d_head``
        under grouped-query attention: the keys and values repeated per query head; plus ``5 n_heads T`` with
        materialized scores); for the last layer's replicas where the factored logits may be used
        (``low_rank_reason``), ``FACTORED_WORDS_PER_KV * k d_head * vocab`` more, whatever the tokens. Checked
        against the peak of live tensors on the meta device
        (tests/test_step_cost.py) at the paper's and Pythia-70m's shapes and on a Llama-style model with and
        without grouped-query attention, with attention as CUDA's fused kernel."""
        cfg = self.cfg
        kind = self._kind(kind)
        k = self.per_group if kind == "group" else 1
        above = cfg.n_layers - layer - 1
        scores = 0 if self.sdpa else 1
        mlp = 0 if cfg.attn_only else (3 if cfg.gated_mlp else 2) * (cfg.d_mlp or 0)
        qkv = (2 if self.n_groups is None else 4) * cfg.n_heads * cfg.d_head  # + the repeated keys and values
        per_layer = 4 * cfg.d_model + qkv + 5 * scores * cfg.n_heads * T + mlp
        own = (4 + 4 * k + (8 * k if kind == "group" else 0)) * cfg.d_head + 4 * scores * k * T
        if not cfg.attn_only and not cfg.parallel_attn_mlp:  # the own layer's MLP runs per replica
            own += 4 * cfg.d_model + mlp
        per_token = 16 * cfg.d_model + own + above * per_layer
        factored = 0
        if self.low_rank_reason(layer) is None:  # final_logit_parts: M, M*, their concatenation, d M and a temporary
            factored = FACTORED_WORDS_PER_KV * k * cfg.d_head * cfg.d_vocab
        return 4 * (N * T * per_token + factored)

"""Many head-perturbed copies of a TransformerLens model, sharing everything below the head.

A *head replica* is the model at ``w*`` except that head ``h`` of layer ``l`` has its own weights
``W_Q, W_K, W_V [d_model, d_head]``, ``b_Q, b_K, b_V [d_head]``, ``W_O [d_head, d_model]``, packed
in that order in one row of ``n = 4*d_model*d_head + 3*d_head`` floats (the order of
``components.head``). For one token batch ``[N, T]``:

- ``shared(tokens)`` runs the model at ``w*`` once, up to the highest layer needed, and keeps for
  each needed layer the residual stream entering it, its heads' ``z`` and its attention output
  (and, for parallel attention/MLP blocks, its MLP output): this work is common to all replicas;
- ``replica_logits(shared, layer, heads, rows)`` computes, for ``R`` replicas of one layer, only
  their own heads (batched matrix products over replicas), swaps each into the layer's shared
  attention output in place of the ``w*`` head, and runs the layers above and the unembedding on
  ``[R*N, T, d_model]`` with the model's own modules (weights at ``w*``).

The model code knows nothing of SGLD; the batched engine supplies the rows and takes gradients
with respect to them only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..components import HEAD_PARAMS, Component

ATTENTION = ("sdpa", "materialized")
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
        (getattr(cfg, "n_key_value_heads", None) is None, "grouped-query attention"),
        (cfg.attention_dir == "causal", "bidirectional attention"),
        (getattr(cfg, "attn_types", None) is None, "local attention (attn_types)"),
        (not getattr(cfg, "use_attn_in", False) and not getattr(cfg, "use_split_qkv_input", False),
         "use_attn_in / use_split_qkv_input"),
        (not getattr(cfg, "use_normalization_before_and_after", False), "use_normalization_before_and_after"),
        (cfg.original_architecture not in POST_NORM_ARCHITECTURES, "post-norm blocks"),
        (cfg.original_architecture not in _QK_NORM_ARCHITECTURES, "q/k normalisation"),
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


def head_of(model: nn.Module, component: Component) -> Optional[Tuple[int, int]]:
    """``(layer, head)`` when ``component`` is exactly ``components.head(model, layer, head)``
    with all seven slices (biases included); otherwise None."""
    sl = component.slices
    if len(sl) != len(HEAD_PARAMS) or any(len(s.index) != 1 or not isinstance(s.index[0], int) for s in sl):
        return None
    h = sl[0].index[0]
    first = sl[0].param
    if not (first.startswith("blocks.") and first.endswith(".attn.W_Q")):
        return None
    layer = first.split(".")[1]
    if not layer.isdigit():
        return None
    expected = [f"blocks.{layer}.attn.{p}" for p in HEAD_PARAMS]
    if [s.param for s in sl] != expected or any(s.index[0] != h for s in sl):
        return None
    return int(layer), h


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


class HeadReplicas:
    """Per-replica logits of head-perturbed copies of one ``HookedTransformer``."""

    def __init__(self, model: nn.Module, attention: Optional[str] = None):
        """attention: ``DEFAULT_ATTENTION`` when None; ``"sdpa"`` (``scaled_dot_product_attention``, causal: for the replica's own head and
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
        cfg = model.cfg
        self.cfg = cfg
        d, dh = cfg.d_model, cfg.d_head
        sizes = [d * dh, d * dh, d * dh, dh, dh, dh, dh * d]
        self.shapes = [(d, dh), (d, dh), (d, dh), (dh,), (dh,), (dh,), (dh, d)]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self.numel = self.offsets[-1]

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

    def unpack(self, rows: torch.Tensor):
        """Views ``W_Q, W_K, W_V [R, d_model, d_head]``, ``b_Q, b_K, b_V [R, d_head]``, ``W_O [R, d_head, d_model]``."""
        R = rows.shape[0]
        o = self.offsets
        return [rows[:, o[i] : o[i + 1]].reshape(R, *shape) for i, shape in enumerate(self.shapes)]

    def replica_logits(
        self, shared: SharedPass, layer: int, heads: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """Logits ``[R, N, T, d_vocab]`` of ``R`` replicas of ``layer`` (the plain form, for checks).

        heads: ``[R]`` (long) head index of each replica; rows: ``[R, numel]`` packed head weights
        (gradients flow to ``rows`` only).
        """
        x = self.replica_features(shared, layer, heads, rows, drop_last=False)
        return self.model.unembed(x.flatten(0, 1)).view(*x.shape[:3], -1)

    def replica_features(
        self, shared: SharedPass, layer: int, heads: torch.Tensor, rows: torch.Tensor, drop_last: bool = True
    ) -> torch.Tensor:
        """The final residual stream after the last norm, ``[R, N, T', d_model]``, of ``R`` replicas of
        ``layer``; the unembedding of it gives the logits. With ``drop_last`` the last position is left
        out (``T' = T - 1``): no next-token loss uses its prediction, and under causal attention no other
        position depends on it.
        """
        model, cfg = self.model, self.cfg
        block = model.blocks[layer]
        attn = block.attn
        R = rows.shape[0]
        P = shared.tokens.shape[1] - (1 if drop_last else 0)
        resid_pre = shared.resid_pre[layer][:, :P]                  # [N, P, d]
        N, T, d = resid_pre.shape
        pos = shared.pos_embed[:, :P] if shared.pos_embed is not None else None
        o = self.offsets
        W_QKV = rows[:, : o[3]].reshape(R, 3, d, -1).to(resid_pre.dtype)   # W_Q, W_K, W_V [R, 3, d, d_head]
        b_QKV = rows[:, o[3] : o[6]].reshape(R, 3, 1, 1, -1).to(resid_pre.dtype).transpose(0, 1)  # [3, R, 1, 1, d_head]
        W_O = rows[:, o[6] :].reshape(R, -1, d).to(resid_pre.dtype)        # [R, d_head, d]

        with torch.no_grad():
            x = norm(block.ln1, resid_pre)                          # value input [N, T, d]
            xqk = x + pos if pos is not None else x
        # own head: q, k, v [R, N, T, d_head], in one product where Q, K and V read the same input
        if pos is None:
            q, k, v = (torch.einsum("ntd,rcde->crnte", x, W_QKV) + b_QKV).unbind(0)
        else:
            q, k = (torch.einsum("ntd,rcde->crnte", xqk, W_QKV[:, :2]) + b_QKV[:2]).unbind(0)
            v = torch.einsum("ntd,rde->rnte", x, W_QKV[:, 2]) + b_QKV[2]
        if cfg.positional_embedding_type == "rotary":  # rotary acts per position: replicas as heads
            q = attn.apply_rotary(q.permute(1, 2, 0, 3)).permute(2, 0, 1, 3)
            k = attn.apply_rotary(k.permute(1, 2, 0, 3)).permute(2, 0, 1, 3)
        if self.sdpa:  # [R, N] as SDPA's batch dims; the scores never exist whole
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / attn.attn_scale)
        else:
            scores = q @ k.transpose(-1, -2) / attn.attn_scale       # [R, N, T, T]
            causal = torch.ones(T, T, dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
            pattern = torch.softmax(scores, dim=-1)
            z = pattern.to(v.dtype) @ v                              # [R, N, T, d_head]
        own_out = torch.einsum("rnte,red->rntd", z, W_O)             # [R, N, T, d]

        with torch.no_grad():  # the layer's output with the w* head taken out, per replica's head
            z_star = shared.z[layer][:, :P, heads]                   # [N, T, R, d_head]
            base = torch.einsum("ntre,red->rntd", z_star, attn.W_O[heads]).neg_()     # - the w* head's output
            base.add_(shared.attn_out[layer][:, :P] + resid_pre)                      # [R, N, T, d]
            if not cfg.attn_only and cfg.parallel_attn_mlp:
                base.add_(shared.mlp_out[layer][:, :P])
        resid = own_out.add_(base).reshape(R * N, T, d)  # in place: the product's backward does not read its output
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

    def _fused_weights(self, block) -> Tuple[torch.Tensor, ...]:
        """Block ``block``'s ``w*`` projections as ``F.linear`` weights: Q and K stacked ``[2*H*dh, d]`` (with
        biases), V ``[H*dh, d]``, O ``[d, H*dh]`` (cached: the layers above a head stay at ``w*``)."""
        a = block.attn
        params = (a.W_Q, a.W_K, a.W_V, a.b_Q, a.b_K, a.b_V, a.W_O, a.b_O)
        key = (id(block),) + tuple(p._version for p in params)  # rebuilt if a weight was written to
        if key not in self._fused:
            self._fused = {k: v for k, v in self._fused.items() if k[0] != id(block)}
            H, d, dh = a.W_Q.shape
            w = lambda W: W.detach().permute(0, 2, 1).reshape(H * dh, d)  # noqa: E731
            self._fused[key] = (torch.cat([w(a.W_Q), w(a.W_K)]), torch.cat([a.b_Q.detach(), a.b_K.detach()]).reshape(-1),
                                w(a.W_V), a.b_V.detach().reshape(-1),
                                a.W_O.detach().permute(2, 0, 1).reshape(d, H * dh), a.b_O.detach())
        return self._fused[key]

    def _block_sdpa(self, block, resid: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
        """TransformerLens's pre-norm block at ``w*`` on ``resid [B, T, d]`` with causal SDPA attention
        (the maths of ``TransformerBlock.forward`` for the configurations ``unsupported_reason`` admits)."""
        return self._block_parts(block, resid, pos)[3]

    def _block_parts(self, block, resid: torch.Tensor, pos: Optional[torch.Tensor]):
        """``(z [B, T, H, dh], attn_out [B, T, d] (b_O included), mlp_out or None, resid_post)`` of
        ``block`` at ``w*`` on ``resid [B, T, d]`` (SDPA attention)."""
        cfg, attn = self.cfg, block.attn
        W_qk, b_qk, W_v, b_v, W_o, b_o = self._fused_weights(block)
        B, T, d = resid.shape
        H, dh = cfg.n_heads, cfg.d_head
        x = norm(block.ln1, resid)
        xqk = x + pos if pos is not None else x
        q, k = F.linear(xqk, W_qk, b_qk).view(B, T, 2, H, dh).unbind(2)
        v = F.linear(x, W_v, b_v).view(B, T, H, dh)
        if cfg.positional_embedding_type == "rotary":
            q, k = attn.apply_rotary(q), attn.apply_rotary(k)
        z = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, scale=1.0 / attn.attn_scale).transpose(1, 2)
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

    def bytes_per_replica(self, N: int, T: int, layer: int) -> int:
        """Upper bound on the autograd memory (bytes, peak) of one replica of ``layer`` on ``[N, T]``
        tokens: its own head, the saved activations of the layers above and the features and their
        gradient (the unembedding's row blocks come on top, once per chunk: ``rllc_fast.unembed_loss``).

        Per token, in float32 words: ``16 d_model + 8 d_head`` for the own head and the final features
        (plus ``4 T`` with materialized scores), and per layer above ``4 d_model + 2 n_heads d_head +
        2 d_mlp`` (plus ``5 n_heads T`` with materialized scores). Checked against the peak of live
        tensors on the meta device (tests/test_step_cost.py) at the paper's and Pythia-70m's shapes,
        with attention as CUDA's fused kernel."""
        cfg = self.cfg
        above = cfg.n_layers - layer - 1
        scores = 0 if self.sdpa else 1
        per_layer = (4 * cfg.d_model + 2 * cfg.n_heads * cfg.d_head + 5 * scores * cfg.n_heads * T
                     + (0 if cfg.attn_only else 2 * (cfg.d_mlp or 0)))
        per_token = 16 * cfg.d_model + 8 * cfg.d_head + 4 * scores * T + above * per_layer
        return 4 * N * T * per_token

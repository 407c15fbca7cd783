"""Activation ablations of attention heads (paper Appendix E) on TransformerLens models.

A head's output is its ``hook_z`` slice ``[N, T, d_head]`` (before ``W_O``). Ablation kinds:
  zero      the head's z set to 0;
  mean      z replaced by its mean over the contexts of the data, per position (``[T, d_head]``);
  resample  z taken from another context: the data rolled by one along the batch (Chan et al. 2022).
The *ablation score* is the mean next-token loss (nats/token) with the ablation minus without, on the
same data the mean is taken over. ``path_patch`` isolates the effect of a set of heads that goes
through one later head (Appendix E.2); ``per_token_loss_increase`` finds a head's "tokens in context".
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from ..components import head_name, parse_head_name

KINDS = ("zero", "mean", "resample")
Head = Tuple[int, int]
HeadSpec = Union[str, Tuple[int, int]]


def parse_heads(model, heads: Union[HeadSpec, Iterable[HeadSpec]]) -> List[Head]:
    """``[(layer, head)]`` from ``"l:h"`` strings or ``(l, h)`` pairs; raises ``ValueError`` naming any head
    outside the model (``model.cfg.n_layers`` x ``n_heads``)."""
    if isinstance(heads, str) or (isinstance(heads, tuple) and len(heads) == 2 and all(isinstance(x, int) for x in heads)):
        heads = [heads]
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    out = []
    for spec in heads:
        if isinstance(spec, str):
            l, h = parse_head_name(spec)
        else:
            l, h = (int(x) for x in spec)
        if not (0 <= l < n_layers and 0 <= h < n_heads):
            raise ValueError(f"head {l}:{h} is out of range: the model has layers 0..{n_layers - 1} and heads "
                             f"0..{n_heads - 1} per layer")
        out.append((l, h))
    if not out:
        raise ValueError("no heads given: name at least one as 'layer:head'")
    return out


def head_names(model) -> List[str]:
    """Every head of the model as ``"l:h"``, layer by layer."""
    return [head_name(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]


def _z_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def _record_z(model, tokens: torch.Tensor, layers: Sequence[int], hooks=()) -> Dict[int, torch.Tensor]:
    """``{layer: z [N, T, heads, d_head]}`` of ``tokens`` (run with extra ``hooks``)."""
    store = {}

    def keep(layer):
        def hook(z, hook):
            store[layer] = z.detach().clone()
        return hook

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=list(hooks) + [(_z_name(l), keep(l)) for l in layers])
    return store


def clean_z(model, tokens: torch.Tensor) -> Dict[int, torch.Tensor]:
    """Every layer's clean head outputs ``{layer: z [N, T, heads, d_head]}`` on ``tokens``: pass it as
    ``ablation_hooks(..., z=)`` to ablate many heads on the same data with one forward pass."""
    return _record_z(model, tokens, range(model.cfg.n_layers))


def check_kind(kind: str) -> None:
    """Raise ``ValueError`` naming the choices unless ``kind`` is one of ``KINDS``."""
    if kind not in KINDS:
        raise ValueError(f"ablation kind {kind!r}: choose from {KINDS}")


def ablation_hooks(model, tokens: torch.Tensor, heads, kind: str = "mean",
                   z: Optional[Dict[int, torch.Tensor]] = None) -> list:
    """TransformerLens ``fwd_hooks`` that ablate ``heads`` (see ``parse_heads``) with ``kind`` when the model
    is run on ``tokens`` (the mean and the resampled contexts come from ``tokens`` itself; ``z``: their
    ``clean_z``, computed here when not given)."""
    check_kind(kind)
    heads = parse_heads(model, heads)
    by_layer: Dict[int, List[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)
    replacement = {}
    if kind != "zero":
        z = z if z is not None else _record_z(model, tokens, sorted(by_layer))
        for l, hs in by_layer.items():
            zl = z[l][:, :, hs]  # [N, T, k, d_head]
            replacement[l] = zl.mean(0, keepdim=True) if kind == "mean" else zl.roll(1, dims=0)

    def ablate(layer):
        hs = by_layer[layer]

        def hook(z, hook):
            z = z.clone()
            z[:, :, hs] = 0.0 if kind == "zero" else replacement[layer].expand(z.shape[0], -1, -1, -1)
            return z
        return hook

    return [(_z_name(l), ablate(l)) for l in by_layer]


def per_token_loss(model, tokens: torch.Tensor, hooks=()) -> torch.Tensor:
    """``[N, T-1]`` next-token loss (nats) at each position of ``tokens [N, T]`` (position t predicts t+1)."""
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [N, T] with T >= 2, got shape {tuple(tokens.shape)}")
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=list(hooks)) if hooks else model(tokens)
    logp = logits[:, :-1].log_softmax(-1)
    return -logp.gather(-1, tokens[:, 1:, None])[..., 0]


def per_token_loss_increase(model, tokens: torch.Tensor, heads, kind: str = "mean") -> torch.Tensor:
    """``[N, T-1]`` loss with ``heads`` ablated (``kind``) minus the clean loss, per token in context."""
    return per_token_loss(model, tokens, ablation_hooks(model, tokens, heads, kind)) - per_token_loss(model, tokens)


def ablation_scores(model, tokens: torch.Tensor, heads=None, kind: str = "mean", together: bool = False) -> Dict[str, float]:
    """``{"l:h": ablation score}`` (nats/token; see the module doc) for each of ``heads`` (default all) ablated
    alone, or ``{"l:h+l:h...": score}`` for all of them ablated at once when ``together``."""
    heads = parse_heads(model, heads if heads is not None else head_names(model))
    check_kind(kind)  # before the clean passes
    clean = per_token_loss(model, tokens).mean().item()
    z = clean_z(model, tokens) if kind != "zero" else None
    groups = [heads] if together else [[hd] for hd in heads]
    out = {}
    for group in groups:
        loss = per_token_loss(model, tokens, ablation_hooks(model, tokens, group, kind, z)).mean().item()
        out["+".join(head_name(l, h) for l, h in group)] = loss - clean
    return out


def path_patch(model, tokens: torch.Tensor, senders, receiver: HeadSpec, kind: str = "mean",
               per_token: bool = False) -> Union[float, torch.Tensor]:
    """The loss change (nats/token) when ``receiver`` (one head) sees ``senders`` ablated while every other
    path stays clean (Appendix E.2): run once with ``senders`` ablated (``kind``) and keep the receiver's
    output; run clean with only the receiver's output patched to the kept one. ``per_token``: ``[N, T-1]``
    increases instead of their mean. Every sender must sit in an earlier layer than the receiver."""
    senders = parse_heads(model, senders)
    (r_layer, r_head), = parse_heads(model, [receiver])
    late = [head_name(l, h) for l, h in senders if l >= r_layer]
    if late:
        raise ValueError(f"path_patch: sender(s) {late} are not in an earlier layer than the receiver "
                         f"{r_layer}:{r_head}; a path needs sender layer < receiver layer")
    corrupted = _record_z(model, tokens, [r_layer], ablation_hooks(model, tokens, senders, kind))[r_layer][:, :, r_head]

    def patch(z, hook):
        z = z.clone()
        z[:, :, r_head] = corrupted
        return z

    increase = per_token_loss(model, tokens, [(_z_name(r_layer), patch)]) - per_token_loss(model, tokens)
    return increase if per_token else increase.mean().item()


def top_tokens_in_context(increase: torch.Tensor, k: int) -> List[Tuple[int, int]]:
    """The ``k`` (context, position) pairs of ``increase [N, T-1]`` with the largest values, largest first."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, increase.numel())
    idx = increase.flatten().topk(k).indices
    width = increase.shape[1]
    return [(int(i) // width, int(i) % width) for i in idx]


def max_attention_positions(model, tokens: torch.Tensor, head: HeadSpec,
                            positions: Optional[Sequence[Tuple[int, int]]] = None):
    """The key position each query attends to most, for one ``head``: ``[N, T]``, or a list for the given
    ``(context, position)`` pairs."""
    (l, h), = parse_heads(model, [head])
    name = f"blocks.{l}.attn.hook_pattern"
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == name)
    best = cache[name][:, h].argmax(-1)  # [N, T]
    if positions is None:
        return best
    return [int(best[s, t]) for s, t in positions]

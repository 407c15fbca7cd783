"""Components: the weights ``V`` of a weight-refined LLC, as named slices of parameters.

A component is the ``V`` in the product decomposition ``W = U x V`` (paper, section 3.2): a set of
slices of a model's parameters that SGLD may move while everything else stays at ``w*``.
Components may overlap; each one is its own refinement.

A component names parameters by their ``named_parameters()`` name and records each parameter's
shape, so it applies to any model with the same architecture (every checkpoint of a training
run) and is refused by a model that lacks those parameters.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

Index = Tuple[Union[int, slice], ...]


@dataclass(frozen=True)
class ParamSlice:
    """One slice ``model.<param>[index]`` of a parameter of shape ``param_shape``."""

    param: str
    index: Index
    param_shape: Tuple[int, ...]

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The slice of ``tensor`` (a view when ``tensor`` is the parameter itself)."""
        return tensor[self.index] if self.index else tensor

    @functools.cached_property
    def numel(self) -> int:
        return self.view(torch.empty(self.param_shape, device="meta")).numel()

    def describe(self) -> str:
        if not self.index:
            return self.param
        parts = [str(i) if isinstance(i, int) else _slice_str(i) for i in self.index]
        return f"{self.param}[{', '.join(parts)}]"


@dataclass(frozen=True)
class Component:
    """A named set of parameter slices; ``numel`` is the dimension of ``V``."""

    name: str
    slices: Tuple[ParamSlice, ...]

    @functools.cached_property
    def numel(self) -> int:
        return sum(s.numel for s in self.slices)

    @property
    def param_names(self) -> List[str]:
        return sorted({s.param for s in self.slices})

    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError unless every slice names a parameter of ``model`` with its shape."""
        params = dict(model.named_parameters())
        for s in self.slices:
            if s.param not in params:
                raise ValueError(
                    f"component {self.name!r} refers to parameter {s.param!r}, which this model "
                    "does not have: the component was built from another model; rebuild it from "
                    "this one (e.g. heads(model))"
                )
            if tuple(params[s.param].shape) != s.param_shape:
                raise ValueError(
                    f"component {self.name!r}: parameter {s.param!r} has shape "
                    f"{tuple(params[s.param].shape)} in this model but {s.param_shape} in the model "
                    "the component was built from; rebuild the component from this model"
                )

    def __repr__(self) -> str:
        return f"Component({self.name!r}, numel={self.numel}, slices=[{', '.join(s.describe() for s in self.slices)}])"


def make_component(model: nn.Module, name: str, slices: Iterable[Tuple[str, Index]]) -> Component:
    """A component named ``name`` of ``(param_name, index)`` pairs: ``model.<param_name>[index]`` each.

    index: ``()`` for the whole parameter, else a tuple of ints and slices, one per leading dimension (an int
    or slice alone is taken as a 1-tuple): ``("blocks.0.attn.W_Q", (2,))`` is head 2's query weights,
    ``("lin.weight", (slice(0, 4),))`` rows 0-3, ``("lin.weight", (slice(None), slice(0, 4)))`` columns 0-3.
    Raises ``ValueError`` for a parameter the model lacks, an index out of range, slices that overlap (a
    weight counted twice) or no weights at all; ``TypeError`` for an index that is not an int or slice.
    ``from_params`` takes the same pairs."""
    params = dict(model.named_parameters())
    built = []
    for param_name, index in slices:
        if param_name not in params:
            raise ValueError(f"component {name!r}: the model has no parameter named {param_name!r}")
        index = _as_index(index)
        shape = tuple(params[param_name].shape)
        _check_index(name, param_name, index, shape)
        built.append(ParamSlice(param_name, index, shape))
    if not built:
        raise ValueError(f"component {name!r} has no parameter slices")
    _check_disjoint(name, built)
    comp = Component(name, tuple(built))
    if comp.numel == 0:
        raise ValueError(f"component {name!r} selects no weights (all slices are empty)")
    return comp


def _check_disjoint(name: str, slices: Sequence[ParamSlice]) -> None:
    """Refuse two slices of one parameter that share a weight (SGLD would move it twice, and ``numel`` count it
    twice)."""
    by_param: Dict[str, List[ParamSlice]] = {}
    for s in slices:
        by_param.setdefault(s.param, []).append(s)
    for param, group in by_param.items():
        if len(group) < 2:
            continue
        hits = torch.zeros(group[0].param_shape, dtype=torch.int8)
        for s in group:
            s.view(hits).add_(1)
        if int(hits.max()) > 1:
            raise ValueError(f"component {name!r}: slices {', '.join(s.describe() for s in group)} of {param} "
                             "overlap; give each weight once")


def _check_index(name: str, param_name: str, index: Index, shape: Tuple[int, ...]) -> None:
    if len(index) > len(shape):
        raise ValueError(
            f"component {name!r}: index {index} has more dimensions than {param_name} {shape}"
        )
    for dim, (i, size) in enumerate(zip(index, shape)):
        if isinstance(i, bool) or not isinstance(i, (int, slice)):
            raise TypeError(f"component {name!r}: index {i!r} of {param_name} must be an int or slice")
        if isinstance(i, int) and not -size <= i < size:
            raise ValueError(
                f"component {name!r}: index {i} is out of range for dimension {dim} of "
                f"{param_name} (size {size})"
            )


def _slice_str(s: slice) -> str:
    start = "" if s.start is None else s.start
    stop = "" if s.stop is None else s.stop
    return f"{start}:{stop}" if s.step is None else f"{start}:{stop}:{s.step}"


def _tl_config(model: nn.Module):
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "n_heads") or not hasattr(cfg, "n_layers"):
        raise TypeError(
            "heads(), groups(), layer() and mlp() need a TransformerLens HookedTransformer (a model with .cfg "
            "n_layers/n_heads; rllc_fast.models.load_hf loads Hugging Face checkpoints as one); use "
            "from_params(model, ...) for other models"
        )
    return cfg


HEAD_PARAMS = ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O")
QUERY_HEAD_PARAMS = ("W_Q", "b_Q", "W_O")            # a query head's own slices under grouped-query attention
GROUP_KV_PARAMS = ("_W_K", "_W_V", "_b_K", "_b_V")   # TransformerLens's shared key/value weights of a group


def _check_layer(cfg, layer_index: int) -> None:
    if not 0 <= layer_index < cfg.n_layers:
        raise ValueError(f"layer index {layer_index} out of range: the model has {cfg.n_layers} layers")


def kv_groups(model: nn.Module) -> Optional[int]:
    """The number of key/value groups per layer of a TransformerLens model with grouped-query attention
    (``cfg.n_key_value_heads``; query head ``h`` reads group ``h // (n_heads // n_key_value_heads)``), or None
    when every head has its own keys and values."""
    cfg = _tl_config(model)
    n_kv = getattr(cfg, "n_key_value_heads", None)
    if n_kv is None or "blocks.0.attn._W_K" not in dict(model.named_parameters()):
        return None
    return int(n_kv)


def head(model: nn.Module, layer_index: int, head_index: int) -> Component:
    """Attention head ``layer_index:head_index`` of a TransformerLens model, named ``"l:h"``.

    Slices ``W_Q[h], W_K[h], W_V[h], b_Q[h], b_K[h], b_V[h], W_O[h]`` of block ``layer_index``. Under
    grouped-query attention (``kv_groups``) a head's keys and values are shared with its group, so the head is
    its own slices only: ``W_Q[h], b_Q[h], W_O[h]`` (its group is ``group``). The output bias ``b_O`` is shared
    by all heads of a layer and belongs to no head.
    """
    cfg = _tl_config(model)
    _check_layer(cfg, layer_index)
    if not 0 <= head_index < cfg.n_heads:
        raise ValueError(f"head index {head_index} out of range: the model has {cfg.n_heads} heads")
    params = dict(model.named_parameters())
    prefix = f"blocks.{layer_index}.attn."
    own = QUERY_HEAD_PARAMS if kv_groups(model) is not None else HEAD_PARAMS
    slices = []
    for p in own:
        name = prefix + p
        if name not in params:
            if p.startswith("b_"):
                continue  # models without attention biases
            raise ValueError(f"the model has no parameter {name!r}")
        slices.append((name, (head_index,)))
    return make_component(model, head_name(layer_index, head_index), slices)


def group(model: nn.Module, layer_index: int, group_index: int) -> Component:
    """Key/value group ``group_index`` of layer ``layer_index`` under grouped-query attention, named ``"l:gG"``:
    the group's shared ``_W_K[G], _W_V[G], _b_K[G], _b_V[G]`` and its query heads' ``W_Q, b_Q, W_O`` (heads
    ``G*r .. G*r + r - 1``, ``r = n_heads / n_key_value_heads``).

    Raises ``ValueError`` for a model without grouped-query attention (there ``heads`` already holds each head's
    keys and values) and for indices out of range."""
    cfg = _tl_config(model)
    n_groups = kv_groups(model)
    if n_groups is None:
        raise ValueError("the model has no grouped-query attention (cfg.n_key_value_heads is None): every head has "
                         "its own keys and values; use heads(model)")
    _check_layer(cfg, layer_index)
    if not 0 <= group_index < n_groups:
        raise ValueError(f"group index {group_index} out of range: the model has {n_groups} key/value groups")
    per = cfg.n_heads // n_groups
    params = dict(model.named_parameters())
    prefix = f"blocks.{layer_index}.attn."
    queries = slice(group_index * per, (group_index + 1) * per)
    slices = [(prefix + p, (group_index,)) for p in GROUP_KV_PARAMS if prefix + p in params]
    slices += [(prefix + p, (queries,)) for p in QUERY_HEAD_PARAMS if prefix + p in params]
    return make_component(model, group_name(layer_index, group_index), slices)


def groups(model: nn.Module) -> Dict[str, Component]:
    """Every key/value group (``group``) of a TransformerLens model with grouped-query attention, keyed
    ``"l:gG"``; a ``ValueError`` for a model without it."""
    cfg = _tl_config(model)
    n_groups = kv_groups(model)
    if n_groups is None:
        group(model, 0, 0)  # raises the explanation
    return {group_name(l, g): group(model, l, g) for l in range(cfg.n_layers) for g in range(n_groups)}


_HEAD_NAME = re.compile(r"(\d+):(\d+)")
_GROUP_NAME = re.compile(r"(\d+):g(\d+)")


def head_name(layer_index: int, head_index: int) -> str:
    """The name of attention head ``head_index`` of layer ``layer_index``: ``"l:h"`` (e.g. ``"1:6"``)."""
    return f"{int(layer_index)}:{int(head_index)}"


def group_name(layer_index: int, group_index: int) -> str:
    """The name of key/value group ``group_index`` of layer ``layer_index`` (grouped-query attention): ``"l:gG"``."""
    return f"{int(layer_index)}:g{int(group_index)}"


def parse_head_name(name: str) -> Tuple[int, int]:
    """``"l:h"`` -> ``(l, h)``; a ``ValueError`` naming the expected form for anything else."""
    match = _HEAD_NAME.fullmatch(str(name).strip())
    if match is None:
        raise ValueError(f"head {name!r}: expected 'layer:head', e.g. '1:3'")
    return int(match.group(1)), int(match.group(2))


def parse_group_name(name: str) -> Tuple[int, int]:
    """``"l:gG"`` -> ``(l, G)``; a ``ValueError`` naming the expected form for anything else."""
    match = _GROUP_NAME.fullmatch(str(name).strip())
    if match is None:
        raise ValueError(f"group {name!r}: expected 'layer:gGROUP', e.g. '1:g0'")
    return int(match.group(1)), int(match.group(2))


def heads(model: nn.Module) -> Dict[str, Component]:
    """Every attention head of a TransformerLens model, keyed ``"l:h"`` (e.g. ``"1:6"``).

    Each head is ``W_Q[h], W_K[h], W_V[h], b_Q[h], b_K[h], b_V[h], W_O[h]`` of its layer
    (``d_model*d_head*4 + 3*d_head`` weights: 32,864 for the paper's model). The attention output
    bias ``b_O`` is shared by the heads of a layer and is in no head's component. Under grouped-query
    attention each head is its query head ``W_Q[h], b_Q[h], W_O[h]``; the shared keys and values are in
    ``groups(model)``.
    """
    cfg = _tl_config(model)
    return {
        head_name(l, h): head(model, l, h) for l in range(cfg.n_layers) for h in range(cfg.n_heads)
    }


def layer(model: nn.Module, layer_index: int) -> Component:
    """Every parameter of transformer block ``layer_index`` (attention, MLP, norms), named ``"L<l>"``."""
    cfg = _tl_config(model)
    _check_layer(cfg, layer_index)
    prefix = f"blocks.{layer_index}."
    names = [n for n, _ in model.named_parameters() if n.startswith(prefix)]
    return make_component(model, f"L{layer_index}", [(n, ()) for n in names])


def layers(model: nn.Module) -> Dict[str, Component]:
    """Every transformer block of a TransformerLens model, keyed ``"L<l>"``."""
    cfg = _tl_config(model)
    return {f"L{l}": layer(model, l) for l in range(cfg.n_layers)}


def mlp(model: nn.Module, layer_index: int) -> Component:
    """Every parameter of the MLP of block ``layer_index`` (``W_in, b_in``, ``W_gate`` when gated, ``W_out,
    b_out``; not the norm before it), named ``"M<l>"``. A ``ValueError`` for attention-only models."""
    cfg = _tl_config(model)
    _check_layer(cfg, layer_index)
    prefix = f"blocks.{layer_index}.mlp."
    names = [n for n, _ in model.named_parameters() if n.startswith(prefix)]
    if not names:
        raise ValueError(f"block {layer_index} has no MLP parameters (an attention-only model?)")
    return make_component(model, f"M{layer_index}", [(n, ()) for n in names])


def mlps(model: nn.Module) -> Dict[str, Component]:
    """The MLP of every block of a TransformerLens model, keyed ``"M<l>"``."""
    cfg = _tl_config(model)
    return {f"M{l}": mlp(model, l) for l in range(cfg.n_layers)}


def whole(model: nn.Module) -> Component:
    """All parameters of ``model``: the unrefined LLC. Named ``"whole"``."""
    return make_component(model, "whole", [(n, ()) for n, _ in model.named_parameters()])


def from_params(
    model: nn.Module, names_or_regex: Union[str, Sequence[Union[str, Tuple[str, Index]]]], name: str | None = None
) -> Component:
    """A component of whole parameters, or of row/column slices of them, of any ``nn.Module``.

    names_or_regex: one regular expression matched with ``re.fullmatch`` against ``named_parameters()`` names
        (whole parameters; it must match at least one), or a list whose entries are parameter names (the whole
        parameter) or ``(name, index)`` pairs selecting ``model.<name>[index]`` (see ``make_component``: index is
        an int, a slice or a tuple of them, one per leading dimension). For example the first two query heads
        of layer 0 and their output rows::

            from_params(model, [("blocks.0.attn.W_Q", slice(0, 2)), ("blocks.0.attn.W_O", slice(0, 2))],
                        name="0:q01")

        and the first 4 output features of a ``Linear`` (rows of its weight, entries of its bias)::

            from_params(model, [("lin.weight", slice(0, 4)), ("lin.bias", slice(0, 4))], name="out0-3")
    name: the component's name (default: the regex, or the parameter names joined by "+").
    Raises ``ValueError`` for names the model lacks, indices out of range or overlapping slices."""
    all_names = [n for n, _ in model.named_parameters()]
    if isinstance(names_or_regex, str):
        pattern = re.compile(names_or_regex)
        chosen = [n for n in all_names if pattern.fullmatch(n)]
        if not chosen:
            raise ValueError(
                f"regex {names_or_regex!r} matches no parameter; the model has: {', '.join(all_names[:20])}"
                + (" ..." if len(all_names) > 20 else "")
            )
        return make_component(model, name or names_or_regex, [(n, ()) for n in chosen])
    pairs = []
    for entry in names_or_regex:
        if isinstance(entry, str):
            pairs.append((entry, ()))
        elif isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str):
            pairs.append((entry[0], entry[1]))
        else:
            raise TypeError(f"from_params: each entry must be a parameter name or a (name, index) pair, got {entry!r}")
    missing = [n for n, _ in pairs if n not in all_names]
    if missing:
        raise ValueError(f"the model has no parameter(s) {missing}; it has: {', '.join(all_names[:20])}"
                         + (" ..." if len(all_names) > 20 else ""))
    label = name or "+".join(n if idx == () else ParamSlice(n, _as_index(idx), ()).describe() for n, idx in pairs)
    return make_component(model, label, pairs)


def _as_index(index) -> Index:
    return tuple(index) if isinstance(index, (tuple, list)) else (index,)


def as_component_dict(model: nn.Module, components) -> Dict[str, Component]:
    """Normalise ``components`` (None, a Component, a dict or a list) to ``{name: Component}``."""
    if components is None:
        comps = {"whole": whole(model)}
    elif isinstance(components, Component):
        comps = {components.name: components}
    elif isinstance(components, dict):
        comps = dict(components)
    elif isinstance(components, (list, tuple)):
        comps = {}
        for c in components:
            if not isinstance(c, Component):
                raise TypeError(f"components must hold Component objects, got {type(c).__name__}")
            if c.name in comps:
                raise ValueError(f"two components are named {c.name!r}; names must be unique")
            comps[c.name] = c
    else:
        raise TypeError(
            "components must be None (whole model), a Component, a dict {name: Component} or a list "
            f"of Components, not {type(components).__name__}"
        )
    if not comps:
        raise ValueError("components is empty; pass None for the whole model")
    for key, c in comps.items():
        if not isinstance(c, Component):
            raise TypeError(f"components[{key!r}] is a {type(c).__name__}, not a Component")
        c.check_model(model)
    return comps


def whole_model_component(model: nn.Module, components: Dict[str, Component]) -> Optional[str]:
    """The name of the first component of ``components`` that holds every weight of ``model`` (the plain,
    unrefined LLC), or None."""
    names = {n for n, _ in model.named_parameters()}
    total = sum(p.numel() for p in model.parameters())
    return next((k for k, c in components.items() if c.numel == total and set(c.param_names) == names), None)

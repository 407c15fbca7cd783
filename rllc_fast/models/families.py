"""Local Hugging Face checkpoints of the main causal-LM families, into TransformerLens, offline.

``load_hf(source)`` reads ``config.json``, picks the family by its ``model_type`` (``FAMILIES``), builds the
``HookedTransformerConfig`` from that file alone (never the hub), loads the weights with ``transformers``
(``local_files_only``), converts them with TransformerLens 3.9's own converter for the family and loads them
without any weight processing (no norm folding or centring): the TransformerLens parameters are the
checkpoint's own weights, and the logits equal ``transformers``' (tests/test_model_families.py, 1e-4 in fp32).

Where TransformerLens has a config conversion keyed by architecture (Llama, Mistral, Qwen2) it is used, on the
config written to a neutrally named folder (TransformerLens picks hard-coded configs by substrings
such as "llama" or "gemma" in the path). Its GPT-2 conversion reads ``n_ctx``, which ``transformers`` 5 no
longer has, and it converts OLMo and Gemma configs only by model name, so those three are built here.

A config feature a converter would ignore (attention biases in Llama, scaled rotary embeddings other than
Llama 3's, sliding windows in Qwen2, quantized weights) is refused with a ``ValueError``, not approximated.

What TransformerLens adds: it keeps zero biases where a family has none (``b_Q``, ``b_K``, ``b_V``, ``b_O``,
the MLP's ``b_in``/``b_out``, ``b_U``), unit/zero weights for OLMo's parameter-free LayerNorms, and separate
``W_E``/``W_U`` for tied embeddings. They are parameters of the model, so ``heads()``, ``layer()`` and
``whole()`` components include them (at ``w*`` they hold those values); choose slices with ``from_params`` to
leave them out.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from . import hub_cache
from .build import hooked_config, hooked_transformer, isolated_random_state

#: The longest context a rotary model gets by default: TransformerLens keeps an ``n_ctx x n_ctx`` mask per
#: layer, so a config's 131,072 positions would not fit (its own configs cap these models at 2048 too).
ROTARY_N_CTX_CAP = 2048


@dataclass(frozen=True)
class Family:
    """How to load one ``model_type``: the ``transformers`` class, TransformerLens's weight converter
    (module and function under ``transformer_lens.pretrained.weight_conversions``) and the config fields."""

    architecture: str
    converter: str
    fields: Callable  # hf_config, path -> dict of HookedTransformerConfig fields


def resolve_local_dir(source: str | os.PathLike, revision: Optional[str] = None) -> Path:
    """The directory holding ``config.json``: ``source`` itself, or a hub cache entry's snapshot.

    source: a checkpoint directory; or a hub name ``org/name`` / ``models--org--name`` folder of the local
            Hugging Face cache (offline, ``rllc_fast.models.hub_cache``), at ``revision`` (default ``main``, or
            the only cached revision).
    Raises ``FileNotFoundError`` that says what to pass (nothing is ever downloaded); the revisions found are
    listed when the one asked for is not cached."""
    repo = hub_cache.find_repo(source)
    if repo is not None:
        return hub_cache.snapshot_of(repo, revision)
    if revision is not None:
        raise ValueError(f"revision={revision!r}: {source} is not a Hugging Face hub cache entry; revisions "
                         "select among a hub cache's refs (pass the directory alone)")
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json here; pass a Hugging Face checkpoint directory")
        return path
    raise FileNotFoundError(f"checkpoint directory {path} does not exist")


def read_hf_config(path: Path):
    """The ``transformers`` config of the checkpoint directory ``path`` (local files only); a ``ValueError``
    listing the supported model types when ``config.json``'s ``model_type`` is not one of them."""
    from transformers import AutoConfig

    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{path / 'config.json'}: not a readable Hugging Face config ({err})") from err
    family_of(model_type, path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*")
        return AutoConfig.from_pretrained(path, local_files_only=True)


def family_of(model_type: Optional[str], path: Path | str = "") -> Family:
    """The ``Family`` of a ``model_type``; a ``ValueError`` listing the supported model types for any other."""
    if model_type not in FAMILIES:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported; supported model types: "
                         f"{', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def tl_config(hf_config, path: Path | str = "", device: str | torch.device = "cpu", n_ctx: Optional[int] = None):
    """The ``HookedTransformerConfig`` of a checkpoint of a supported family (``hf_config`` read from ``path``).

    n_ctx: the longest sequence the model will take; default the config's context, at most ``ROTARY_N_CTX_CAP``
           for rotary models (a model with learned positions keeps its own)."""
    family = family_of(hf_config.model_type, path)
    quant = getattr(hf_config, "quantization_config", None)
    if quant:
        raise ValueError(f"{path}: quantized checkpoints are not supported (quantization_config {quant})")
    fields = dict(family.fields(hf_config, Path(path)))
    if fields.get("positional_embedding_type") == "rotary":
        fields["n_ctx"] = int(n_ctx) if n_ctx is not None else min(fields["n_ctx"], ROTARY_N_CTX_CAP)
        window = fields.get("window_size")
        if fields.get("attn_types") and window is not None and window >= fields["n_ctx"]:
            # a sliding window no shorter than the context never binds: plain causal attention
            fields.update(attn_types=None, use_local_attn=False, window_size=None)
    elif n_ctx is not None and int(n_ctx) != fields["n_ctx"]:
        raise ValueError(f"n_ctx={n_ctx}: {path} has learned positions for exactly {fields['n_ctx']} tokens; "
                         "leave n_ctx unset")
    for key in ("tokenizer_name", "quantization_method", "initializer_range", "tokenizer_prepends_bos"):
        fields.pop(key, None)  # no tokenizer is loaded; nothing is initialised (the weights are loaded)
    fields.setdefault("default_prepend_bos", False)
    return hooked_config(**fields, device=str(device))


def load_hf(source: str | os.PathLike, revision: Optional[str] = None, device: str | torch.device = "cpu",
            dtype=torch.float32, n_ctx: Optional[int] = None):
    """A ``HookedTransformer`` (eval mode) holding the Hugging Face causal LM in ``source``.

    source:   a checkpoint directory (``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``), or a
              hub name ``org/name`` / ``models--org--name`` folder of the local Hugging Face cache at
              ``revision`` (``resolve_local_dir``; nothing is ever downloaded).
    device:   where the model goes; dtype: the dtype ``transformers`` loads the weights in (the TransformerLens
              model itself is float32); n_ctx: see ``tl_config``.
    Families (``config.json``'s ``model_type``): ``sorted(FAMILIES)``; any other is a ``ValueError`` listing them.
    Global random state is left as it was (both libraries draw initial weights before loading the checkpoint's).
    See the module docstring for the zero biases and untied embeddings TransformerLens adds."""
    import importlib

    import transformers

    path = resolve_local_dir(source, revision)
    hf_config = read_hf_config(path)
    family = family_of(hf_config.model_type, path)
    cfg = tl_config(hf_config, path, device, n_ctx)
    module, function = family.converter.rsplit(".", 1)
    convert = getattr(importlib.import_module(f"transformer_lens.pretrained.weight_conversions.{module}"), function)
    with isolated_random_state(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*")
        hf_model = getattr(transformers, family.architecture).from_pretrained(path, local_files_only=True, dtype=dtype)
        state = convert(hf_model, cfg)
        model = hooked_transformer(cfg)
        model.load_and_process_state_dict(
            {k: v.detach().clone() for k, v in state.items()},
            fold_ln=False,
            center_writing_weights=False,
            center_unembed=False,
            fold_value_biases=False,
        )
    del hf_model
    return model.to(device, print_details=False).eval()


# ---- config fields per family ------------------------------------------------------------------------------

def _rope(hf_config, path: Path, allowed=("default",)) -> dict:
    """``rope_parameters`` (``transformers`` 5) or the older top-level fields; refuses other rope types and
    partial rotary embeddings (the families below rotate whole heads)."""
    rope = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type not in allowed:
        raise ValueError(f"{path}: rope_type {rope_type!r} is not supported for model_type "
                         f"{hf_config.model_type!r} (supported: {', '.join(allowed)})")
    if rope.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0)) not in (None, 1, 1.0):
        raise ValueError(f"{path}: partial rotary embeddings are not supported for model_type {hf_config.model_type!r}")
    rope.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return rope


def _refuse(hf_config, path: Path, **flags) -> None:
    """A ``ValueError`` for any config flag set that the family's converter would ignore."""
    on = [name for name, why in flags.items() if getattr(hf_config, name, None)]
    if on:
        raise ValueError(f"{path}: {', '.join(f'{n}={getattr(hf_config, n)!r}' for n in on)} is not supported for "
                         f"model_type {hf_config.model_type!r} ({'; '.join(flags[n] for n in on)})")


def _head_dim(hf_config) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def _transformer_lens_fields(hf_config, path: Path) -> dict:
    """TransformerLens's own ``convert_hf_model_config`` on ``hf_config`` written to a folder whose name holds no
    model name (so that its architecture-keyed branch runs, offline)."""
    from transformer_lens.loading_from_pretrained import convert_hf_model_config

    folder = Path(tempfile.mkdtemp(prefix="rllc-config-"))
    try:
        if any(word in str(folder).lower() for word in ("llama", "gemma", "olmo", "qwen", "mistral")):
            raise RuntimeError(f"the temporary folder {folder} names a model; set TMPDIR to a neutral folder")
        saved = hf_config.to_dict()
        saved["architectures"] = [FAMILIES[hf_config.model_type].architecture]  # the class load_hf loads
        (folder / "config.json").write_text(json.dumps(saved))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*")
            fields = convert_hf_model_config(str(folder), local_files_only=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    # TransformerLens's Llama and Qwen2 branches take d_head = hidden_size / heads; a config's head_dim rules
    d_head = _head_dim(hf_config)
    fields.update(d_head=d_head, rotary_dim=d_head)
    return fields


def _llama_fields(hf_config, path: Path) -> dict:
    _refuse(hf_config, path, attention_bias="TransformerLens's Llama converter drops attention biases",
            mlp_bias="TransformerLens's Llama converter drops MLP biases")
    _rope(hf_config, path, allowed=("default", "llama3"))  # llama3: TransformerLens's NTK-by-parts rotary
    return _transformer_lens_fields(hf_config, path)


def _mistral_fields(hf_config, path: Path) -> dict:
    _refuse(hf_config, path, attention_bias="TransformerLens's Mistral converter drops attention biases")
    _rope(hf_config, path)
    fields = _transformer_lens_fields(hf_config, path)
    fields["n_ctx"] = hf_config.max_position_embeddings  # TransformerLens writes 2048; tl_config caps it
    return fields


def _qwen2_fields(hf_config, path: Path) -> dict:
    _refuse(hf_config, path, use_sliding_window="TransformerLens's Qwen2 conversion ignores sliding windows")
    _rope(hf_config, path)
    fields = _transformer_lens_fields(hf_config, path)
    fields["rotary_base"] = _rope(hf_config, path)["rope_theta"]  # TransformerLens rounds it to an int
    return fields


def _gpt2_fields(hf_config, path: Path) -> dict:
    _refuse(hf_config, path, add_cross_attention="cross-attention is not a causal LM's")
    return dict(
        d_model=hf_config.n_embd, d_head=hf_config.n_embd // hf_config.n_head, n_heads=hf_config.n_head,
        d_mlp=hf_config.n_inner or 4 * hf_config.n_embd, n_layers=hf_config.n_layer, n_ctx=hf_config.n_positions,
        eps=hf_config.layer_norm_epsilon, d_vocab=hf_config.vocab_size, act_fn=hf_config.activation_function,
        use_attn_scale=hf_config.scale_attn_weights,
        scale_attn_by_inverse_layer_idx=hf_config.scale_attn_by_inverse_layer_idx,
        normalization_type="LN", positional_embedding_type="standard", original_architecture="GPT2LMHeadModel")


def _olmo_fields(hf_config, path: Path) -> dict:
    _refuse(hf_config, path, attention_bias="TransformerLens's OLMo converter drops attention biases")
    if hf_config.num_key_value_heads not in (None, hf_config.num_attention_heads):
        raise ValueError(f"{path}: grouped-query attention (num_key_value_heads {hf_config.num_key_value_heads}) "
                         "is not supported for model_type 'olmo' (TransformerLens's converter has none)")
    rope = _rope(hf_config, path)
    d_head = hf_config.hidden_size // hf_config.num_attention_heads
    return dict(
        d_model=hf_config.hidden_size, d_head=d_head, n_heads=hf_config.num_attention_heads,
        d_mlp=hf_config.intermediate_size, n_layers=hf_config.num_hidden_layers,
        n_ctx=hf_config.max_position_embeddings, eps=1e-5,  # OLMo's parameter-free LayerNorm fixes eps at 1e-5
        d_vocab=hf_config.vocab_size, act_fn=hf_config.hidden_act, normalization_type="LN",
        positional_embedding_type="rotary", rotary_dim=d_head, rotary_base=rope["rope_theta"],
        rotary_adjacent_pairs=False, gated_mlp=True, clip_qkv=hf_config.clip_qkv,
        original_architecture="OlmoForCausalLM")


def _gemma_fields(hf_config, path: Path) -> dict:
    _refuse(hf_config, path, attention_bias="TransformerLens's Gemma converter drops attention biases",
            use_bidirectional_attention="bidirectional attention is not a causal LM's")
    rope = _rope(hf_config, path)
    d_head = _head_dim(hf_config)
    return dict(
        d_model=hf_config.hidden_size, d_head=d_head, n_heads=hf_config.num_attention_heads,
        n_key_value_heads=hf_config.num_key_value_heads, d_mlp=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers, n_ctx=hf_config.max_position_embeddings, eps=hf_config.rms_norm_eps,
        d_vocab=hf_config.vocab_size, act_fn=hf_config.hidden_act, normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=d_head, rotary_base=rope["rope_theta"],
        rotary_adjacent_pairs=False, use_attn_scale=True, gated_mlp=True, final_rms=True,
        original_architecture="GemmaForCausalLM")


def _gpt_neox_fields(hf_config, path: Path) -> dict:
    from .gpt_neox import tl_config_from_hf

    cfg = tl_config_from_hf(hf_config)
    return {k: getattr(cfg, k) for k in ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx",
                                         "eps", "act_fn", "normalization_type", "positional_embedding_type",
                                         "rotary_dim", "rotary_base", "rotary_adjacent_pairs", "parallel_attn_mlp",
                                         "original_architecture")}


#: ``model_type`` -> how to load it.
FAMILIES: Dict[str, Family] = {
    "gpt_neox": Family("GPTNeoXForCausalLM", "neox.convert_neox_weights", _gpt_neox_fields),
    "gpt2": Family("GPT2LMHeadModel", "gpt2.convert_gpt2_weights", _gpt2_fields),
    "llama": Family("LlamaForCausalLM", "llama.convert_llama_weights", _llama_fields),
    "mistral": Family("MistralForCausalLM", "mistral.convert_mistral_weights", _mistral_fields),
    "qwen2": Family("Qwen2ForCausalLM", "qwen2.convert_qwen2_weights", _qwen2_fields),
    "olmo": Family("OlmoForCausalLM", "olmo.convert_olmo_weights", _olmo_fields),
    "gemma": Family("GemmaForCausalLM", "gemma.convert_gemma_weights", _gemma_fields),
}

SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))

"""GPT-NeoX (Pythia): its ``HookedTransformerConfig`` from a ``transformers`` config, and ``load_gpt_neox``.

The loading recipe (offline, TransformerLens's ``convert_neox_weights``, no weight processing) is
``rllc_fast.models.families.load_hf``, which this family shares with the others.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from .build import hooked_config
from .families import load_hf, resolve_local_dir

__all__ = ["load_gpt_neox", "pythia_70m_config", "resolve_local_dir", "tl_config_from_hf"]


def pythia_70m_config(**overrides):
    """Pythia-70m's ``HookedTransformerConfig`` (see ``PYTHIA_70M_CONFIG``); override any field (a ``seed``
    is recorded, not applied to the global generators)."""
    from .pythia import PYTHIA_70M_CONFIG

    return hooked_config(**{**PYTHIA_70M_CONFIG, "default_prepend_bos": False, **overrides})


def tl_config_from_hf(hf_config, device: str | torch.device = "cpu"):
    """A ``HookedTransformerConfig`` equal in function to a ``transformers`` ``GPTNeoXConfig``."""
    from transformer_lens import HookedTransformerConfig

    rope = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"GPT-NeoX rope_type {rope_type!r} is not supported (only 'default' rotary embeddings)")
    rotary_pct = rope.get("partial_rotary_factor", getattr(hf_config, "rotary_pct", 1.0))
    rotary_base = rope.get("rope_theta", getattr(hf_config, "rotary_emb_base", 10000))
    d_head = hf_config.hidden_size // hf_config.num_attention_heads
    return HookedTransformerConfig(
        n_layers=hf_config.num_hidden_layers,
        d_model=hf_config.hidden_size,
        n_heads=hf_config.num_attention_heads,
        d_head=d_head,
        d_mlp=hf_config.intermediate_size,
        d_vocab=hf_config.vocab_size,
        n_ctx=hf_config.max_position_embeddings,
        eps=hf_config.layer_norm_eps,
        act_fn=hf_config.hidden_act,
        normalization_type="LN",
        positional_embedding_type="rotary",
        rotary_dim=round(rotary_pct * d_head),
        rotary_base=rotary_base,
        rotary_adjacent_pairs=False,
        parallel_attn_mlp=getattr(hf_config, "use_parallel_residual", True),
        default_prepend_bos=False,
        original_architecture="GPTNeoXForCausalLM",
        device=str(device),
    )


def load_gpt_neox(local_dir: str | os.PathLike, device: str | torch.device = "cpu", dtype=torch.float32,
                  revision: Optional[str] = None):
    """A ``HookedTransformer`` holding the GPT-NeoX checkpoint in ``local_dir`` (a folder with
    ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``, e.g. Pythia's ``step1000/``), or a
    hub name / ``models--org--name`` folder of the local Hugging Face cache at ``revision`` (``resolve_local_dir``).

    ``load_hf`` restricted to ``model_type`` ``gpt_neox``: fully offline; the logits equal ``transformers``' own
    model's (tested to 1e-4); global random state is left as it was."""
    path = resolve_local_dir(local_dir, revision)
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type != "gpt_neox":
        raise ValueError(f"{path}: model_type is {model_type!r}, not 'gpt_neox' (load_hf loads every supported family)")
    return load_hf(path, device=device, dtype=dtype)

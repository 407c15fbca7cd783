"""GPT-NeoX (Pythia) checkpoints from a local Hugging Face directory, into TransformerLens, offline.

The recipe: read the directory's ``config.json`` into a ``HookedTransformerConfig`` by hand (no hub
lookup), load the weights with ``transformers`` (``local_files_only``), convert them with
TransformerLens's ``convert_neox_weights`` and load them without any weight processing (no LayerNorm
folding or centring), so the TransformerLens parameters are the checkpoint's own weights.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import torch

from . import hub_cache
from .build import hooked_config, hooked_transformer, isolated_random_state

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


def resolve_local_dir(local_dir: str | os.PathLike, revision: Optional[str] = None) -> Path:
    """The directory holding ``config.json``: ``local_dir`` itself, or a hub cache entry's snapshot.

    local_dir: a checkpoint directory; or a hub name ``org/name`` / ``models--org--name`` folder of the local
               Hugging Face cache (offline, ``rllc_fast.models.hub_cache``), at ``revision`` (default ``main``,
               or the only cached revision).
    Raises ``FileNotFoundError`` that says what to pass (nothing is ever downloaded); the revisions found are
    listed when the one asked for is not cached."""
    repo = hub_cache.find_repo(local_dir)
    if repo is not None:
        return hub_cache.snapshot_of(repo, revision)
    if revision is not None:
        raise ValueError(f"revision={revision!r}: {local_dir} is not a Hugging Face hub cache entry; revisions "
                         "select among a hub cache's refs (pass the directory alone)")
    path = Path(local_dir).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json here; pass a Hugging Face GPT-NeoX checkpoint directory")
        return path
    raise FileNotFoundError(f"checkpoint directory {path} does not exist")


def load_gpt_neox(local_dir: str | os.PathLike, device: str | torch.device = "cpu", dtype=torch.float32,
                  revision: Optional[str] = None):
    """A ``HookedTransformer`` holding the GPT-NeoX checkpoint in ``local_dir`` (a folder with
    ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``, e.g. Pythia's ``step1000/``), or a
    hub name / ``models--org--name`` folder of the local Hugging Face cache at ``revision`` (``resolve_local_dir``).

    Fully offline; the logits equal ``transformers``' own model's (tested to 1e-4). Global random state
    is left as it was (both libraries draw initial weights before loading the checkpoint's)."""
    from transformer_lens.pretrained.weight_conversions.neox import convert_neox_weights
    from transformers import AutoConfig, GPTNeoXForCausalLM

    path = resolve_local_dir(local_dir, revision)
    hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    if hf_config.model_type != "gpt_neox":
        raise ValueError(f"{path}: model_type is {hf_config.model_type!r}, not 'gpt_neox'")
    cfg = tl_config_from_hf(hf_config, device)
    with isolated_random_state(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*")
        hf_model = GPTNeoXForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
        state = convert_neox_weights(hf_model, cfg)
        model = hooked_transformer(cfg)
        model.load_and_process_state_dict(
            {k: v.detach().clone() for k, v in state.items()},
            fold_ln=False,
            center_writing_weights=False,
            center_unembed=False,
            fold_value_biases=False,
        )
    del hf_model
    return model.to(device, print_details=False)

"""GPT-NeoX / Pythia-shaped TransformerLens models (random weights; no download)."""
from __future__ import annotations

import torch

from .build import hooked_config, hooked_transformer

# Pythia-70m as TransformerLens describes it: 6 layers of 8 heads of 64, d_model 512, MLP 2048,
# 50,304-token vocabulary, rotary on 16 of each head's 64 dimensions (GPT-NeoX pairing),
# parallel attention and MLP, LayerNorm, untied embeddings.
PYTHIA_70M_CONFIG = dict(
    n_layers=6,
    d_model=512,
    n_heads=8,
    d_head=64,
    d_mlp=2048,
    d_vocab=50304,
    n_ctx=2048,
    act_fn="gelu",
    normalization_type="LN",
    positional_embedding_type="rotary",
    rotary_dim=16,
    rotary_adjacent_pairs=False,
    parallel_attn_mlp=True,
    original_architecture="GPTNeoXForCausalLM",
)


def pythia_like(seed: int = 0, device: str | torch.device = "cpu", **overrides):
    """A randomly initialised ``HookedTransformer`` with Pythia-70m's shapes: 70,426,624 parameters as in
    Hugging Face, plus TransformerLens's unembedding bias ``b_U`` (50,304, zero) = 70,476,928;
    override any ``HookedTransformerConfig`` field for smaller GPT-NeoX-style models. ``seed`` fixes the
    initial weights; global random state is left as it was."""
    return hooked_transformer(hooked_config(**{**PYTHIA_70M_CONFIG, **overrides}, seed=seed, device=str(device)))

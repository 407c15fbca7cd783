"""Model construction and loading: the paper's attention-only transformer, GPT-NeoX/Pythia shapes, local
Hugging Face checkpoints of the main causal-LM families (``load_hf``, offline) and checkpoint series of a
training run (TransformerLens)."""
from .attn_only import PAPER_CONFIG, attn_only
from .checkpoints import (Checkpoint, CheckpointError, checkpoint_at, checkpoint_series, save_checkpoint,
                          select_checkpoints)
from .families import FAMILIES, SUPPORTED_MODEL_TYPES, load_hf
from .gpt_neox import load_gpt_neox, pythia_70m_config
from .pythia import PYTHIA_70M_CONFIG, pythia_like

__all__ = [
    "PAPER_CONFIG",
    "PYTHIA_70M_CONFIG",
    "Checkpoint",
    "CheckpointError",
    "FAMILIES",
    "SUPPORTED_MODEL_TYPES",
    "attn_only",
    "checkpoint_at",
    "checkpoint_series",
    "load_gpt_neox",
    "load_hf",
    "pythia_70m_config",
    "pythia_like",
    "save_checkpoint",
    "select_checkpoints",
]

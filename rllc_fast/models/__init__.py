"""Model construction: the paper's attention-only transformer and GPT-NeoX/Pythia shapes (TransformerLens)."""
from .attn_only import PAPER_CONFIG, attn_only
from .pythia import PYTHIA_70M_CONFIG, pythia_like

__all__ = ["PAPER_CONFIG", "PYTHIA_70M_CONFIG", "attn_only", "pythia_like"]

"""Model construction: the paper's attention-only transformer (TransformerLens)."""
from .attn_only import PAPER_CONFIG, attn_only

__all__ = ["PAPER_CONFIG", "attn_only"]

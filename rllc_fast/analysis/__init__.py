"""Analyses of trained models: head scores (previous-token, induction)."""
from .head_scores import (attention_patterns, induction_scores, previous_token_scores, repeated_random_tokens,
                          repeated_token_losses)

__all__ = ["attention_patterns", "induction_scores", "previous_token_scores", "repeated_random_tokens",
           "repeated_token_losses"]

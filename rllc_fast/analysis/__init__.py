"""Analyses of trained models, to check rLLCs against (paper appendices B, E, F.4, F.5):

- ``head_scores``: previous-token, current-token, induction and prefix-matching scores, ``classify_heads``;
- ``icl``: in-context-learning scores, also with a head ablated;
- ``composition``: Q-, K-, V-composition scores;
- ``ablation``: zero/mean/resample ablations, path patching, per-token loss increases;
- ``tokens_in_context``: pattern classification of a head's most affected tokens in context;
- ``clustering``: clustering of per-head rLLC curves (K-means, DTW, Ward, shape-based);
- ``refinement_shift``: how a data refinement moves each head's rLLC;
- ``response``: the response matrix of per-head susceptibilities to probe sets, its PCA, and whether it separates
  a head type (``toy_response`` on the demo's toy model);
- ``runs`` and ``figures``: the ``rllc analyze`` subcommands over checkpoint series.

Exported here: each module's API. Building blocks (``attention_patterns``, ``repeated_random_tokens``,
``ablation_hooks``, ``per_token_loss``, ``icl_positions``, ``sbd``, the dense ``dense_composition_score``
reference) are imported from their modules.
"""
from .ablation import ablation_scores, path_patch, per_token_loss_increase
from .clustering import Clustering, cluster_curves
from .composition import composition_scores
from .head_scores import (HEAD_TYPES, classify_heads, current_token_scores, induction_scores, prefix_matching_scores,
                          previous_token_scores, repeated_token_losses, score_heads)
from .icl import icl_score, per_head_icl_scores
from .refinement_shift import ratios_by_type, refinement_ratios
from .response import (HeadResponse, ResponsePCA, ResponseSettings, Separation, head_response, linearly_separable,
                       separation, toy_response)
from .tokens_in_context import PATTERNS, TokenInContext, classify_tokens_in_context, head_tokens_in_context, pattern_summary

__all__ = [
    "HEAD_TYPES", "PATTERNS", "Clustering", "HeadResponse", "ResponsePCA", "ResponseSettings", "Separation",
    "TokenInContext", "ablation_scores", "classify_heads",
    "classify_tokens_in_context", "cluster_curves", "composition_scores", "current_token_scores", "head_response",
    "head_tokens_in_context", "icl_score", "induction_scores", "linearly_separable", "path_patch", "pattern_summary", "per_head_icl_scores",
    "per_token_loss_increase", "prefix_matching_scores", "previous_token_scores", "ratios_by_type",
    "refinement_ratios", "repeated_token_losses", "score_heads", "separation", "toy_response",
]

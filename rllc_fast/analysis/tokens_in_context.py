"""Classify a head's "tokens in context" by the pattern they complete (paper Appendix B).

A token in context is ``(context s, position t)``: the prediction of ``tokens[s, t+1]`` from position t,
with ``a`` the position the head attends to most from t (the max-attention token). Patterns are tried
in order; the first that matches explains the token:

1. ``induction``: the next token completes an in-context bigram, ``[A][B] ... [A] -> [B]`` (some j < t with
   ``tokens[j] == tokens[t]`` and ``tokens[j+1] == tokens[t+1]``), and ``a`` is the second ``[A]`` (t), the
   first ``[B]`` (j+1), or, for an in-context n-gram that also matches one token further back
   (``tokens[j-1] == tokens[t-1]``), the token before the second ``[A]`` (t-1: a previous-token head).
2. ``dyck``: the next token closes a bracket opened earlier in the context and the span between the two
   is validly nested (every bracket inside closes the innermost open one of its kind). ``brackets`` maps
   each opening token to its closing token. Pattern: ``(open, close)``.
3. ``skip-ngram``: the next token completes one of the given ``skip_ngrams`` ``(t1, ..., tN)``: ``tokens[t]``
   is ``t(N-1)``, ``tokens[t+1]`` is ``tN`` and ``t1 .. t(N-2)`` occur in that order earlier in the context.
4. ``ngram``: the tokens from ``a`` through the next token, ``tokens[a .. t+1]``, occur as the pattern of at
   least two of the tokens in context not explained above.
5. ``unexplained``.

The unique multigrams of a head (Figure 11) are the distinct Dyck pairs, skip n-grams and n-grams among
its tokens in context.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

PATTERNS = ("induction", "dyck", "skip-ngram", "ngram", "unexplained")


@dataclass(frozen=True)
class TokenInContext:
    """One classified token in context: ``label`` (one of ``PATTERNS``) and the ``pattern`` that explains it
    (the token ids of the Dyck pair, skip n-gram or n-gram; ``()`` otherwise)."""

    context: int
    position: int
    max_attention: int
    label: str
    pattern: Tuple[int, ...] = ()


def _is_induction(row: Sequence[int], t: int, a: int) -> bool:
    for j in range(t):
        if row[j] == row[t] and row[j + 1] == row[t + 1]:
            if a == t or a == j + 1 or (a == t - 1 and j >= 1 and row[j - 1] == row[t - 1]):
                return True
    return False


def _dyck_opening(row: Sequence[int], t: int, brackets: Mapping[int, int]) -> Optional[int]:
    """The opening token that ``row[t+1]`` validly closes, or None."""
    closing = set(brackets.values())
    close = row[t + 1]
    if close not in closing:
        return None
    pending: List[int] = []  # closing tokens seen (walking backwards) still waiting for their opening
    for k in range(t, -1, -1):
        tok = row[k]
        if tok in closing and tok not in brackets:
            pending.append(tok)
        elif tok in brackets:
            if not pending:
                return tok if brackets[tok] == close else None  # innermost open bracket must match
            if brackets[tok] != pending.pop():
                return None  # crossed nesting inside the span
    return None


def _is_skip_ngram(row: Sequence[int], t: int, gram: Sequence[int]) -> bool:
    if len(gram) < 3 or row[t + 1] != gram[-1] or row[t] != gram[-2]:
        return False
    need, k = list(gram[:-2]), 0
    for tok in row[:t]:
        if k < len(need) and tok == need[k]:
            k += 1
    return k == len(need)


def classify_tokens_in_context(tokens: torch.Tensor, positions: Sequence[Tuple[int, int]],
                               max_attention: Sequence[int], brackets: Optional[Mapping[int, int]] = None,
                               skip_ngrams: Sequence[Sequence[int]] = ()) -> List[TokenInContext]:
    """Label each ``(context, position)`` of ``positions`` (with its max-attention position) by the module
    doc's rules, on ``tokens [N, T]``; ``position`` must be < T-1 (it predicts the next token)."""
    if len(positions) != len(max_attention):
        raise ValueError(f"positions ({len(positions)}) and max_attention ({len(max_attention)}) differ in length")
    brackets = dict(brackets or {})
    N, T = tokens.shape
    rows = tokens.tolist()
    items: List[Optional[TokenInContext]] = []
    ngram_of: Dict[int, Tuple[int, ...]] = {}
    for i, ((s, t), a) in enumerate(zip(positions, max_attention)):
        if not (0 <= s < N and 0 <= t < T - 1 and 0 <= a <= t):
            raise ValueError(f"token in context {(s, t)} with max attention {a}: need 0 <= context < {N}, "
                             f"0 <= position < {T - 1} and 0 <= max_attention <= position")
        row = rows[s]
        if _is_induction(row, t, a):
            items.append(TokenInContext(s, t, a, "induction"))
            continue
        opening = _dyck_opening(row, t, brackets) if brackets else None
        if opening is not None:
            items.append(TokenInContext(s, t, a, "dyck", (opening, row[t + 1])))
            continue
        gram = next((tuple(g) for g in skip_ngrams if _is_skip_ngram(row, t, g)), None)
        if gram is not None:
            items.append(TokenInContext(s, t, a, "skip-ngram", gram))
            continue
        ngram_of[i] = tuple(row[a:t + 2])
        items.append(None)
    counts = Counter(ngram_of.values())
    for i, gram in ngram_of.items():
        (s, t), a = positions[i], max_attention[i]
        label = "ngram" if counts[gram] >= 2 else "unexplained"
        items[i] = TokenInContext(s, t, a, label, gram if label == "ngram" else ())
    return items


def pattern_summary(items: Sequence[TokenInContext]) -> dict:
    """``{"percent": {pattern: % of items}, "unique": {pattern: distinct patterns}, "unique_multigrams": n,
    "count": len(items)}`` (multigrams: Dyck pairs + skip n-grams + n-grams)."""
    n = len(items)
    percent = {p: (100.0 * sum(it.label == p for it in items) / n if n else 0.0) for p in PATTERNS}
    unique = {p: len({it.pattern for it in items if it.label == p}) for p in ("dyck", "skip-ngram", "ngram")}
    return {"percent": percent, "unique": unique, "unique_multigrams": sum(unique.values()), "count": n}


def head_tokens_in_context(model, tokens: torch.Tensor, head, k: int = 1000, kind: str = "mean",
                           brackets: Optional[Mapping[int, int]] = None, skip_ngrams: Sequence[Sequence[int]] = ()):
    """``(items, summary)`` for one ``head``: ablate it (``kind``), take the ``k`` tokens in context whose loss
    rises most, find where the (clean) head attends most from each, and classify them."""
    from .ablation import max_attention_positions, per_token_loss_increase, top_tokens_in_context

    positions = top_tokens_in_context(per_token_loss_increase(model, tokens, [head], kind), k)
    items = classify_tokens_in_context(tokens, positions, max_attention_positions(model, tokens, head, positions),
                                       brackets, skip_ngrams)
    return items, pattern_summary(items)

"""A synthetic training distribution on which a small attention-only model forms the paper's head types
(previous-token, induction, bracket-matching, n-gram) within minutes on a CPU.

Vocabulary (``SYNTHETIC_VOCAB`` = 128 ids):
  0..7     four bracket pairs: (0,1) (2,3) (4,5) (6,7) as open/close
  8..23    sixteen reserved ids no source emits (kept so the vocabulary, and trained shapes, stay fixed)
  24..127  104 "word" tokens (n-gram text, random spans, identifiers)

Sources, each a generator of ``[N, T]`` contexts (one source per context):
  ngram      text from a fixed random grammar: each word has 3 likely successors, and every 4th token
             is drawn from successors of the token *two* back (a skip-bigram);
  induction  random word spans of 6-16 words, each followed by 0-2 random words and then the span
             twice more (``A B C x A B C A B C``): the repeats are predictable only by looking back
             (induction);
  dyck       nested brackets of four kinds, with words between; a closing bracket must match the
             innermost open one;
  code       code-like lines ``NAME ( NAME [NAME [NAME]] )`` (``( )`` is bracket pair 0) where each
             context reuses 4-6 identifiers of 1-3 word tokens, and 75% of the lines repeat an earlier
             one: as in real code, most tokens are predictable by induction (copying what followed the
             same token earlier), and far more of them than in the mixture.
The grammar is fixed by ``grammar_seed`` (not by the sampling seed), so every source is the same
distribution whatever contexts are drawn.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

SYNTHETIC_VOCAB = 128
BRACKETS = 4
WORDS = np.arange(24, SYNTHETIC_VOCAB)
#: Bumped whenever a source's generator changes, so cached runs trained on older data are not reused.
DATA_VERSION = 4
SOURCES = ("ngram", "induction", "dyck", "code")
DEFAULT_MIXTURE = {"ngram": 0.2, "induction": 0.5, "dyck": 0.15, "code": 0.15}


def _grammar(grammar_seed: int) -> np.ndarray:
    """[len(WORDS), 3] successor table of the n-gram source."""
    g = np.random.default_rng(grammar_seed)
    return np.stack([g.choice(WORDS, size=3, replace=False) for _ in WORDS])


def _ngram(rng, n: int, T: int, succ: np.ndarray) -> np.ndarray:
    out = np.empty((n, T), dtype=np.int64)
    out[:, 0] = rng.choice(WORDS, size=n)
    out[:, 1] = succ[out[:, 0] - WORDS[0], rng.integers(0, 3, size=n)]
    for t in range(2, T):
        src = out[:, t - 2] if t % 4 == 0 else out[:, t - 1]
        nxt = succ[src - WORDS[0], rng.integers(0, 3, size=n)]
        noise = rng.random(n) < 0.1
        out[:, t] = np.where(noise, rng.choice(WORDS, size=n), nxt)
    return out


def _induction(rng, n: int, T: int) -> np.ndarray:
    out = np.empty((n, T), dtype=np.int64)
    for i in range(n):
        row = []
        while len(row) < T:
            span = rng.choice(WORDS, size=int(rng.integers(6, 17))).tolist()
            row.extend(span + rng.choice(WORDS, size=int(rng.integers(0, 3))).tolist() + span + span)
        out[i] = row[:T]
    return out


def _dyck(rng, n: int, T: int) -> np.ndarray:
    out = np.empty((n, T), dtype=np.int64)
    for i in range(n):
        stack, row = [], []
        while len(row) < T:
            r = rng.random()
            if stack and (r < 0.35 or len(stack) > 6):
                row.append(2 * stack.pop() + 1)
            elif r < 0.7:
                kind = int(rng.integers(0, BRACKETS))
                stack.append(kind)
                row.append(2 * kind)
            else:
                row.append(int(rng.choice(WORDS)))
        out[i] = row[:T]
    return out


def _code(rng, n: int, T: int, p_repeat: float = 0.75) -> np.ndarray:
    out = np.empty((n, T), dtype=np.int64)
    for i in range(n):
        # 4-6 identifiers of 1-3 word tokens (like a BPE splitting ``self.model_name``), reused all along
        names = [rng.choice(WORDS, size=int(rng.integers(1, 4))).tolist() for _ in range(int(rng.integers(4, 7)))]
        lines, row = [], []
        while len(row) < T:
            if lines and rng.random() < p_repeat:  # a line repeated from earlier in the file
                line = lines[int(rng.integers(0, len(lines)))]
            else:  # NAME ( NAME [NAME [NAME]] )
                picks = rng.integers(0, len(names), size=int(rng.integers(2, 5)))
                line = [*names[picks[0]], 0]
                for k in picks[1:]:
                    line += names[k]
                line.append(1)
                lines.append(line)
            row.extend(line)
        out[i] = row[:T]
    return out


def synthetic_source(name: str, num_contexts: int, context_length: int, seed: int = 0,
                     grammar_seed: int = 1234) -> torch.Tensor:
    """``[num_contexts, context_length]`` int64 contexts of one source (see the module doc)."""
    if name not in SOURCES:
        raise ValueError(f"unknown synthetic source {name!r}; choose from {SOURCES}")
    if context_length < 8 or num_contexts < 1:
        raise ValueError(f"need context_length >= 8 and num_contexts >= 1, got {context_length}, {num_contexts}")
    rng = np.random.default_rng([seed, SOURCES.index(name)])
    if name == "ngram":
        array = _ngram(rng, num_contexts, context_length, _grammar(grammar_seed))
    else:
        array = {"induction": _induction, "dyck": _dyck, "code": _code}[name](rng, num_contexts, context_length)
    return torch.from_numpy(array)


def synthetic_mixture(num_contexts: int, context_length: int, seed: int = 0,
                      weights: Optional[Dict[str, float]] = None, grammar_seed: int = 1234) -> torch.Tensor:
    """``[num_contexts, context_length]`` contexts, each from one source drawn with ``weights``
    (default ``DEFAULT_MIXTURE``), shuffled; deterministic under ``seed``."""
    weights = dict(DEFAULT_MIXTURE if weights is None else weights)
    unknown = set(weights) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown synthetic source(s) {sorted(unknown)}; choose from {SOURCES}")
    total = sum(weights.values())
    counts = {k: int(round(num_contexts * w / total)) for k, w in weights.items()}
    first = next(iter(counts))
    counts[first] += num_contexts - sum(counts.values())
    parts = [synthetic_source(k, c, context_length, seed, grammar_seed) for k, c in counts.items() if c > 0]
    mix = torch.cat(parts)
    perm = torch.randperm(mix.shape[0], generator=torch.Generator().manual_seed(seed))
    return mix[perm]


def synthetic_probes(num_contexts: int, context_length: int, seed: int = 0, sampling: str = "mixture",
                     weights: Optional[Dict[str, float]] = None, grammar_seed: int = 1234) -> Dict[str, torch.Tensor]:
    """Fixed probe sets for ``estimate_llc(..., observables=...)``: ``{source: [num_contexts, context_length]}``
    for every source in ``SOURCES``, plus ``{sampling: ...}`` contexts of the mixture ``weights`` (the sampling
    task's probe set that susceptibilities contrast the others with). Deterministic under ``seed``; pick a
    ``seed`` other than the sampling data's to keep the probes held out."""
    if sampling in SOURCES:
        raise ValueError(f"sampling={sampling!r} is a source's name; name the mixture's probe set otherwise")
    probes = {name: synthetic_source(name, num_contexts, context_length, seed, grammar_seed) for name in SOURCES}
    probes[sampling] = synthetic_mixture(num_contexts, context_length, seed, weights, grammar_seed)
    return probes

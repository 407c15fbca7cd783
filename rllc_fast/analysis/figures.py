"""Figures of ``rllc analyze``: scores over training per head, composition (paper Figure 7), tokens-in-context
patterns (Figure 9) and clustered rLLC curves (Figures 18-19). Each function takes a long-format DataFrame
(``ResultStore.analysis_rows`` or sweep rows) and writes one PNG, returning its path."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from ..plotting import TYPE_COLORS, head_colour, head_key, log_step_axis, save_figure, sort_key, subplots

PATTERN_COLOURS = {"induction": "#d62728", "dyck": "#9467bd", "skip-ngram": "#ff7f0e", "ngram": "#2ca02c",
                   "unexplained": "#dddddd"}


def plot_per_head_over_training(df, path, title: str, ylabel: str, panels: str = "name",
                                colours: Optional[Dict[str, object]] = None, styles: Optional[Dict[str, str]] = None) -> Path:
    """One panel per value of column ``panels`` (e.g. the score kind), one line per ``head`` over ``step``
    (``value`` column); ``colours``/``styles``: optional ``{head: colour / linestyle}``."""
    keys = list(dict.fromkeys(df[panels]))
    fig, axes = subplots(1, len(keys), figsize=(4.6 * len(keys), 3.9), squeeze=False)
    for ax, key in zip(axes[0], keys):
        sub = df[df[panels] == key]
        heads = sorted(sub["head"].unique(), key=sort_key)
        for i, head in enumerate(heads):
            g = sub[sub["head"] == head].sort_values("step")
            ax.plot(g["step"], g["value"], marker="o", markersize=2.5, linewidth=1.4, label=head,
                    color=head_colour(head, i, len(heads), colours), linestyle=(styles or {}).get(head, "-"))
        log_step_axis(ax, sub["step"])
        ax.set_title(str(key))
        ax.legend(fontsize=7, ncol=2, title="head", title_fontsize=7)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_composition(df, path, kind: str, head_types: Optional[Dict[str, str]] = None) -> Path:
    """Figure 7: one panel per earlier head, one line per later head: the ``kind`` composition over steps
    (rows of ``analysis == "composition"``: ``head`` earlier, ``other`` later). Panel borders and lines are
    coloured by head type when ``head_types`` is given."""
    df = df[df["name"] == kind]
    earlier = sorted(df["head"].unique(), key=sort_key)
    cols = min(4, len(earlier))
    rows = int(np.ceil(len(earlier) / cols))
    fig, axes = subplots(rows, cols, figsize=(3.8 * cols, 3.0 * rows), squeeze=False, sharey=True)
    for ax, head in zip(axes.flat, earlier):
        sub = df[df["head"] == head]
        later = sorted(sub["other"].unique(), key=sort_key)
        for i, other in enumerate(later):
            g = sub[sub["other"] == other].sort_values("step")
            colour = TYPE_COLORS.get((head_types or {}).get(other, ""), None) if head_types else None
            ax.plot(g["step"], g["value"], linewidth=1.3, label=other,
                    color=colour or head_colour(other, i, len(later)))
        log_step_axis(ax, sub["step"])
        ax.set_title(f"from {head}", fontsize=9)
        if head_types and head in head_types:
            for spine in ax.spines.values():
                spine.set_edgecolor(TYPE_COLORS.get(head_types[head], "#000000"))
                spine.set_linewidth(2)
        ax.legend(fontsize=6, ncol=2, title="into", title_fontsize=6)
    for ax in list(axes.flat)[len(earlier):]:
        ax.set_visible(False)
    fig.suptitle(f"{kind}-composition over training")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_token_patterns(summaries: Dict[str, dict], path, title: str) -> Path:
    """Figure 9: per head (ordered by unique multigrams), stacked bars of the % of its tokens in context each
    pattern explains; the unique-multigram count on a second axis."""
    from .tokens_in_context import PATTERNS

    heads = sorted(summaries, key=lambda h: (summaries[h]["unique_multigrams"], sort_key(h)))
    fig, ax = subplots(figsize=(max(6, 0.55 * len(heads) + 2), 4))
    bottom = np.zeros(len(heads))
    for pattern in PATTERNS:
        values = np.array([summaries[h]["percent"][pattern] for h in heads])
        ax.bar(heads, values, bottom=bottom, label=pattern, color=PATTERN_COLOURS[pattern])
        bottom += values
    ax.set_ylabel("% of tokens in context")
    ax.set_ylim(0, 100)
    ax2 = ax.twinx()
    ax2.plot(heads, [summaries[h]["unique_multigrams"] for h in heads], "k.-", label="unique multigrams")
    ax2.set_ylabel("unique multigrams")
    ax.legend(fontsize=7, loc="upper left", ncol=3)
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_clusters(curves: Sequence[Dict[str, np.ndarray]], steps: Sequence[Sequence[int]], labels: Sequence[str],
                  colours: Dict[str, object], clusters: Dict[str, int], path, title: str) -> Path:
    """Clustered rLLC curves: one panel per curve set (e.g. wrLLC, drLLC) and layer, each head in its
    cluster's colour family (``Clustering.colours``), its cluster in the legend."""
    layers = sorted({head_key(h)[0] for h in curves[0]})
    fig, axes = subplots(len(curves), len(layers), figsize=(5 * len(layers), 3.6 * len(curves)), squeeze=False)
    for r, (part, x, label) in enumerate(zip(curves, steps, labels)):
        for c, layer in enumerate(layers):
            ax = axes[r][c]
            for head in sorted((h for h in part if head_key(h)[0] == layer), key=sort_key):
                ax.plot(x, part[head], marker="o", markersize=2.5, linewidth=1.5, color=colours[head],
                        label=f"{head}  c{clusters[head]}")
            log_step_axis(ax, x)
            ax.set_title(f"{label}, layer {layer}", fontsize=9)
            ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)

"""Figures of ``rllc analyze``: scores over training per head, composition (paper Figure 7), tokens-in-context
patterns (Figure 9) and clustered rLLC curves (Figures 18-19). Each ``*_figure`` function takes a long-format
DataFrame (``ResultStore.analysis_rows`` or sweep rows) and returns a matplotlib figure; each ``plot_*``
writes that figure as a PNG and returns its path.

Every head has its own (colour, line style, marker) (``plotting.line_styles``) and a legend entry; when colour
encodes a head type or a cluster, a second legend says which colour is which; every axis is labelled; ``note``
(a second title line) states the options the figure was made from."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from ..plotting import (TYPE_COLORS, colour_key, head_key, line_styles, log_step_axis, save_figure, sort_key,
                        subplots)
from .clustering import cluster_key

PATTERN_COLOURS = {"induction": "#d62728", "dyck": "#9467bd", "skip-ngram": "#ff7f0e", "ngram": "#2ca02c",
                   "unexplained": "#dddddd"}


def _title(fig, title: str, note: str = "") -> None:
    """``title`` above the panels, ``note`` (the settings) below it, wrapped to the figure's width."""
    import textwrap

    note = textwrap.fill(note, width=max(40, int(fig.get_figwidth() * 12)))
    fig.suptitle(f"{title}\n{note}" if note else title, fontsize=10 if note else 12)


def _head_legend(fig, handles, title: str = "head l:h"):
    """One figure legend for lines drawn alike in every panel (the same heads, the same styles)."""
    labels = [h.get_label() for h in handles]
    return fig.legend(handles, labels, title=title, loc="outside right upper", fontsize=7, title_fontsize=7,
                      ncol=max(1, -(-len(handles) // 24)))


def type_key(head_types: Dict[str, str]) -> Dict[str, str]:
    """``{head type: colour}`` (``TYPE_COLORS``) of the types in ``head_types`` ``{head: type}``."""
    return {t: TYPE_COLORS.get(t, TYPE_COLORS["other"]) for t in dict.fromkeys(head_types.values())}


def per_head_over_training_figure(df, title: str, ylabel: str, panels: str = "name",
                                  colours: Optional[Dict[str, object]] = None, styles: Optional[Dict[str, str]] = None,
                                  key_colours: Optional[Dict[str, object]] = None, key_title: str = "head type",
                                  note: str = ""):
    """One panel per value of column ``panels`` (e.g. the score kind), one line per ``head`` over ``step``
    (``value`` column). ``colours``: ``{head: colour}`` (default: a palette); ``styles``: ``{head: linestyle}``
    overrides; ``key_colours``: ``{meaning: colour}`` when ``colours`` encode something (e.g. ``type_key``)."""
    keys = list(dict.fromkeys(df[panels]))
    heads = sorted(df["head"].unique(), key=sort_key)
    look = line_styles(heads, colours)
    for head, linestyle in (styles or {}).items():
        if head in look:
            look[head]["linestyle"] = linestyle
    fig, axes = subplots(1, len(keys), figsize=(4.6 * len(keys) + 1.6, 3.9), layout="constrained", squeeze=False)
    handles = {}
    for ax, key_value in zip(axes[0], keys):
        sub = df[df[panels] == key_value]
        for head in heads:
            g = sub[sub["head"] == head].sort_values("step")
            if not g.empty:
                handles[head], = ax.plot(g["step"], g["value"], markersize=3, linewidth=1.3, label=head, **look[head])
        log_step_axis(ax, sub["step"])
        ax.set_ylabel(ylabel)
        ax.set_title(str(key_value))
    _head_legend(fig, [handles[h] for h in heads if h in handles])
    if key_colours:
        colour_key(fig, key_colours, key_title, loc="outside right lower")
    _title(fig, title, note)
    return fig


def plot_per_head_over_training(df, path, title: str, ylabel: str, panels: str = "name",
                                colours: Optional[Dict[str, object]] = None, styles: Optional[Dict[str, str]] = None,
                                key_colours: Optional[Dict[str, object]] = None, key_title: str = "head type",
                                note: str = "") -> Path:
    """``per_head_over_training_figure`` written as a PNG to ``path``."""
    return save_figure(per_head_over_training_figure(df, title, ylabel, panels, colours, styles, key_colours, key_title,
                                                     note),
                       path)


def composition_figure(df, kind: str, head_types: Optional[Dict[str, str]] = None, note: str = ""):
    """Figure 7: one panel per earlier head, one line per later head: the ``kind`` composition over steps
    (rows of ``analysis == "composition"``: ``head`` earlier, ``other`` later). With ``head_types`` lines are
    coloured by the later head's type and panel borders by the earlier head's, with a legend of the types."""
    df = df[df["name"] == kind]
    earlier = sorted(df["head"].unique(), key=sort_key)
    later = sorted(df["other"].unique(), key=sort_key)
    colours = {h: TYPE_COLORS.get(head_types.get(h, "other"), TYPE_COLORS["other"]) for h in later} \
        if head_types else None
    look = line_styles(later, colours)
    cols = min(4, len(earlier))
    rows = int(np.ceil(len(earlier) / cols))
    fig, axes = subplots(rows, cols, figsize=(3.8 * cols + 1.8, 3.0 * rows + 0.4), layout="constrained",
                         squeeze=False, sharey=True)
    handles = {}
    for ax, head in zip(axes.flat, earlier):
        sub = df[df["head"] == head]
        for other in later:
            g = sub[sub["other"] == other].sort_values("step")
            if not g.empty:
                handles[other], = ax.plot(g["step"], g["value"], linewidth=1.2, markersize=2.5, label=other,
                                          **look[other])
        log_step_axis(ax, sub["step"])
        ax.set_ylabel(f"{kind}-composition score")
        ax.set_title(f"from {head}" + (f" ({head_types[head]})" if head_types and head in head_types else ""),
                     fontsize=9)
        if head_types and head in head_types:
            for spine in ax.spines.values():
                spine.set_edgecolor(TYPE_COLORS.get(head_types[head], TYPE_COLORS["other"]))
                spine.set_linewidth(2)
    for ax in list(axes.flat)[len(earlier):]:
        fig.delaxes(ax)
    _head_legend(fig, [handles[h] for h in later if h in handles], title="into head l:h")
    if head_types:
        shown = {h: t for h, t in head_types.items() if h in set(earlier) | set(later)}
        colour_key(fig, type_key(shown), "head type\n(line: later head,\nborder: earlier head)",
                   loc="outside right lower")
    _title(fig, f"{kind}-composition over training", note)
    return fig


def plot_composition(df, path, kind: str, head_types: Optional[Dict[str, str]] = None, note: str = "") -> Path:
    """``composition_figure`` written as a PNG to ``path``."""
    return save_figure(composition_figure(df, kind, head_types, note), path)


def token_patterns_figure(summaries: Dict[str, dict], title: str, note: str = ""):
    """Figure 9: per head (ordered by unique multigrams), stacked bars of the % of its tokens in context each
    pattern explains (legend: pattern colours); the unique-multigram count on a second axis."""
    from .tokens_in_context import PATTERNS

    heads = sorted(summaries, key=lambda h: (summaries[h]["unique_multigrams"], sort_key(h)))
    fig, ax = subplots(figsize=(max(6, 0.55 * len(heads) + 2), 4.2), layout="constrained")
    bottom = np.zeros(len(heads))
    for pattern in PATTERNS:
        values = np.array([summaries[h]["percent"][pattern] for h in heads])
        ax.bar(heads, values, bottom=bottom, label=pattern, color=PATTERN_COLOURS[pattern])
        bottom += values
    ax.set_xlabel("head l:h (ordered by unique multigrams)")
    ax.set_ylabel("% of tokens in context")
    ax.set_ylim(0, 100)
    ax2 = ax.twinx()
    ax2.plot(heads, [summaries[h]["unique_multigrams"] for h in heads], "k.-", label="unique multigrams")
    ax2.set_ylabel("unique multigrams (count)")
    lines = ax.get_legend_handles_labels()
    extra = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + extra[0], lines[1] + extra[1], fontsize=7, loc="upper left", ncol=3, title="pattern",
              title_fontsize=7)
    _title(fig, title, note)
    return fig


def plot_token_patterns(summaries: Dict[str, dict], path, title: str, note: str = "") -> Path:
    """``token_patterns_figure`` written as a PNG to ``path``."""
    return save_figure(token_patterns_figure(summaries, title, note), path)


def clusters_figure(curves: Sequence[Dict[str, np.ndarray]], steps: Sequence[Sequence[int]], labels: Sequence[str],
                    colours: Dict[str, object], clusters: Dict[str, int], title: str, note: str = ""):
    """Clustered rLLC curves: one panel per curve set (e.g. wrLLC, drLLC; ``labels`` their data names) and
    layer; each head in its cluster's colour family (``Clustering.colours``) with a line style and marker of
    its own within the cluster, ``l:h cN`` in the panel legend, and a legend of the cluster colours."""
    layers = sorted({head_key(h)[0] for h in curves[0]})
    names = sorted(curves[0], key=sort_key)
    look = line_styles(names, colours, groups={h: clusters[h] for h in names})
    fig, axes = subplots(len(curves), len(layers), figsize=(5 * len(layers) + 1.2, 3.6 * len(curves) + 0.4),
                         layout="constrained", squeeze=False)
    for r, (part, x, label) in enumerate(zip(curves, steps, labels)):
        for c, layer in enumerate(layers):
            ax = axes[r][c]
            for head in (h for h in names if head_key(h)[0] == layer):
                ax.plot(x, part[head], markersize=3, linewidth=1.4, label=f"{head}  c{clusters[head]}", **look[head])
            log_step_axis(ax, x)
            ax.set_ylabel(f"rLLC on {label}  $n\\beta(E[L]-L^*)$")
            ax.set_title(f"{label}, layer {layer}", fontsize=9)
            ax.legend(fontsize=7, ncol=2, title="head l:h, cluster", title_fontsize=7)
    colour_key(fig, cluster_key(clusters), "cluster (colour family)")
    _title(fig, title, note)
    return fig


def plot_clusters(curves: Sequence[Dict[str, np.ndarray]], steps: Sequence[Sequence[int]], labels: Sequence[str],
                  colours: Dict[str, object], clusters: Dict[str, int], path, title: str, note: str = "") -> Path:
    """``clusters_figure`` written as a PNG to ``path``."""
    return save_figure(clusters_figure(curves, steps, labels, colours, clusters, title, note), path)


def response_pca_figure(panels: Dict[str, object], title: str, components=(0, 1), note: str = ""):
    """The paper's response-matrix figure: one panel per ``panels`` entry (``{panel title: ResponsePCA}``),
    every head a point at its scores on two principal components (``components``, 0-based), coloured by its
    head type, with its own marker and a legend entry; axes say the component and its share of the variance."""
    first = next(iter(panels.values()))
    heads = first.heads
    types = dict(zip(heads, first.labels))
    look = line_styles(heads, {h: TYPE_COLORS.get(t, TYPE_COLORS["other"]) for h, t in types.items()})
    fig, axes = subplots(1, len(panels), figsize=(4.8 * len(panels) + 1.8, 4.4), layout="constrained", squeeze=False)
    a, b = components
    handles = {}
    for ax, (name, pca) in zip(axes[0], panels.items()):
        if list(pca.heads) != list(heads):
            raise ValueError(f"panel {name!r} has heads {pca.heads}, the first panel {heads}; give every panel "
                             "the same heads")
        for i, h in enumerate(heads):
            handles[h], = ax.plot(pca.scores[i, a], pca.scores[i, b], linestyle="none", markersize=7, label=h,
                                  color=look[h]["color"], marker=look[h]["marker"])
            ax.annotate(h, (pca.scores[i, a], pca.scores[i, b]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.axhline(0, color="#cccccc", linewidth=0.8, zorder=0)
        ax.axvline(0, color="#cccccc", linewidth=0.8, zorder=0)
        ax.set_xlabel(f"PC{a + 1} score ({100 * pca.explained[a]:.1f}% of variance)")
        ax.set_ylabel(f"PC{b + 1} score ({100 * pca.explained[b]:.1f}% of variance)")
        ax.set_title(name, fontsize=9)
        ax.grid(True, alpha=0.3)
    _head_legend(fig, [handles[h] for h in heads])
    colour_key(fig, type_key(types), "head type", loc="outside right lower")
    _title(fig, title, note)
    return fig


def plot_response_pca(panels: Dict[str, object], path, title: str, components=(0, 1), note: str = "") -> Path:
    """``response_pca_figure`` written as a PNG to ``path``."""
    return save_figure(response_pca_figure(panels, title, components, note), path)

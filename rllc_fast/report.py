"""Figures and a static HTML report from a sweep's result store (matplotlib, no server).

- per-head rLLC curves over training steps (log x-axis), one panel per layer, one line per head,
  legend in the paper's ``l:h`` naming (its Figure 2), for each data distribution;
- the per-head difference between two data distributions (the idea of its Figure 3);
- layer and whole-model LLC curves;
- ``index.html``: every figure and a table of the numbers.
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from .atomic import write_atomically
from .plotting import (TYPE_COLORS, head_colour, head_key, log_step_axis, save_figure, sort_key,
                       subplots)
from .store import ResultStore


def _plot_lines(ax, df, value_col: str = "llc_mean", err_col: Optional[str] = "llc_sem",
                colours: Optional[dict] = None) -> None:
    n = df["component"].nunique()
    for i, (name, g) in enumerate(sorted(df.groupby("component"), key=lambda kv: sort_key(kv[0]))):
        g = g.sort_values("step")
        x, y = g["step"].to_numpy(), g[value_col].to_numpy(float)
        color = head_colour(name, i, n, colours)
        ax.plot(x, y, marker="o", markersize=3, linewidth=1.5, label=name, color=color)
        if err_col is not None and err_col in g:
            e = g[err_col].to_numpy(float)
            ok = np.isfinite(e)
            ax.fill_between(x[ok], (y - e)[ok], (y + e)[ok], color=color, alpha=0.15, linewidth=0)


def plot_head_curves(df, path, title: str, value_col: str = "llc_mean", ylabel: str = "rLLC  $\\hat\\lambda$",
                     err_col: Optional[str] = "llc_sem", colours: Optional[dict] = None) -> Path:
    """Per-head curves of ``df`` (see ``head_curves_figure``) written as a PNG to ``path``."""
    return save_figure(head_curves_figure(df, title, value_col, ylabel, err_col, colours), path)


def head_curves_figure(df, title: str, value_col: str = "llc_mean", ylabel: str = "rLLC  $\\hat\\lambda$",
                       err_col: Optional[str] = "llc_sem", colours: Optional[dict] = None):
    """A matplotlib figure of per-head curves of ``df`` (rows of one data distribution, component set
    'heads'): one panel per layer, one line per head (legend ``l:h``), ±1 SEM band, log step axis.
    ``colours``: ``{"l:h": colour}`` (e.g. a clustering's colour families), else a qualitative palette."""
    df = df.copy()
    df["layer"] = [head_key(c)[0] for c in df["component"]]
    layer_ids = sorted(df["layer"].unique())
    fig, axes = subplots(1, len(layer_ids), figsize=(5.2 * len(layer_ids), 4.2), squeeze=False, sharey=True)
    for ax, layer in zip(axes[0], layer_ids):
        sub = df[df["layer"] == layer]
        _plot_lines(ax, sub, value_col, err_col, colours)
        log_step_axis(ax, sub["step"])
        ax.set_title(f"layer {layer}")
        ax.legend(fontsize=8, ncol=2, title="head l:h", title_fontsize=8, loc="best")
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_component_curves(df, path, title: str, ylabel: str = "LLC  $\\hat\\lambda$") -> Path:
    """One panel, one line per (data, component) of ``df`` (whole-model or layer rows)."""
    df = df.copy()
    if df["data"].nunique() > 1:
        df["component"] = df["component"] + " on " + df["data"]
    fig, ax = subplots(figsize=(6.4, 4.2))
    _plot_lines(ax, df)
    log_step_axis(ax, df["step"])
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def head_difference(df, data_a: str, data_b: str):
    """Per-head ``llc(data_a) - llc(data_b)`` at each checkpoint both have; SEMs added in quadrature."""
    heads = df[df["component_set"] == "heads"]
    a = heads[heads["data"] == data_a].set_index(["checkpoint", "step", "component"])
    b = heads[heads["data"] == data_b].set_index(["checkpoint", "step", "component"])
    both = a.join(b, lsuffix="_a", rsuffix="_b", how="inner")
    out = both.reset_index()[["checkpoint", "step", "component"]].copy()
    out["llc_mean"] = (both["llc_mean_a"] - both["llc_mean_b"]).to_numpy()
    out["llc_sem"] = np.sqrt(both["llc_sem_a"].to_numpy() ** 2 + both["llc_sem_b"].to_numpy() ** 2)
    out["data"] = f"{data_a} - {data_b}"
    return out


def make_figures(df, out_dir, differences: Sequence[tuple] = (), colours: Optional[dict] = None) -> List[tuple]:
    """Every figure the rows ``df`` (``ResultStore.rows()``) allow, as ``[(png path, caption)]``. ``differences``:
    pairs of data names to plot per-head differences for (default: every data distribution minus the
    alphabetically first); ``colours``: ``{"l:h": colour}`` for the per-head figures."""
    out_dir = Path(out_dir)
    figures = []
    data_names = list(dict.fromkeys(df["data"]))
    heads = df[df["component_set"] == "heads"]
    for name in data_names:
        sub = heads[heads["data"] == name]
        if not sub.empty:
            p = plot_head_curves(sub, out_dir / f"heads_{_slug(name)}.png", f"per-head rLLC on {name}", colours=colours)
            figures.append((p, f"Per-head rLLC on {name} over training (one panel per layer, ±1 SEM band)."))
    pairs = list(differences) or [(n, data_names[0]) for n in data_names[1:]]
    for a, b in pairs:
        diff = head_difference(df, a, b)
        if not diff.empty:
            p = plot_head_curves(diff, out_dir / f"heads_diff_{_slug(a)}_minus_{_slug(b)}.png",
                                 f"per-head rLLC: {a} minus {b}", ylabel="rLLC difference", colours=colours)
            figures.append((p, f"Per-head rLLC on {a} minus on {b} (paired by checkpoint and head)."))
    for set_name, label in (("layers", "per-layer rLLC"), ("whole", "whole-model LLC")):
        sub = df[df["component_set"] == set_name]
        if not sub.empty:
            p = plot_component_curves(sub, out_dir / f"{set_name}.png", label)
            figures.append((p, f"{label[0].upper()}{label[1:]} over training."))
    return figures


METRIC_LABELS = {"hessian-trace": ("Hessian trace", "Tr $H_{VV}$"), "fim-trace": ("FIM trace", "Tr $F_{VV}$"),
                 "hessian-rank": ("approximate Hessian rank", "eigenvalues > tau")}


def metric_figures(mdf, out_dir) -> List[tuple]:
    """Figures of the Hessian metrics (``ResultStore.metric_rows()``): per metric and data, per-head curves
    (one panel per layer) and whole/layer curves, ±1 standard error, as ``[(png path, caption)]``."""
    out_dir = Path(out_dir)
    figures = []
    df = mdf.rename(columns={"value": "llc_mean", "sem": "llc_sem"})
    for (metric, data), sub in df.groupby(["metric", "data"], sort=True):
        label, ylabel = METRIC_LABELS.get(metric, (metric, metric))
        heads = sub[sub["component_set"] == "heads"]
        if not heads.empty:
            p = plot_head_curves(heads, out_dir / f"{_slug(metric)}_heads_{_slug(data)}.png",
                                 f"per-head {label} on {data}", ylabel=ylabel)
            figures.append((p, f"Per-head {label} on {data} over training (±1 standard error), beside the rLLCs."))
        for set_name in ("layers", "whole"):
            rest = sub[sub["component_set"] == set_name]
            if not rest.empty:
                p = plot_component_curves(rest, out_dir / f"{_slug(metric)}_{set_name}_{_slug(data)}.png",
                                          f"{label} ({set_name}) on {data}", ylabel=ylabel)
                figures.append((p, f"{label[0].upper()}{label[1:]} of {set_name} on {data} over training."))
    return figures


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def write_report(store: ResultStore | str, out_dir, differences: Sequence[tuple] = (),
                 title: str = "rLLC sweep report", extra_html: str = "", colours: Optional[dict] = None) -> Path:
    """PNG figures plus ``index.html`` (figures, the table of estimates, failures) in ``out_dir``;
    ``colours``: ``{"l:h": colour}`` for the per-head curves (e.g. ``Clustering.colours()``)."""
    store = store if isinstance(store, ResultStore) else ResultStore(store)
    out_dir = Path(out_dir)
    df, mdf = store.rows(), store.metric_rows()
    if df.empty and mdf.empty:
        raise ValueError(f"{store.path} holds no estimates yet; run `rllc sweep` first")
    figures = (make_figures(df, out_dir, differences, colours) if not df.empty else []) + metric_figures(mdf, out_dir)
    failures = store.failures()
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}img{max-width:100%;border:1px solid #ddd}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
             "th{background:#f0f0f0}.bad{color:#b00}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p>Store: <code>{html.escape(os.path.abspath(store.path))}</code>; {len(df)} rLLC estimates and "
             f"{len(mdf)} Hessian-metric estimates over "
             f"{pd_nunique(df, mdf, 'checkpoint')} checkpoints, data {', '.join(map(html.escape, pd_unique(df, mdf, 'data')))}.</p>",
             extra_html]
    for path, caption in figures:
        parts.append(f"<figure><img src='{html.escape(path.name)}' alt='{html.escape(caption)}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    if not failures.empty:
        parts.append("<h2 class='bad'>Failed units</h2>")
        parts.append(failures[["checkpoint", "step", "data", "component_set", "error"]].to_html(index=False, escape=True))
    if not df.empty:
        parts.append("<h2>Estimates</h2><p>llc_mean ± llc_sem over non-diverged chains; num_diverged counts chains "
                     "lost to NaN/Inf (excluded, never averaged in).</p>")
        table = df[["step", "checkpoint", "data", "component_set", "component", "llc_mean", "llc_std", "llc_sem",
                    "init_loss", "num_chains", "num_diverged"]]
        parts.append(table.to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="diverged"))
        parts.append(diagnostics_section(df))
    if not mdf.empty:
        parts.append("<h2>Hessian metrics</h2><p>value ± sem (standard error over probes, or over batches for the "
                     "FIM trace).</p>")
        parts.append(mdf[["metric", "step", "checkpoint", "data", "component_set", "component", "value", "sem",
                          "num_samples"]].to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="-"))
    parts.append("</body></html>")
    return write_atomically(out_dir / "index.html", lambda tmp: Path(tmp).write_text("\n".join(parts), encoding="utf-8"))


def pd_unique(a, b, column: str) -> list:
    """Distinct values of ``column`` over two DataFrames, in order of appearance."""
    return list(dict.fromkeys(list(a[column]) + list(b[column])))


def pd_nunique(a, b, column: str) -> int:
    return len(pd_unique(a, b, column))


def head_types_figure(df, metrics: Sequence[dict], head_types: dict, base: str, refined: str, title: str = ""):
    """The demo's four panels, heads coloured by type (``head_types``: ``{"l:h": type}``):
    (a) per-head wrLLC on ``base`` over training; (b) per-head difference rLLC(``refined``) - rLLC(``base``);
    (c) the best previous-token and induction scores and the loss on repeated spans (``metrics``: per
    checkpoint dicts with step, previous_token, induction, loss_first_copy, loss_repeat_copy);
    (d) whole-model LLC on ``base``."""
    fig, axes = subplots(2, 2, figsize=(12, 8.4))
    heads = df[df["component_set"] == "heads"]
    a = heads[heads["data"] == base]
    diff = head_difference(df, refined, base)
    order = sorted(a["component"].unique(), key=head_key)
    styles = ["-", "--", ":", "-."]
    counts: dict = {}
    for name in order:
        kind = head_types.get(name, "other")
        style = styles[counts.get(kind, 0) % len(styles)]
        counts[kind] = counts.get(kind, 0) + 1
        g = a[a["component"] == name].sort_values("step")
        kw = dict(color=TYPE_COLORS.get(kind, "#9a9a9a"), linestyle=style, linewidth=2 if kind != "other" else 1.2,
                  label=f"{name} {kind}")
        axes[0, 0].plot(g["step"], g["llc_mean"], **kw)
        d = diff[diff["component"] == name].sort_values("step")
        axes[0, 1].plot(d["step"], d["llc_mean"], **kw)
    axes[0, 0].set_title(f"(a) per-head wrLLC on {base}")
    axes[0, 0].set_ylabel("rLLC  $\\hat\\lambda$")
    axes[0, 0].legend(fontsize=7, ncol=2)
    axes[0, 1].axhline(0.0, color="black", linewidth=0.8)
    axes[0, 1].set_title(f"(b) drLLC on {refined} minus wrLLC on {base}")
    axes[0, 1].set_ylabel("rLLC difference")
    steps = [m["step"] for m in metrics]
    ax = axes[1, 0]
    ax.plot(steps, [np.max(m["induction"]) for m in metrics], color=TYPE_COLORS["induction"], label="best induction score")
    ax.plot(steps, [np.max(m["previous_token"]) for m in metrics], color=TYPE_COLORS["previous-token"],
            label="best previous-token score")
    ax.set_ylabel("head score")
    ax.set_ylim(0, 1)
    twin = ax.twinx()
    twin.plot(steps, [m["loss_repeat_copy"] for m in metrics], color="black", linestyle="--", label="loss, repeated copy")
    twin.plot(steps, [m["loss_first_copy"] for m in metrics], color="black", linestyle=":", label="loss, first copy")
    twin.set_ylabel("loss on repeated random spans (nats)")
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [l.get_label() for l in lines], fontsize=7, loc="center left")
    ax.set_title("(c) head scores and in-context learning")
    whole = df[(df["component_set"] == "whole") & (df["data"] == base)].sort_values("step")
    axes[1, 1].plot(whole["step"], whole["llc_mean"], color="black", marker="o", markersize=3)
    axes[1, 1].set_title(f"(d) whole-model LLC on {base}")
    axes[1, 1].set_ylabel("LLC  $\\hat\\lambda$")
    for ax in axes.flat:
        log_step_axis(ax, steps)
        ax.set_xlim(min(steps), max(steps) * 1.1)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_head_types(df, metrics, head_types, base, refined, path, title: str = "") -> Path:
    """``head_types_figure`` written as a PNG to ``path``."""
    return save_figure(head_types_figure(df, metrics, head_types, base, refined, title), path)


def diagnostics_section(df) -> str:
    """HTML: the estimates of ``df`` (``ResultStore.rows()``) that the sampler diagnostics flag, each with its
    problems and fix (``rllc_fast.diagnostics.problems`` on the columns rhat, ess, ess_fraction,
    distance_growth), and refined LLCs above the whole-model LLC of the same checkpoint and data. Empty when
    ``df`` has no diagnostic columns (a store written before they existed)."""
    from .diagnostics import problems, refined_exceeding_whole

    columns = ["rhat", "ess", "ess_fraction", "distance_growth"]
    if df.empty or not set(columns) <= set(df.columns):
        return ""
    found = {i: problems(row) for i, row in zip(df.index, df[columns].to_dict("records"))}
    for _, g in df.groupby(["checkpoint", "data"], sort=False):
        whole = g[g["component_set"] == "whole"]
        rest = g[g["component_set"] != "whole"]
        if len(whole) == 1 and not rest.empty:
            w = whole.iloc[0]
            above = refined_exceeding_whole(dict(zip(rest.index, rest["llc_mean"])), w["llc_mean"],
                                            dict(zip(rest.index, rest["llc_sem"])), w["llc_sem"], warn=False)
            for i, excess in above.items():
                found[i].append(f"above the whole-model LLC by {excess:.3g}: lower step_size")
    flagged = [i for i, p in found.items() if p]
    parts = ["<h2>Sampler diagnostics</h2><p>Flagged: rank-normalized split-R-hat &gt; 1.1, ESS &lt; 1% of the draws, "
             "||w - w*|| still growing over the last half of the draws, or a refined LLC above the whole model's "
             "(docs/diagnostics.md).</p>"]
    if not flagged:
        parts.append(f"<p>No estimate is flagged ({len(df)} checked).</p>")
        return "\n".join(parts)
    table = df.loc[flagged, ["step", "checkpoint", "data", "component", "llc_mean", *columns]].copy()
    table["problems"] = ["; ".join(found[i]) for i in flagged]
    parts.append(f"<p class='bad'>{len(flagged)} of {len(df)} estimates flagged.</p>")
    parts.append(table.to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="-"))
    return "\n".join(parts)

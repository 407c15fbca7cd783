"""Figures and a static HTML report from a sweep's result store (matplotlib, no server).

- per-head rLLC curves over training steps (log x-axis), one panel per layer, one line per head, each head
  its own (colour, line style, marker), legend in the paper's ``l:h`` naming (its Figure 2), for each data
  distribution;
- the per-head difference between two data distributions (the idea of its Figure 3);
- layer and whole-model LLC curves;
- ``index.html``: every figure, captioned with the settings it was drawn from (``describe_settings``: data
  and its hash, checkpoints, the configuration's SGLD settings or metric options), and tables of the numbers.
"""
from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from .atomic import write_atomically
from .observables_report import observables_section
from .plotting import (LLC_LABEL, RLLC_DIFFERENCE_LABEL, RLLC_LABEL, TYPE_COLORS, colour_key, describe_steps,
                       head_key, line_styles, log_step_axis, save_figure, sort_key, subplots)
from .store import DIAGNOSTIC_COLUMNS, SETTINGS_COLUMNS, ResultStore, check_one_checkpoint_per_step


def _plot_lines(ax, df, value_col: str = "llc_mean", err_col: Optional[str] = "llc_sem",
                colours: Optional[dict] = None) -> None:
    """One line per component of ``df`` over ``step``, ±``err_col`` band. Each line gets its own (colour, line
    style, marker) (``line_styles``); with ``colours`` given (they may encode a category, e.g. a cluster) every
    line of the panel also gets its own (line style, marker)."""
    names = sorted(df["component"].unique(), key=sort_key)
    styles = line_styles(names, colours, groups=dict.fromkeys(names, 0) if colours else None)
    for name in names:
        g = df[df["component"] == name].sort_values("step")
        x, y = g["step"].to_numpy(), g[value_col].to_numpy(float)
        ax.plot(x, y, markersize=3.5, linewidth=1.4, label=name, **styles[name])
        if err_col is not None and err_col in g:
            e = g[err_col].to_numpy(float)
            ok = np.isfinite(e)
            ax.fill_between(x[ok], (y - e)[ok], (y + e)[ok], color=styles[name]["color"], alpha=0.15, linewidth=0)


def plot_head_curves(df, path, title: str, value_col: str = "llc_mean", ylabel: str = RLLC_LABEL,
                     err_col: Optional[str] = "llc_sem", colours: Optional[dict] = None,
                     key_colours: Optional[dict] = None, key_title: str = "colour") -> Path:
    """Per-head curves of ``df`` (see ``head_curves_figure``) written as a PNG to ``path``."""
    return save_figure(head_curves_figure(df, title, value_col, ylabel, err_col, colours, key_colours, key_title), path)


def head_curves_figure(df, title: str, value_col: str = "llc_mean", ylabel: str = RLLC_LABEL,
                       err_col: Optional[str] = "llc_sem", colours: Optional[dict] = None,
                       key_colours: Optional[dict] = None, key_title: str = "colour"):
    """A matplotlib figure of per-head curves of ``df`` (rows of one data distribution, component set
    'heads'): one panel per layer (at most 4 panels a row), one line per head (legend ``l:h``; each head its
    own colour, line style and marker), ±1 SEM band, log step axis, every axis labelled.
    ``colours``: ``{"l:h": colour}`` (e.g. a clustering's colour families), else a qualitative palette;
    ``key_colours``: ``{meaning: colour}`` of those colours (e.g. ``Clustering.colour_key()``), drawn as a
    figure legend titled ``key_title``."""
    df = df.copy()
    df["layer"] = [head_key(c)[0] for c in df["component"]]
    layer_ids = sorted(df["layer"].unique())
    cols = min(4, len(layer_ids))
    rows = -(-len(layer_ids) // cols)
    fig, axes = subplots(rows, cols, figsize=(5.2 * cols + (1.4 if key_colours else 0), 4.2 * rows), layout="constrained",
                         squeeze=False, sharey=True)
    for ax, layer in zip(axes.flat, layer_ids):
        sub = df[df["layer"] == layer]
        _plot_lines(ax, sub, value_col, err_col, colours)
        log_step_axis(ax, sub["step"])
        ax.set_ylabel(ylabel)
        ax.set_title(f"layer {layer}")
        ax.legend(fontsize=8, ncol=2, title="head l:h", title_fontsize=8, loc="best")
    for ax in list(axes.flat)[len(layer_ids):]:
        fig.delaxes(ax)
    if key_colours:
        colour_key(fig, key_colours, key_title)
    fig.suptitle(title)
    return fig


def plot_component_curves(df, path, title: str, ylabel: str = LLC_LABEL) -> Path:
    """``component_curves_figure`` written as a PNG to ``path``."""
    return save_figure(component_curves_figure(df, title, ylabel), path)


def component_curves_figure(df, title: str, ylabel: str = LLC_LABEL):
    """One panel, one line per (data, component) of ``df`` (whole-model or layer rows), each its own (colour,
    line style, marker), ±1 SEM band."""
    df = df.copy()
    if df["data"].nunique() > 1:
        df["component"] = df["component"] + " on " + df["data"]
    fig, ax = subplots(figsize=(6.4, 4.2), layout="constrained")
    _plot_lines(ax, df)
    log_step_axis(ax, df["step"])
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def head_difference(df, data_a: str, data_b: str):
    """Per-head ``llc(data_a) - llc(data_b)`` at each checkpoint both have (paired by content id where ``df``
    has ``checkpoint_id``, else by name); SEMs added in quadrature."""
    heads = df[df["component_set"] == "heads"]
    by = ["checkpoint_id" if "checkpoint_id" in df else "checkpoint", "step", "component"]
    by += ["config_key"] if "config_key" in df else []  # a difference is of one configuration
    a = heads[heads["data"] == data_a].set_index(by)
    b = heads[heads["data"] == data_b].set_index(by)
    both = a.join(b, lsuffix="_a", rsuffix="_b", how="inner")
    if both.empty and len(a) and len(b):
        raise ValueError(f"data {data_a!r} and {data_b!r} have no per-head estimates of one configuration at a "
                         "common checkpoint; select one configuration (`rllc plot --config-key KEY`)")
    out = both.reset_index()[by].copy()
    out["llc_mean"] = (both["llc_mean_a"] - both["llc_mean_b"]).to_numpy()
    out["llc_sem"] = np.sqrt(both["llc_sem_a"].to_numpy() ** 2 + both["llc_sem_b"].to_numpy() ** 2)
    out["data"] = f"{data_a} - {data_b}"
    return out


def check_differences(df, differences: Sequence[tuple]) -> None:
    """Raise ``ValueError`` when a data name of ``differences`` has no per-head rows in ``df``, listing those
    that have (a misspelt name must not be skipped silently)."""
    have = list(dict.fromkeys(df.loc[df["component_set"] == "heads", "data"]))
    for pair in differences:
        for name in pair:
            if name not in have:
                raise ValueError(f"differences (--diff): no per-head rLLCs on data {name!r}; per-head rLLCs are "
                                 f"stored on: {', '.join(map(repr, have)) or 'no data'}")


def make_figures(df, out_dir, differences: Sequence[tuple] = (), colours: Optional[dict] = None,
                 key_colours: Optional[dict] = None, key_title: str = "colour") -> List[tuple]:
    """Every figure the rows ``df`` (``ResultStore.rows()``) allow, as ``[(png path, caption)]``; each caption
    ends with the settings of the rows drawn (``describe_settings``). ``differences``: pairs of data names to
    plot per-head differences for (default: every data distribution minus the alphabetically first);
    ``colours``: ``{"l:h": colour}`` for the per-head figures, ``key_colours`` ``{meaning: colour}`` their legend."""
    out_dir = Path(out_dir)
    figures = []
    data_names = list(dict.fromkeys(df["data"]))
    heads = df[df["component_set"] == "heads"]
    check_differences(df, differences)
    for name in data_names:
        sub = heads[heads["data"] == name]
        if not sub.empty:
            p = plot_head_curves(sub, out_dir / f"heads_{_slug(name)}.png", f"per-head rLLC on {name}",
                                 colours=colours, key_colours=key_colours, key_title=key_title)
            figures.append((p, f"Per-head rLLC on {name} over training (one panel per layer, ±1 SEM band). "
                               f"{describe_settings(sub)}"))
    pairs = list(differences) or [(n, data_names[0]) for n in data_names[1:]]
    for a, b in pairs:
        diff = head_difference(df, a, b)
        if not diff.empty:
            p = plot_head_curves(diff, out_dir / f"heads_diff_{_slug(a)}_minus_{_slug(b)}.png",
                                 f"per-head rLLC: {a} minus {b}", ylabel=f"{RLLC_DIFFERENCE_LABEL} ({a} $-$ {b})",
                                 colours=colours, key_colours=key_colours, key_title=key_title)
            drawn = heads[heads["data"].isin([a, b]) & heads["step"].isin(set(diff["step"]))]
            figures.append((p, f"Per-head rLLC on {a} minus on {b} (paired by checkpoint and head; ±1 SEM band, "
                               f"SEMs added in quadrature). {describe_settings(drawn)}"))
    for set_name, label, ylabel in (("layers", "per-layer rLLC", RLLC_LABEL), ("whole", "whole-model LLC", LLC_LABEL)):
        sub = df[df["component_set"] == set_name]
        if not sub.empty:
            p = plot_component_curves(sub, out_dir / f"{set_name}.png", label, ylabel)
            figures.append((p, f"{label[0].upper()}{label[1:]} over training (±1 SEM band). {describe_settings(sub)}"))
    return figures


#: ``metric: (name, y-axis label)`` of the Hessian metrics' figures.
METRIC_LABELS = {"hessian-trace": ("Hessian trace", "Hessian trace  Tr $H_{VV}$ (loss in nats)"),
                 "fim-trace": ("FIM trace", "FIM trace  Tr $F_{VV}$ (log-likelihood in nats)"),
                 "hessian-rank": ("approximate Hessian rank", "Hessian eigenvalues > tau (count)")}


def metric_figures(mdf, out_dir) -> List[tuple]:
    """Figures of the Hessian metrics (``ResultStore.metric_rows()``): per metric and data, per-head curves
    (one panel per layer) and whole/layer curves, ±1 standard error, as ``[(png path, caption)]`` (captions
    end with ``describe_settings`` of the rows drawn)."""
    out_dir = Path(out_dir)
    figures = []
    df = mdf.rename(columns={"value": "llc_mean", "sem": "llc_sem"})
    for (metric, data), sub in df.groupby(["metric", "data"], sort=True):
        label, ylabel = METRIC_LABELS.get(metric, (metric, metric))
        heads = sub[sub["component_set"] == "heads"]
        if not heads.empty:
            p = plot_head_curves(heads, out_dir / f"{_slug(metric)}_heads_{_slug(data)}.png",
                                 f"per-head {label} on {data}", ylabel=ylabel)
            figures.append((p, f"Per-head {label} on {data} over training (±1 standard error), beside the rLLCs. "
                               f"{describe_settings(heads)}"))
        for set_name in ("layers", "whole"):
            rest = sub[sub["component_set"] == set_name]
            if not rest.empty:
                p = plot_component_curves(rest, out_dir / f"{_slug(metric)}_{set_name}_{_slug(data)}.png",
                                          f"{label} ({set_name}) on {data}", ylabel=ylabel)
                figures.append((p, f"{label[0].upper()}{label[1:]} of {set_name} on {data} over training "
                                   f"(±1 standard error). {describe_settings(rest)}"))
    return figures


#: How ``describe_settings`` names the settings columns (``store.SETTINGS_COLUMNS``).
SETTING_NAMES = {"step_size": "step size", "nbeta": "nbeta", "localization": "localization", "num_chains": "chains",
                 "num_draws": "draws", "num_burnin": "burn-in", "thinning": "thinning", "batch_size": "batch size",
                 "sampler": "sampler", "seed": "seed", "engine": "engine"}


def describe_settings(rows) -> str:
    """What rows of ``ResultStore.rows()`` or ``metric_rows()`` were made from, as one sentence: each data
    name with its content hash, the checkpoints (count and steps), and per configuration (``config_key``)
    its settings: the SGLD settings columns of an rLLC configuration, the stored options (``config_json``)
    of a Hessian metric's."""
    def value(v):
        if v is None or (isinstance(v, float) and not np.isfinite(v)):
            return "full data"  # batch_size NULL: every step uses the whole data set
        return f"{v:g}" if isinstance(v, (float, np.floating)) else str(v)

    if rows.empty:
        return "Settings: no rows."
    data = ", ".join(f"{d} (hash {', '.join(sorted(set(g['data_hash']))) or '-'})"
                     for d, g in rows.groupby("data", sort=False))
    configs = []
    for key, g in rows.groupby("config_key", sort=False):
        first = g.iloc[0]
        if all(c in g for c in SETTINGS_COLUMNS):
            chains = sorted(set(int(c) for c in g["num_chains"]))
            settings = [f"{SETTING_NAMES[c]} {value(first[c])}" for c in SETTINGS_COLUMNS if c != "num_chains"]
            settings.insert(3, f"chains {'/'.join(map(str, chains))}")
        else:
            options = json.loads(first["config_json"]) if "config_json" in g else {}
            settings = [f"{k} {value(v)}" for k, v in sorted(options.items())]
        configs.append(f"config {key}: {', '.join(settings)}")
    return f"Settings: data {data}; {describe_steps(rows['step'])}; {'; '.join(configs)}."


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def write_report(store: ResultStore | str, out_dir, differences: Sequence[tuple] = (),
                 title: str = "rLLC sweep report", extra_html: str = "", colours: Optional[dict] = None,
                 config: str = "latest", key_colours: Optional[dict] = None, key_title: str = "colour",
                 decode=None) -> Path:
    """PNG figures plus ``index.html`` (figures captioned with their settings, the configurations, the table
    of estimates, failures) in ``out_dir``; ``colours``: ``{"l:h": colour}`` for the per-head curves (e.g.
    ``Clustering.colours()``), ``key_colours``: ``{meaning: colour}`` saying what those colours mean (e.g.
    ``Clustering.colour_key()``), a legend titled ``key_title`` on those figures. Observables rows (``rllc sweep
    --metric susceptibility|bif``) add a section (``rllc_fast.observables_report``; ``decode(token_id) -> text``
    shows the attributions page's tokens as text).

    ``store``: a ``ResultStore`` or a path (opened read-only: the report never changes the store).
    ``config``: which configuration's rows (``ResultStore.rows``): "latest" (default; warns with
    ``SeveralConfigsWarning`` when there are several), a config key (of the rLLC or of a Hessian metric: only
    that configuration is drawn), or "all": one set of figures per configuration, each in a subfolder
    ``config-KEY/``. Raises ``ValueError`` for a data name in ``differences`` without per-head rows, and for
    rows of several checkpoints at one step (runs would be mixed in one curve)."""
    store = store if isinstance(store, ResultStore) else ResultStore(store, readonly=True)
    out_dir = Path(out_dir)
    df, mdf = _report_rows(store, config)
    if df.empty and mdf.empty:
        raise ValueError(f"{store.path} holds no estimates yet; run `rllc sweep` first")
    check_differences(df, differences)
    figures = []
    groups = [(key, df[df["config_key"] == key], mdf[mdf["config_key"] == key])
              for key in dict.fromkeys(list(df["config_key"]) + list(mdf["config_key"]))] \
        if config == "all" else [(None, df, mdf)]
    for key, d, m in groups:
        where = f"{store.path}" + (f" (config {key})" if key else "")
        check_one_checkpoint_per_step(d, where)
        check_one_checkpoint_per_step(m, where)
        folder = out_dir / f"config-{key}" if key else out_dir
        pairs = [p for p in differences if set(p) <= set(d.loc[d["component_set"] == "heads", "data"])]
        found = (make_figures(d, folder, pairs, colours, key_colours, key_title) if not d.empty else []) + \
            metric_figures(m, folder)
        figures += [(path, f"[config {key}] {caption}" if key else caption) for path, caption in found]
    failures = store.failures()
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}img{max-width:100%;border:1px solid #ddd}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
             "th{background:#f0f0f0}.bad{color:#b00}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p>Store: <code>{html.escape(os.path.abspath(store.path))}</code>; {len(df)} rLLC estimates and "
             f"{len(mdf)} Hessian-metric estimates over "
             f"{pd_nunique(df, mdf, 'checkpoint_id')} checkpoints, data {', '.join(map(html.escape, pd_unique(df, mdf, 'data')))}.</p>",
             extra_html]
    observed = observables_section(store, out_dir, decode)
    for path, caption in figures:
        what, _, settings = caption.partition(" Settings: ")
        parts.append(f"<figure><img src='{html.escape(path.relative_to(out_dir).as_posix())}' "
                     f"alt='{html.escape(what)}'><figcaption>{html.escape(what)}"
                     + (f"<br><small>Settings: {html.escape(settings)}</small>" if settings else "")
                     + "</figcaption></figure>")
    parts.append(observed)
    shown = store.configs()
    shown = shown[shown["config_key"].isin(set(df["config_key"]) | set(mdf["config_key"]))]
    parts.append("<h2>Configurations</h2><p>The settings of the rows shown (config_key: a hash of the settings; "
                 "<code>rllc plot --config-key KEY</code> selects one): the SGLD settings of an rLLC configuration, "
                 "the options of a Hessian metric's; the tables below name each row's config_key.</p>")
    parts.append(_configs_table(shown).to_html(index=False, na_rep="-"))
    if not failures.empty:
        parts.append("<h2 class='bad'>Failed units</h2>")
        parts.append(failures[["checkpoint", "step", "data", "component_set", "error"]].to_html(index=False, escape=True))
    if not df.empty:
        parts.append("<h2>Estimates</h2><p>llc_mean ± llc_sem over non-diverged chains; num_diverged counts chains "
                     "lost to NaN/Inf (excluded, never averaged in).</p>")
        table = df[["step", "checkpoint", "data", "component_set", "component", "llc_mean", "llc_std", "llc_sem",
                    "init_loss", "num_chains", "num_diverged", "config_key"]]
        parts.append(table.to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="diverged"))
        parts.append(diagnostics_section(df))
    if not mdf.empty:
        parts.append("<h2>Hessian metrics</h2><p>value ± sem (standard error over probes, or over batches for the "
                     "FIM trace).</p>")
        parts.append(mdf[["metric", "step", "checkpoint", "data", "component_set", "component", "value", "sem",
                          "num_samples", "config_key"]].to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="-"))
    parts.append("</body></html>")
    return write_atomically(out_dir / "index.html", lambda tmp: Path(tmp).write_text("\n".join(parts), encoding="utf-8"))


def _configs_table(configs):
    """``ResultStore.configs()`` for the page: ``config_json`` replaced by a column ``options`` that spells out a
    Hessian metric's options (its settings columns are empty; an rLLC configuration's are its columns)."""
    table = configs.drop(columns=["config_json"])
    options = ["" if t == "estimates" else ", ".join(f"{k} {v}" for k, v in sorted(json.loads(j).items()))
               for t, j in zip(configs["table"], configs["config_json"])]
    table.insert(3, "options", options)
    return table


def _report_rows(store: ResultStore, config: str):
    """``(rows, metric rows)`` of ``store`` that ``config`` selects; a config key selects from the table that
    holds it (the other comes back empty). ``ValueError`` listing the stored keys for an unknown key."""
    if config in ("latest", "all"):
        return store.rows(config), store.metric_rows(config=config)
    configs = store.configs()
    tables = set(configs.loc[configs["config_key"] == config, "table"])
    if not tables:
        listed = "; ".join(f"{k} ({t}{'' if m == 'llc' else ' ' + m}, step_size {s:g})" if t == "estimates" else
                           f"{k} ({m})" for k, t, m, s in zip(configs["config_key"], configs["table"],
                                                              configs["metric"], configs["step_size"]))
        raise ValueError(f"config key {config!r} is not in {store.path}; stored: {listed or 'none'}")
    df = store.rows(config) if "estimates" in tables else store.rows("all").iloc[0:0]
    mdf = store.metric_rows(config=config) if "metrics" in tables else store.metric_rows(config="all").iloc[0:0]
    return df, mdf


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
    (d) whole-model LLC on ``base``. Each head has its own (colour, line style, marker); its legend entry
    names the head and its type, and a figure legend says which colour is which type."""
    fig, axes = subplots(2, 2, figsize=(13.4, 8.4), layout="constrained")
    heads = df[df["component_set"] == "heads"]
    a = heads[heads["data"] == base]
    diff = head_difference(df, refined, base)
    order = sorted(a["component"].unique(), key=head_key)
    kinds = {name: head_types.get(name, "other") for name in order}
    styles = line_styles(order, {n: TYPE_COLORS.get(k, TYPE_COLORS["other"]) for n, k in kinds.items()})
    for name in order:
        g = a[a["component"] == name].sort_values("step")
        kw = dict(styles[name], markersize=3, linewidth=2 if kinds[name] != "other" else 1.2,
                  label=f"{name} {kinds[name]}")
        axes[0, 0].plot(g["step"], g["llc_mean"], **kw)
        d = diff[diff["component"] == name].sort_values("step")
        axes[0, 1].plot(d["step"], d["llc_mean"], **kw)
    axes[0, 0].set_title(f"(a) per-head wrLLC on {base}")
    axes[0, 0].set_ylabel(RLLC_LABEL)
    axes[0, 0].legend(fontsize=7, ncol=2, title="head l:h, type", title_fontsize=7)
    axes[0, 1].axhline(0.0, color="black", linewidth=0.8)
    axes[0, 1].set_title(f"(b) drLLC on {refined} minus wrLLC on {base}")
    axes[0, 1].set_ylabel(f"{RLLC_DIFFERENCE_LABEL} ({refined} $-$ {base})")
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
    axes[1, 1].set_ylabel(LLC_LABEL)
    for ax in axes.flat:
        log_step_axis(ax, steps)
        ax.set_xlim(min(steps), max(steps) * 1.1)
    present = list(dict.fromkeys(kinds[n] for n in order))
    colour_key(fig, {k: TYPE_COLORS.get(k, TYPE_COLORS["other"]) for k in present}, "head type (colour)")
    if title:
        fig.suptitle(title)
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

    columns = DIAGNOSTIC_COLUMNS
    if df.empty or not set(columns) <= set(df.columns):
        return ""
    found = {i: problems(row) for i, row in zip(df.index, df[columns].to_dict("records"))}
    for _, g in df.groupby(["checkpoint_id", "data", "data_hash", "config_key"], sort=False):  # one estimate's peers
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

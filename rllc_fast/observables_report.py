"""The observables part of ``rllc plot``'s report: the response matrix of each (data, component set) at its
last checkpoint, its principal components as a figure, the aggregate susceptibilities as a table, and a page
of per-token attributions (the top contexts of every component and probe set, each predicted token coloured
by its signed susceptibility), plus a table of stored Bayesian-influence rows.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from .atomic import write_atomically
from .observable_jobs import load_susceptibility_arrays, observations_root
from .observations import LabelledArray, Observations
from .plotting import head_key
from .susceptibility import response_pca

TOP_CONTEXTS = 3  # contexts per component and probe set on the attributions page


def observables_section(store, out_dir, decode: Optional[Callable[[int], str]] = None,
                        top_k: int = TOP_CONTEXTS) -> str:
    """HTML for the report (figures and pages written into ``out_dir``); '' when the store has no observables
    rows. ``decode(token_id) -> text`` shows tokens as text on the attributions page (default: their ids)."""
    from .analysis.figures import plot_response_pca  # (the analysis package imports much; only when drawn)
    from .analysis.response import ResponsePCA

    out_dir = Path(out_dir)
    sus = store.observable_rows("susceptibility")
    bif = store.observable_rows("bif")
    if sus.empty and bif.empty:
        return ""
    parts = ["<h2>Susceptibilities</h2>"] if not sus.empty else []
    for (data, comp_set), rows in sus.groupby(["data", "component_set"], sort=False):
        last = rows[rows["step"] == rows["step"].max()]
        step, info = int(last["step"].iloc[0]), last["info"].iloc[0]
        arrays = load_susceptibility_arrays(store.path, info)
        names = [str(c) for c in arrays["components"]]
        probes = sorted({k.split("/", 1)[1] for k in arrays if k.startswith("per_token/")})
        matrix = np.concatenate([arrays[f"per_token/{p}"].reshape(len(names), -1) for p in probes], axis=1)
        types = _head_types(store, data, step)
        slug = "".join(c if c.isalnum() else "-" for c in f"{data}-{comp_set}-step{step}")
        caption = (f"Components of '{comp_set}' at step {step} on data '{data}' in the first two principal components "
                   f"of the per-token response matrix ({matrix.shape[1]} tokens of probe sets {', '.join(probes)}; "
                   f"sampling probe '{info['sampling']}'), coloured by head type (from `rllc analyze scores`; "
                   "'other' where none is stored).")
        if len(names) >= 2 and np.isfinite(matrix).all():
            scores, explained, loadings = response_pca(matrix, k=2)
            labelled = LabelledArray(matrix, ("component", "token"),
                                     {"component": names, "token": list(range(matrix.shape[1]))})
            pca = ResponsePCA(per="token", matrix=labelled, scores=scores, explained=explained, loadings=loadings,
                              head_types=types)
            path = plot_response_pca({"response matrix per probe token": pca},
                                     out_dir / f"susceptibility-pca-{slug}.png",
                                     title=f"response matrix PCA: {data}, step {step}")
            parts.append(f"<figure><img src='{html.escape(path.name)}' alt='response matrix PCA'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        else:
            parts.append(f"<p>{html.escape(data)} / {html.escape(comp_set)}: no PCA (fewer than 2 components with "
                         "finite susceptibilities).</p>")
        table = last.pivot_table(index="component", columns="probe", values=["value", "sem"])
        parts.append(f"<p>Aggregate susceptibility (mean over the probe set's tokens) ± standard error (the chains' "
                     "spread and the whole-model run's noise), "
                     f"step {step}, data {html.escape(data)}:</p>" + table.to_html(float_format=lambda x: f"{x:.3g}"))
        page = attributions_page(store, last, arrays, names, probes, out_dir / f"attributions-{slug}.html", decode,
                                 top_k)
        parts.append(f"<p><a href='{html.escape(page.name)}'>Per-token attributions</a> (top {top_k} contexts per "
                     "component and probe set).</p>")
    if not bif.empty:
        parts.append("<h2>Bayesian influence</h2><p>Mean influence over each matrix (correlation across draws); the "
                     "matrices are the files named in the store's rows (<code>ResultStore.observable_rows('bif')</code>)."
                     "</p>")
        parts.append(bif[["step", "checkpoint", "data", "component", "probe", "value", "num_samples"]]
                     .to_html(index=False, float_format=lambda x: f"{x:.3g}"))
    return "\n".join(parts)


def attributions_page(store, rows, arrays: Dict[str, np.ndarray], names: List[str], probes: List[str], path,
                      decode: Optional[Callable[[int], str]] = None, top_k: int = TOP_CONTEXTS) -> Path:
    """An HTML page: per component and probe set, the ``top_k`` contexts with the largest |summed per-token
    susceptibility|, each predicted token coloured red (positive) or blue (negative) by its susceptibility."""
    info = rows["info"].iloc[0]
    obs = Observations.load(observations_root(store.path) / info["folder"] / "observations")
    scale = max(float(np.nanmax(np.abs(arrays[f"per_token/{p}"]))) for p in probes) or 1.0
    show = decode or (lambda t: str(int(t)))
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>per-token attributions</title><style>"
             "body{font-family:sans-serif;margin:2em}.ctx{font-family:monospace;margin:4px 0;line-height:1.8}"
             ".ctx span{padding:1px 2px;margin-right:2px;border-radius:2px}</style></head><body>",
             f"<h1>Per-token susceptibilities, step {int(rows['step'].iloc[0])}, data {html.escape(rows['data'].iloc[0])}</h1>",
             "<p>Each predicted token is coloured by its susceptibility: red positive, blue negative, intensity "
             f"relative to the largest |value| on this page ({scale:.3g}). The first token of a context predicts "
             "nothing and is grey.</p>"]
    for k, name in sorted(enumerate(names), key=lambda kv: head_key(kv[1]) if ":" in kv[1] else (999, 0)):
        parts.append(f"<h2>{html.escape(name)}</h2>")
        for p in probes:
            chi = arrays[f"per_token/{p}"][k]                                  # [N, P]
            tokens = obs.tokens.get(p)
            order = np.argsort(-np.abs(np.nansum(chi, axis=1)))[:top_k]
            parts.append(f"<h3>{html.escape(p)}</h3>")
            for i in order:
                spans = [f"<span style='background:#eee'>{html.escape(show(tokens[i, 0]))}</span>"] if tokens is not None else []
                for j, v in enumerate(chi[i]):
                    text = show(tokens[i, j + 1]) if tokens is not None else f"#{j + 1}"
                    a = min(1.0, abs(v) / scale)
                    colour = f"rgba(214,39,40,{a:.2f})" if v > 0 else f"rgba(31,119,180,{a:.2f})"
                    spans.append(f"<span style='background:{colour}' title='{v:.3g}'>{html.escape(text)}</span>")
                parts.append(f"<div class='ctx'>context {int(i)} (sum {np.nansum(chi[i]):.3g}): {''.join(spans)}</div>")
    parts.append("</body></html>")
    return write_atomically(path, lambda tmp: Path(tmp).write_text("\n".join(parts), encoding="utf-8"))


def _head_types(store, data: str, step: int) -> Dict[str, str]:
    """``{head: type}`` from the store's ``head-type`` analysis at ``step`` (any data when none for ``data``)."""
    rows = store.analysis_rows("head-type")
    if rows.empty:
        return {}
    at = rows[rows["step"] == step]
    if at.empty:
        at = rows[rows["step"] == rows["step"].max()]
    same = at[at["data"] == data]
    at = same if not same.empty else at
    return dict(zip(at["head"], at["other"]))

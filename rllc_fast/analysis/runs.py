"""The analyses of ``rllc analyze`` over a checkpoint series, writing long-format rows to a ``ResultStore``
(table ``analyses``) and one figure each (see each function for what it returns)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import torch

from ..plotting import describe_steps
from ..progress import progress_iter
from ..store import ResultStore, check_one_checkpoint_per_step
from . import figures
from .head_scores import scores_by_head
from ..components import head_name, parse_head_name


def _models(series, desc: str, progress: bool, like=None):
    """``(checkpoint, model)`` pairs, each model loaded only when its turn comes (one in memory at a time)."""
    for ck in progress_iter(series, desc, progress, unit="ckpt"):
        yield ck, ck.load(like=like)


def _data_note(data: str, tokens: torch.Tensor) -> str:
    """``"data NAME: N contexts x T tokens"``, for the note of a figure."""
    return f"data {data}: {tokens.shape[0]} contexts x {tokens.shape[1]} tokens"


def analyze_scores(series, tokens: torch.Tensor, data: str, store: ResultStore, out_dir, thresholds: Mapping[str, float] = {},
                   low: int = 0, vocab: Optional[int] = None, like=None, progress: bool = True):
    """Head scores (``score_heads``) at every checkpoint on ``tokens``, and ``classify_heads`` at the last one
    (analysis ``head-type``, the label in ``other``). Figure ``head_scores.png``. Returns ``(the head-score
    rows of ``data``, {head: label})``."""
    from .head_scores import classify_heads, score_heads

    rows, final = [], None
    for ck, model in _models(series, "head scores", progress, like):
        length = min(24, model.cfg.n_ctx // 2)
        scores = score_heads(model, tokens, length=length, num=32, low=low, vocab=vocab)
        for kind, matrix in scores.items():
            rows += [{"checkpoint": ck.name, "step": ck.step, "data": data, "name": kind, "head": head, "value": v}
                     for head, v in scores_by_head(matrix).items()]
        final = (ck, scores)
    store.write_analysis("head-score", rows)
    ck, scores = final
    labels = classify_heads(scores, **thresholds)
    store.write_analysis("head-type", [{"checkpoint": ck.name, "step": ck.step, "data": data, "head": h, "other": t,
                                        "value": None, "info": dict(thresholds)} for h, t in labels.items()])
    df = store.analysis_rows("head-score")
    df = df[df["data"] == data]
    rules = ", ".join(f"{k.replace('_', '-')} >= {v:g}" for k, v in thresholds.items())
    note = (f"{_data_note(data, tokens)}; {describe_steps(df['step'])}; types at step {ck.step}"
            + (f" ({rules})" if rules else ""))
    figures.plot_per_head_over_training(df, Path(out_dir) / "head_scores.png", f"head scores on {data}",
                                        "score (mean attention probability)",
                                        colours={h: figures.TYPE_COLORS.get(t, figures.TYPE_COLORS["other"])
                                                 for h, t in labels.items()},
                                        key_colours=figures.type_key(labels), key_title="head type (colour)", note=note)
    return df, labels


def analyze_composition(series, store: ResultStore, out_dir, head_types: Optional[Dict[str, str]] = None,
                        like=None, progress: bool = True):
    """Q-, K-, V-composition of every head pair at every checkpoint; figures ``composition_{Q,K,V}.png``.
    Returns the store's composition rows."""
    from .composition import composition_rows

    rows = []
    for ck, model in _models(series, "composition", progress, like):
        rows += [{"checkpoint": ck.name, "step": ck.step, "name": r["kind"], "head": r["earlier"], "other": r["later"],
                  "value": r["score"]} for r in composition_rows(model, ck.step)]
    store.write_analysis("composition", rows)
    df = store.analysis_rows("composition")
    note = describe_steps(df["step"]) + ("; head types of `rllc analyze scores`" if head_types else "")
    for kind in ("Q", "K", "V"):
        figures.plot_composition(df, Path(out_dir) / f"composition_{kind}.png", kind, head_types, note)
    return df


def analyze_ablation(series, tokens: torch.Tensor, data: str, store: ResultStore, out_dir, kinds: Sequence[str] = ("mean",),
                     heads=None, like=None, progress: bool = True):
    """Ablation scores of each head (``kinds``) and the per-head ICL score with that head mean-ablated, at
    every checkpoint; figures ``ablation.png`` and ``icl.png``. Returns the ablation and ICL rows of ``data``."""
    from .ablation import ablation_scores
    from .icl import per_head_icl_scores

    rows, icl = [], []
    for ck, model in _models(series, "ablations", progress, like):
        for kind in kinds:
            for head, value in ablation_scores(model, tokens, heads, kind).items():
                rows.append({"checkpoint": ck.name, "step": ck.step, "data": data, "name": kind, "head": head,
                             "value": value})
        for head, value in per_head_icl_scores(model, tokens, heads).items():
            icl.append({"checkpoint": ck.name, "step": ck.step, "data": data, "name": "mean-ablated", "head": head,
                        "value": value})
    store.write_analysis("ablation", rows)
    store.write_analysis("icl", icl)
    ab = store.analysis_rows("ablation")
    ab = ab[ab["data"] == data]
    note = f"{_data_note(data, tokens)}; {describe_steps(ab['step'])}"
    figures.plot_per_head_over_training(ab, Path(out_dir) / "ablation.png", f"ablation scores on {data}",
                                        "loss increase (nats/token)", note=f"{note}; ablations {', '.join(kinds)}")
    ic = store.analysis_rows("icl")
    ic = ic[ic["data"] == data]
    figures.plot_per_head_over_training(ic, Path(out_dir) / "icl.png", f"ICL score on {data} with one head mean-ablated",
                                        "ICL score (nats)", styles={"none": "--"}, colours={"none": "black"},
                                        note=f"{note}; head 'none': no ablation")
    return ab, ic


def analyze_tokens(checkpoint, tokens: torch.Tensor, data: str, store: ResultStore, out_dir, k: int = 1000,
                   brackets: Optional[Mapping[int, int]] = None, heads=None, like=None, progress: bool = True):
    """Tokens-in-context patterns of each head at one checkpoint (mean ablation, top ``k``); figure
    ``tokens_in_context.png``. Returns ``{head: pattern_summary}``."""
    from .ablation import head_names, parse_heads
    from .tokens_in_context import head_tokens_in_context

    model = checkpoint.load(like=like)
    names = [head_name(l, h) for l, h in parse_heads(model, heads if heads is not None else head_names(model))]
    summaries, rows = {}, []
    for head in progress_iter(names, f"tokens in context (step {checkpoint.step})", progress, unit="head"):
        _, summary = head_tokens_in_context(model, tokens, head, k, "mean", brackets)
        summaries[head] = summary
        base = {"checkpoint": checkpoint.name, "step": checkpoint.step, "data": data, "head": head}
        rows += [{**base, "name": p, "value": v} for p, v in summary["percent"].items()]
        rows.append({**base, "name": "unique_multigrams", "value": summary["unique_multigrams"],
                     "info": summary["unique"]})
    store.write_analysis("tokens", rows)
    figures.plot_token_patterns(summaries, Path(out_dir) / "tokens_in_context.png",
                                f"tokens in context at step {checkpoint.step} on {data} (top {k} per head)",
                                note=f"{_data_note(data, tokens)}; checkpoint {checkpoint.name}; mean ablation; "
                                     f"{len(brackets or {})} bracket pairs")
    return summaries


def head_curves(store: ResultStore, data: str, layer: Optional[int] = None, component_set: str = "heads"):
    """``(steps, {head: rLLC curve})`` of one data distribution from a sweep's store (optionally one layer), of
    the latest configuration per checkpoint (``ResultStore.rows``). Raises ``ValueError`` when the store has no
    such rows (listing the data names it has), or rows of several checkpoints at one step."""
    df = store.rows()
    df = df[df["component_set"] == component_set]
    have = list(dict.fromkeys(df["data"]))
    df = df[df["data"] == data]
    if df.empty:
        what = "per-head" if component_set == "heads" else f"{component_set!r}"
        raise ValueError(f"{store.path} has no {what} estimates on data {data!r}; it has them on: "
                         f"{', '.join(map(repr, have)) or 'no data'} (or run `rllc sweep` for {data!r} first)")
    check_one_checkpoint_per_step(df, str(store.path))
    if layer is not None:
        df = df[[parse_head_name(c)[0] == layer for c in df["component"]]]
        if df.empty:
            raise ValueError(f"no heads of layer {layer} on data {data!r} in {store.path}")
    table = df.pivot_table(index="step", columns="component", values="llc_mean", aggfunc="first", dropna=False)
    return table.index.to_numpy(), {h: table[h].to_numpy(float) for h in table.columns}


def analyze_clusters(store: ResultStore, data: Sequence[str], n_clusters: int, method: str, out_dir,
                     layer: Optional[int] = None, seed: int = 0, resample: bool = False, apply_to: Sequence[ResultStore] = ()):
    """Cluster the per-head rLLC curves on ``data`` (one or several, concatenated) of ``store``; write the
    labels (analysis ``cluster``), ``clusters.json`` (labels, scores, colours: feed it to ``rllc plot
    --clusters``) and ``clusters.png``; label the heads of the ``apply_to`` stores' runs with the same
    clustering (Appendix G): those stores are only read, their labels are written to ``store`` (analysis
    ``cluster``, name ``TAG-applied``, ``other`` the store's path) and ``clusters.json``. Returns
    ``(clustering, {store path: labels})``."""
    from ..atomic import write_json_atomically
    from .clustering import cluster_curves

    parts = [head_curves(store, d, layer) for d in data]
    clustering = cluster_curves([c for _, c in parts], n_clusters, method, seed, resample)
    tag = f"{method}-k{n_clusters}" + (f"-layer{layer}" if layer is not None else "")
    info = {"data": list(data), "scores": clustering.scores}
    store.write_analysis("cluster", [{"data": "+".join(data), "name": tag, "head": h, "value": c, "info": info}
                                     for h, c in clustering.labels.items()])
    applied = {}
    for other in apply_to:
        labels = clustering.predict([head_curves(other, d, layer)[1] for d in data])
        store.write_analysis("cluster", [{"data": "+".join(data), "name": f"{tag}-applied", "head": h,
                                          "other": str(other.path), "value": c} for h, c in labels.items()])
        applied[str(other.path)] = labels
    colours = clustering.colours()
    out_dir = Path(out_dir)
    write_json_atomically(out_dir / "clusters.json", {**clustering.to_dict(), "data": list(data), "layer": layer,
                                                      "colours": colours, "applied": applied}, indent=1)
    note = (f"{describe_steps(parts[0][0])}; seed {seed}" + (f"; layer {layer} only" if layer is not None else "")
            + ("; curves resampled" if resample else "") + "; "
            + ", ".join(f"{k} {v:.3g}" for k, v in clustering.scores.items()))
    figures.plot_clusters([c for _, c in parts], [s for s, _ in parts], list(data), colours, clustering.labels,
                          out_dir / "clusters.png",
                          f"{method} clustering, {n_clusters} clusters, on {' + '.join(data)}", note)
    return clustering, applied

"""Every figure the package draws (issue 18, "Figures"): every axis labelled, every head told apart by its own
(colour, line style, marker) and a legend entry, a legend of what colour means where colour encodes a head
type or a cluster; and `index.html` states the settings each figure was made from."""
import re

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.colors import to_rgba
from matplotlib.patches import Patch

from rllc_fast import SGLDConfig
from rllc_fast.analysis.clustering import cluster_key
from rllc_fast.analysis.figures import (clusters_figure, composition_figure, per_head_over_training_figure,
                                        token_patterns_figure, type_key)
from rllc_fast.models import attn_only, save_checkpoint
from rllc_fast.plotting import TYPE_COLORS, line_styles
from rllc_fast.report import (component_curves_figure, describe_settings, head_curves_figure, head_types_figure,
                              write_report)
from rllc_fast.store import ResultStore
from rllc_fast.sweep import run_sweep

HEAD = re.compile(r"^\d+:\d+")
STEPS = [0, 10, 100, 1000]


# ---- checks on a matplotlib Figure ------------------------------------------------------------------
def unlabelled_axes(fig):
    """Axes with a shown x- or y-axis and no label on it (a twin's hidden x-axis needs none)."""
    return [ax for ax in fig.axes if ax.get_visible() and ((ax.xaxis.get_visible() and not ax.get_xlabel())
                                                           or (ax.yaxis.get_visible() and not ax.get_ylabel()))]


def legends(fig):
    return [ax.get_legend() for ax in fig.axes if ax.get_legend()] + list(fig.legends)


def legend_labels(fig):
    return {t.get_text() for leg in legends(fig) for t in leg.get_texts()}


def colour_keys(fig):
    """``{label: rgba}`` of legend entries that are colour patches (what a colour means)."""
    return {t.get_text(): to_rgba(h.get_facecolor()) for leg in legends(fig)
            for t, h in zip(leg.get_texts(), leg.legend_handles) if isinstance(h, Patch)}


def look(line):
    return to_rgba(line.get_color()), line.get_linestyle(), line.get_marker()


def head_lines(ax):
    return [l for l in ax.get_lines() if HEAD.match(l.get_label())]


def assert_heads_told_apart(fig, min_lines=1):
    """In every panel, no two head lines look alike, and each has an entry in some legend."""
    labels = legend_labels(fig)
    drawn = 0
    for ax in fig.axes:
        lines = head_lines(ax)
        drawn += len(lines)
        looks = [look(l) for l in lines]
        assert len(set(looks)) == len(looks), (ax.get_title(), looks)
        missing = [l.get_label() for l in lines if l.get_label() not in labels]
        assert not missing, (ax.get_title(), missing)
    assert drawn >= min_lines


def assert_labelled(fig):
    assert not unlabelled_axes(fig), [(ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) for ax in unlabelled_axes(fig)]


# ---- tiny inputs ---------------------------------------------------------------------------------------
def head_rows(layers=2, heads=6, data="mix"):
    rng = np.random.default_rng(0)
    return pd.DataFrame([{"step": s, "checkpoint": f"step{s}.pt", "checkpoint_id": f"id{s}", "data": data,
                          "component_set": "heads", "component": f"{l}:{h}", "llc_mean": rng.normal(),
                          "llc_sem": 0.1} for s in STEPS for l in range(layers) for h in range(heads)])


TYPES = {**{f"0:{h}": "other" for h in range(6)}, "0:2": "previous-token", **{f"1:{h}": "induction" for h in range(6)},
         "1:2": "other"}  # five heads of one type, six of another: colour alone cannot tell them apart


def test_line_styles_give_each_name_of_a_colour_its_own_look():
    names = [f"0:{h}" for h in range(32)]
    one_colour = line_styles(names, dict.fromkeys(names, "red"))
    assert len({(s["linestyle"], s["marker"]) for s in one_colour.values()}) == 32
    palette = line_styles(names)  # 10 palette colours: the 11th name shares the 1st's colour, not its look
    assert len({(to_rgba(s["color"]), s["linestyle"], s["marker"]) for s in palette.values()}) == 32
    groups = line_styles(names[:4], {"0:0": "red", "0:1": "pink", "0:2": "red", "0:3": "pink"},
                         groups={"0:0": 0, "0:1": 0, "0:2": 1, "0:3": 1})  # shades of one cluster: other styles
    assert groups["0:0"]["linestyle"] != groups["0:1"]["linestyle"]


def test_report_figures_label_axes_and_tell_heads_apart():
    rows = head_rows(layers=5, heads=12)  # 5 layers: two rows of panels; 12 heads: palette colours repeat
    fig = head_curves_figure(rows, "t")
    assert [ax.get_title() for ax in fig.axes] == [f"layer {l}" for l in range(5)]  # the empty panels are gone
    assert_labelled(fig)
    assert_heads_told_apart(fig, min_lines=60)
    assert "rLLC" in fig.axes[0].get_ylabel() and "E[L]" in fig.axes[0].get_ylabel()
    # colours of a clustering: shades of one family per cluster, and a legend of the families
    clusters = {f"{l}:{h}": h % 2 for l in range(5) for h in range(12)}
    shades = {h: (0.8, 0.1, 0.1, 1.0) if c == 0 else (0.1, 0.1, 0.8, 1.0) for h, c in clusters.items()}
    fig = head_curves_figure(rows, "t", colours=shades, key_colours=cluster_key(clusters), key_title="cluster")
    assert_heads_told_apart(fig, min_lines=60)
    assert set(colour_keys(fig)) == {"cluster 0", "cluster 1"}
    whole = rows[rows.component == "0:0"].assign(component_set="whole", component="whole")
    fig = component_curves_figure(pd.concat([whole, whole.assign(data="code")]), "whole-model LLC")
    assert_labelled(fig)
    assert len({look(l) for l in fig.axes[0].get_lines()}) == 2


def test_demo_figure_keys_the_type_colours():
    base = head_rows(heads=6)
    whole = base[base.component == "0:0"].assign(component_set="whole", component="whole")
    df = pd.concat([base, base.assign(data="code"), whole], ignore_index=True)
    metrics = [{"step": s, "previous_token": [[0.1] * 6] * 2, "induction": [[0.2] * 6] * 2, "loss_first_copy": 4.0,
                "loss_repeat_copy": 3.0} for s in STEPS]
    fig = head_types_figure(df, metrics, TYPES, "mix", "code", title="demo")
    assert_labelled(fig)
    assert_heads_told_apart(fig, min_lines=24)
    keys = colour_keys(fig)
    assert keys == {t: to_rgba(TYPE_COLORS[t]) for t in ("other", "previous-token", "induction")}


def test_analysis_figures_label_axes_tell_heads_apart_and_key_colours():
    scores = pd.DataFrame([{"step": s, "name": kind, "head": f"{l}:{h}", "value": 0.1 * h}
                           for s in STEPS for kind in ("induction", "previous_token") for l in range(2) for h in range(6)])
    colours = {h: TYPE_COLORS[t] for h, t in TYPES.items()}
    fig = per_head_over_training_figure(scores, "head scores", "score", colours=colours, key_colours=type_key(TYPES),
                                        note="data mix")
    assert_labelled(fig)
    assert_heads_told_apart(fig, min_lines=24)
    assert set(colour_keys(fig)) == {"other", "previous-token", "induction"}
    assert "data mix" in fig._suptitle.get_text()

    comp = pd.DataFrame([{"step": s, "name": "K", "head": f"0:{a}", "other": f"1:{b}", "value": 0.1 * b}
                         for s in STEPS for a in range(6) for b in range(6)])
    fig = composition_figure(comp, "K", TYPES)
    assert_labelled(fig)
    assert_heads_told_apart(fig, min_lines=36)
    assert {"induction", "other"} <= set(colour_keys(fig))
    assert "K-composition" in fig.axes[0].get_ylabel()
    assert_heads_told_apart(composition_figure(comp, "K"))  # no types: palette colours

    summaries = {f"0:{h}": {"unique_multigrams": h, "percent": {"induction": 10, "dyck": 10, "skip-ngram": 10,
                                                               "ngram": 10, "unexplained": 60}} for h in range(4)}
    fig = token_patterns_figure(summaries, "tokens")
    assert_labelled(fig)
    assert {"induction", "unexplained", "unique multigrams"} <= legend_labels(fig)

    heads = [f"{l}:{h}" for l in range(2) for h in range(6)]
    clusters = {h: int(h.endswith(("0", "1", "2"))) for h in heads}
    from rllc_fast.analysis.clustering import Clustering

    shades = Clustering("kmeans", 2, clusters, {}, [4]).colours()
    curves = [{h: np.arange(4.0) * i for i, h in enumerate(heads)}] * 2
    fig = clusters_figure(curves, [STEPS, STEPS], ["mix", "code"], shades, clusters, "clusters")
    assert_labelled(fig)
    assert_heads_told_apart(fig, min_lines=24)
    assert colour_keys(fig) == {k: to_rgba(v) for k, v in cluster_key(clusters).items()}


# ---- index.html ---------------------------------------------------------------------------------------
SMALL = dict(n_layers=2, d_model=32, n_heads=2, d_head=16, n_ctx=16, d_vocab=64)  # 4 heads


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    for step in (1, 10):
        save_checkpoint(attn_only(seed=step, **SMALL), root / f"step{step}.pt", step)
    g = torch.Generator().manual_seed(0)
    data = {"mix": torch.randint(0, 64, (16, 16), generator=g), "code": torch.randint(0, 16, (16, 16), generator=g)}
    store = ResultStore(root / "s.sqlite")
    run_sweep(root, data, SGLDConfig(num_chains=2, num_draws=3, batch_size=8, step_size=2e-3), store,
              ["heads", "whole"], progress=False, log=lambda m: None)
    run_sweep(root, {"mix": data["mix"]}, None, store, ["whole"], progress=False, log=lambda m: None,
              metric="hessian-trace", hessian_options={"num_probes": 2, "num_batches": 1, "batch_size": 8})
    return root, store


def captions(page):
    return dict(re.findall(r"<img src='([^']+)'.*?<figcaption>(.*?)</figcaption>", page))


def test_index_html_states_each_figures_settings(tiny_store):
    root, store = tiny_store
    page = write_report(store, root / "report").read_text()
    found = captions(page)
    assert {"heads_mix.png", "heads_code.png", "heads_diff_mix_minus_code.png", "whole.png",
            "hessian-trace_whole_mix.png"} <= set(found)
    rows = store.rows()
    hashes = dict(zip(rows.data, rows.data_hash))
    for png, caption in found.items():
        assert "2 checkpoints at steps 1, 10" in caption, png
        if png.startswith("hessian"):
            assert "num_probes 2" in caption and "num_batches 1" in caption, caption
            continue
        for setting in ("step size 0.002", "chains 2", "draws 3", "batch size 8", "nbeta", "localization", "sampler",
                        "seed", "engine batched", "config " + rows.config_key.iloc[0]):
            assert setting in caption, (png, setting)
        for name in ("mix", "code") if "diff" in png or png == "whole.png" else (png[6:-4],):
            assert f"{name} (hash {hashes[name]})" in caption, (png, caption)
    # colours of a clustering come with their legend (a wider figure than without)
    from matplotlib.image import imread

    clusters = {f"{l}:{h}": h for l in range(2) for h in range(2)}
    shades = {h: (0.2 + 0.6 * c, 0.2, 0.2, 1.0) for h, c in clusters.items()}
    keyed = write_report(store, root / "keyed", colours=shades, key_colours=cluster_key(clusters)).parent
    assert imread(keyed / "heads_mix.png").shape[1] > imread(root / "report" / "heads_mix.png").shape[1]
    configs = page.split("<h2>Configurations</h2>")[1].split("<h2")[0]
    assert "num_probes 2" in configs  # a metric's options, not only its key
    assert describe_settings(rows[rows.data == "mix"]).startswith(f"Settings: data mix (hash {hashes['mix']})")

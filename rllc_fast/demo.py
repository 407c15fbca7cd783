"""``rllc demo``: the paper's main result in miniature, offline, on a laptop CPU.

1. train (or reuse from the cache) the toy run: a 2-layer attention-only model on the synthetic mixture,
   log-spaced checkpoints (``rllc_fast.toy``);
2. sweep every checkpoint: whole-model LLC and per-head wrLLC on the mixture, per-head drLLC on the
   code-like source (``rllc_fast.sweep``, one resumable SQLite store);
3. label heads by their scores at the end of training (previous-token >= 0.5, induction >= 0.3);
4. write the report (``index.html``, the figures, ``demo.png``, ``summary.json``) to the output folder and
   print a summary: head scores, and how much the code refinement raises each head type's rLLC.

Nothing is written outside ``out_dir`` and the cache folder (matplotlib's own cache is pointed into the
cache folder when ``MPLCONFIGDIR`` is unset) and nothing touches the network.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .atomic import write_json_atomically
from .config import SGLDConfig
from .analysis.head_scores import scores_by_head
from .toy import QUICK_RECIPE, ToyRecipe, default_cache_dir, train_toy

BASE, REFINED = "mixture", "code"


@dataclass(frozen=True)
class DemoSettings:
    """The demo's sizes: the toy ``recipe``, and SGLD chains/draws/batch for every estimate (step size,
    n*beta and gamma are the paper's), on ``num_contexts`` contexts per data distribution."""

    recipe: ToyRecipe = ToyRecipe()
    num_chains: int = 2
    num_draws: int = 50
    batch_size: int = 16
    num_contexts: int = 2048
    data_seed: int = 7

    def sgld_config(self) -> SGLDConfig:
        return SGLDConfig(num_chains=self.num_chains, num_draws=self.num_draws, batch_size=self.batch_size,
                          seed=self.recipe.seed)


FULL = DemoSettings()
QUICK = DemoSettings(recipe=QUICK_RECIPE, num_draws=20)


def run_demo(out_dir: os.PathLike = "rllc-demo", cache_dir: Optional[os.PathLike] = None, quick: bool = False,
             settings: Optional[DemoSettings] = None, progress: bool = True,
             log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """Run the demo (see the module doc) into ``out_dir``; return the summary (also in ``summary.json``).

    ``settings`` overrides the ``quick`` choice (``QUICK`` or ``FULL``). A rerun reuses the trained run and
    every estimate already in ``out_dir/results.sqlite``. While it runs, matplotlib's cache goes to the
    cache folder unless ``MPLCONFIGDIR`` is set; the environment is as it was afterwards."""
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    with _env_default("MPLCONFIGDIR", str(cache_dir / "matplotlib")):
        return _run_demo(Path(out_dir).expanduser(), cache_dir, settings or (QUICK if quick else FULL), progress,
                         log)


@contextlib.contextmanager
def _env_default(name: str, value: str):
    """``os.environ[name] = value`` inside the block when ``name`` is unset; removed again afterwards."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _run_demo(out_dir: Path, cache_dir: Path, settings: DemoSettings, progress: bool,
              log: Callable[[str], None]) -> dict:
    t_start = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)

    from .analysis.refinement_shift import ratios_by_type, refinement_ratios
    from .data.synthetic import synthetic_mixture, synthetic_source
    from .report import describe_settings, plot_head_types, write_report
    from .store import ResultStore
    from .sweep import run_sweep

    recipe = settings.recipe
    run = train_toy(cache_dir, recipe, progress=progress, log=log)
    n, T = settings.num_contexts, recipe.n_ctx
    data = {BASE: synthetic_mixture(n, T, seed=settings.data_seed, weights=dict(recipe.mixture)),
            REFINED: synthetic_source(REFINED, n, T, seed=settings.data_seed)}
    store = ResultStore(out_dir / "results.sqlite")
    config = settings.sgld_config()
    t_sweep = time.time()
    reports = [
        run_sweep(run.directory, {BASE: data[BASE]}, config, store, ["whole", "heads"], progress=progress, log=log),
        run_sweep(run.directory, {REFINED: data[REFINED]}, config, store, ["heads"], progress=progress, log=log),
    ]
    sweep_seconds = time.time() - t_sweep
    failed = {u: e for r in reports for u, e in r.failed.items()}
    if failed:
        raise RuntimeError("demo sweep: " + "; ".join(f"{u.checkpoint}/{u.data}/{u.component_set}: {e}"
                                                      for u, e in failed.items()))

    df = store.rows()
    types = run.head_types()
    ratios = refinement_ratios(df, REFINED, BASE)
    by_type = ratios_by_type(ratios, types)
    final = run.final
    summary = {
        "out_dir": str(out_dir.resolve()),
        "toy_run": str(run.directory),
        "recipe": dataclasses.asdict(recipe),
        "sgld": config.to_dict(),
        "checkpoints": len(run.metrics),
        "train_seconds": run.train_seconds,
        "trained_now": not run.reused,
        "sweep_seconds": sweep_seconds,
        "estimates_computed": sum(r.rows_written for r in reports),
        "head_types": types,
        "final_step": final["step"],
        "previous_token_scores": scores_by_head(final["previous_token"]),
        "induction_scores": scores_by_head(final["induction"]),
        "loss_repeat_copy": {"first": run.metrics[0]["loss_repeat_copy"], "final": final["loss_repeat_copy"]},
        "loss_first_copy": {"first": run.metrics[0]["loss_first_copy"], "final": final["loss_first_copy"]},
        "refinement": {"refined": REFINED, "base": BASE, "per_head": ratios, "by_type": by_type},
    }
    figure = plot_head_types(df, run.metrics, types, BASE, REFINED, out_dir / "demo.png",
                             title="rllc demo: a 2-layer attention-only model on the synthetic mixture")
    write_report(store, out_dir, differences=[(REFINED, BASE)], title="rllc demo",
                 extra_html=_summary_html(summary, figure.name, describe_settings(df)))
    summary["seconds"] = time.time() - t_start
    write_json_atomically(out_dir / "summary.json", summary, indent=1)
    return summary


def format_summary(summary: dict) -> str:
    """The terminal summary of ``run_demo``'s result."""
    types, prev, ind = summary["head_types"], summary["previous_token_scores"], summary["induction_scores"]
    ref = summary["refinement"]
    lines = [f"rllc demo: {summary['checkpoints']} checkpoints of the toy run "
             f"({'trained' if summary['trained_now'] else 'reused'}, {summary['train_seconds']:.0f} s of training), "
             f"sweeps {summary['sweep_seconds']:.0f} s, {summary['estimates_computed']} new estimates",
             f"in-context learning: loss on the repeated copy of random spans "
             f"{summary['loss_repeat_copy']['first']:.2f} -> {summary['loss_repeat_copy']['final']:.2f} nats "
             f"(first copy {summary['loss_first_copy']['final']:.2f})",
             f"heads at step {summary['final_step']} (previous-token >= 0.5, induction >= 0.3); rLLC averaged over the "
             f"last {next(iter(ref['per_head'].values()))['checkpoints']} checkpoints:",
             f"  {'head':>5} {'type':<15} {'prev':>5} {'ind':>5} {'wrLLC ' + ref['base']:>15} "
             f"{'drLLC ' + ref['refined']:>11} {'ratio':>6}"]
    for name in types:  # layer, then head order
        r = ref["per_head"].get(name, {})
        lines.append(f"  {name:>5} {types[name]:<15} {prev[name]:5.2f} {ind[name]:5.2f} "
                     f"{r.get('base', float('nan')):15.2f} {r.get('refined', float('nan')):11.2f} "
                     f"{r.get('ratio', float('nan')):6.2f}")
    parts = [f"{kind} {v['mean_ratio']:.2f} ({len(v['heads'])})" for kind, v in sorted(ref["by_type"].items())]
    lines.append(f"mean ratio drLLC {ref['refined']} / wrLLC {ref['base']} by head type: " + ", ".join(parts))
    lines.append(f"report: {summary['out_dir']}/index.html   figure: {summary['out_dir']}/demo.png")
    return "\n".join(lines)


def _summary_html(summary: dict, figure: str, settings: str) -> str:
    """The page's summary and the demo figure, captioned with ``settings`` (``report.describe_settings``)."""
    import html

    return (f"<h2>Summary</h2><pre>{html.escape(format_summary(summary))}</pre>"
            f"<figure><img src='{html.escape(figure)}' alt='demo figure'><figcaption>Heads coloured by type: "
            "per-head wrLLC on the mixture, the code refinement's difference, head scores and in-context learning, "
            f"whole-model LLC.<br><small>{html.escape(settings)}</small></figcaption></figure>")

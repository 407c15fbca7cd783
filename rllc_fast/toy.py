"""The toy training run of the built-in demo: a 2-layer attention-only model trained on the synthetic
mixture (``rllc_fast.data.synthetic``) with log-spaced checkpoints, cached by recipe.

``train_toy(cache_dir, recipe)`` returns a ``ToyRun``: the checkpoint folder, and per checkpoint the
head scores (previous-token, induction: ``[layers, heads]``) and the loss on the first and on the repeated
copy of repeated random spans (nats), which show in-context learning. A run is reused when
``cache_dir/<recipe key>/run.json`` exists and lists checkpoints that are all present; the manifest is
written last and atomically, so an interrupted run is simply trained again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple


from .atomic import write_json_atomically
from .data.synthetic import DATA_VERSION, DEFAULT_MIXTURE, SOURCES, SYNTHETIC_VOCAB, WORDS, synthetic_mixture
from .progress import Progress

FORMAT = "rllc_fast.toy-run/1"


@dataclass(frozen=True)
class ToyRecipe:
    """Everything that fixes a toy run (model shape, data, optimiser, checkpoints); equal recipes give equal
    runs. Steps are AdamW steps of ``batch_size`` contexts of ``n_ctx`` tokens; ``lr`` warms up linearly
    over ``warmup`` steps."""

    steps: int = 3000
    checkpoints: int = 32
    seed: int = 0
    n_layers: int = 2
    d_model: int = 48
    n_heads: int = 6
    n_ctx: int = 48
    batch_size: int = 32
    lr: float = 5e-3
    warmup: int = 100
    weight_decay: float = 0.01
    num_contexts: int = 30000
    mixture: Tuple[Tuple[str, float], ...] = tuple(DEFAULT_MIXTURE.items())

    def key(self) -> str:
        """A short hash of the recipe: the name of its cache folder."""
        text = json.dumps({**dataclasses.asdict(self), "data_version": DATA_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def check(self) -> None:
        """Raise ``ValueError`` naming the field for a recipe that cannot run."""
        positive = ("steps", "n_layers", "d_model", "n_heads", "batch_size", "num_contexts")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"toy recipe: {name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoints < 2:
            raise ValueError(f"toy recipe: checkpoints must be >= 2, got {self.checkpoints}")
        if self.d_model % self.n_heads:
            raise ValueError(f"toy recipe: d_model {self.d_model} must be divisible by n_heads {self.n_heads}")
        unknown = [name for name, _ in self.mixture if name not in SOURCES]
        if unknown or not self.mixture:
            raise ValueError(f"toy recipe: mixture must weight sources from {SOURCES}, got {self.mixture}")
        if self.n_ctx < 16:
            raise ValueError(f"toy recipe: n_ctx must be >= 16 (induction needs room to repeat), got {self.n_ctx}")


#: The quick recipe (tests, ``rllc demo --quick``): as long as the head types need to form, fewer checkpoints.
QUICK_RECIPE = ToyRecipe(steps=2000, checkpoints=8)


@dataclass
class ToyRun:
    """A finished toy run: ``directory`` of ``step*.pt`` checkpoints and ``metrics`` per step (see module doc)."""

    directory: Path
    recipe: ToyRecipe
    metrics: List[dict]
    train_seconds: float
    reused: bool = False

    @property
    def final(self) -> dict:
        return self.metrics[-1]

    def head_types(self, prev_threshold: float = 0.5, induction_threshold: float = 0.3) -> Dict[str, str]:
        """``{"l:h": "induction" | "previous-token" | "other"}`` from the final checkpoint's scores, by
        ``analysis.classify_heads`` (induction wins over previous-token; current-token and multigram heads
        are "other" here, since the demo measures neither)."""
        import torch

        from .analysis.head_scores import classify_heads

        scores = {"previous_token": torch.tensor(self.final["previous_token"]),
                  "induction": torch.tensor(self.final["induction"])}
        labels = classify_heads(scores, previous_token=prev_threshold, induction=induction_threshold)
        return {h: t if t in ("induction", "previous-token") else "other" for h, t in labels.items()}


def default_cache_dir() -> Path:
    """``$RLLC_CACHE`` or ``$XDG_CACHE_HOME/rllc_fast`` or ``~/.cache/rllc_fast``."""
    if os.environ.get("RLLC_CACHE"):
        return Path(os.environ["RLLC_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rllc_fast"


def toy_model(recipe: ToyRecipe):
    """The untrained model of ``recipe`` (TransformerLens, attention-only, synthetic vocabulary)."""
    from .models import attn_only

    return attn_only(seed=recipe.seed, n_layers=recipe.n_layers, d_model=recipe.d_model, n_heads=recipe.n_heads,
                     d_head=recipe.d_model // recipe.n_heads, n_ctx=recipe.n_ctx, d_vocab=SYNTHETIC_VOCAB)


def toy_metrics(model, seed: int = 99, mixture: Optional[Dict[str, float]] = None) -> dict:
    """Head scores and repeated-span losses of one model (see the module doc), on held-out data (``seed``);
    previous-token scores on contexts of the synthetic ``mixture`` (default ``DEFAULT_MIXTURE``)."""
    from .analysis import induction_scores, previous_token_scores, repeated_token_losses

    n_ctx = model.cfg.n_ctx
    length = min(24, n_ctx // 2)
    words = dict(low=int(WORDS[0]), vocab=SYNTHETIC_VOCAB, length=length, num=64, seed=seed)
    first, repeat = repeated_token_losses(model, **words)
    return {
        "previous_token": previous_token_scores(model, synthetic_mixture(64, n_ctx, seed=seed, weights=mixture)).tolist(),
        "induction": induction_scores(model, **words).tolist(),
        "loss_first_copy": first,
        "loss_repeat_copy": repeat,
    }


def train_toy(cache_dir: Optional[os.PathLike] = None, recipe: ToyRecipe = ToyRecipe(), progress: bool = True,
              log: Callable[[str], None] = lambda s: print(s, file=sys.stderr), force: bool = False) -> ToyRun:
    """Train ``recipe`` into ``cache_dir/<recipe.key()>/`` (default ``default_cache_dir()``), or reuse the
    finished run there (unless ``force``). Returns the ``ToyRun``."""
    from .models.checkpoints import checkpoint_series
    from .models.train import log_spaced_steps, train_next_token

    recipe.check()
    run_dir = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser() / f"toy-{recipe.key()}"
    manifest = run_dir / "run.json"
    if not force:
        cached = _load_cached(run_dir, recipe)
        if cached is not None:
            log(f"reusing the toy run in {run_dir} (trained in {cached.train_seconds:.0f} s)")
            return cached
    run_dir.mkdir(parents=True, exist_ok=True)
    if manifest.exists():
        manifest.unlink()
    save_at = log_spaced_steps(recipe.steps, recipe.checkpoints)
    log(f"training the toy model ({recipe.steps} steps, {len(save_at)} checkpoints) into {run_dir}")
    model = toy_model(recipe)
    tokens = synthetic_mixture(recipe.num_contexts, recipe.n_ctx, seed=recipe.seed, weights=dict(recipe.mixture))
    t0 = time.time()
    train_next_token(model, tokens, recipe.steps, seed=recipe.seed, progress=progress, batch_size=recipe.batch_size,
                     lr=recipe.lr, save_at=save_at, save_dir=run_dir, warmup=recipe.warmup,
                     weight_decay=recipe.weight_decay)
    seconds = time.time() - t0
    metrics = []
    wanted = set(save_at)
    series = [c for c in checkpoint_series(run_dir) if c.step in wanted]
    bar = Progress(len(series), progress, desc="head scores", unit="ckpt")
    for ckpt in series:
        metrics.append({"step": ckpt.step, "file": ckpt.name, **toy_metrics(ckpt.load(), mixture=dict(recipe.mixture))})
        bar.update(1)
    bar.close()
    payload = {"format": FORMAT, "recipe": _recipe_json(recipe), "train_seconds": seconds, "metrics": metrics}
    write_json_atomically(manifest, payload, indent=1)
    return ToyRun(run_dir, recipe, metrics, seconds)


def _load_cached(run_dir: Path, recipe: ToyRecipe) -> Optional[ToyRun]:
    try:
        payload = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None
    if payload.get("format") != FORMAT or payload.get("recipe") != _recipe_json(recipe):
        return None
    metrics = payload.get("metrics") or []
    if not metrics or not all((run_dir / m["file"]).is_file() for m in metrics):
        return None
    return ToyRun(run_dir, recipe, metrics, float(payload["train_seconds"]), reused=True)


def _recipe_json(recipe: ToyRecipe) -> dict:
    """The recipe as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(recipe)))

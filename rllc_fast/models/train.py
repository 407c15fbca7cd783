"""A short next-token training run (AdamW), for the built-in default and the benchmarks' models."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..progress import Progress
from ..losses import next_token_loss


def log_spaced_steps(total: int, count: int) -> list:
    """About ``count`` distinct checkpoint steps in ``[0, total]``, log-spaced (0 and ``total`` included)."""
    if total < 1 or count < 2:
        raise ValueError(f"need total >= 1 and count >= 2, got total={total}, count={count}")
    steps = {0, total}
    grid = np.unique(np.round(np.logspace(0, np.log10(total), count - 1)).astype(int))
    steps.update(int(s) for s in grid)
    return sorted(steps)


def train_next_token(model: nn.Module, tokens: torch.Tensor, steps: int, seed: int = 0, progress: bool = False,
                     batch_size: int = 32, lr: float = 3e-3, save_at: Sequence[int] = (),
                     save_dir: str | os.PathLike | None = None, warmup: int = 0,
                     weight_decay: float = 0.0) -> float:
    """Train ``model`` in place on random rows of ``tokens [N, T]`` for ``steps`` AdamW steps; return the last loss (nats).

    ``warmup``: steps of linear learning-rate warm-up to ``lr`` (0: none).

    ``save_at``: training steps (0 = before the first update) at which ``save_dir/step{N:06d}.pt`` is written
    with ``rllc_fast.models.save_checkpoint`` (TransformerLens models)."""
    save_at = set(save_at)
    if save_at and save_dir is None:
        raise ValueError("save_at needs save_dir (the folder the checkpoints go to)")
    bad = sorted(s for s in save_at if not 0 <= s <= steps)
    if bad:
        raise ValueError(f"save_at steps {bad} are outside [0, steps={steps}]")

    def maybe_save(step: int) -> None:
        if step in save_at:
            from .checkpoints import save_checkpoint

            save_checkpoint(model, os.path.join(save_dir, f"step{step:06d}.pt"), step)

    if warmup < 0:
        raise ValueError(f"warmup must be >= 0 steps, got {warmup}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    bar = Progress(steps, progress, desc="training", unit="step")
    maybe_save(0)
    for step in range(1, steps + 1):
        if warmup:
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, step / warmup)
        batch = tokens[torch.randint(0, tokens.shape[0], (batch_size,), generator=g)]
        loss = next_token_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        maybe_save(step)
        bar.update(1)
        if step % 50 == 0 or step == steps:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.zero_grad(set_to_none=True)
    return loss.item()

"""A short next-token training run (AdamW), for the built-in default and the benchmarks' models."""
from __future__ import annotations

import sys

import torch
from torch import nn

from ..losses import next_token_loss


def train_next_token(model: nn.Module, tokens: torch.Tensor, steps: int, seed: int = 0, progress: bool = False,
                     batch_size: int = 32, lr: float = 3e-3) -> float:
    """Train ``model`` in place on random rows of ``tokens [N, T]`` for ``steps`` AdamW steps; return the last loss (nats)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="training", unit="step", file=sys.stderr, dynamic_ncols=True)
    for _ in range(steps):
        batch = tokens[torch.randint(0, tokens.shape[0], (batch_size,), generator=g)]
        loss = next_token_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    model.zero_grad(set_to_none=True)
    return loss.item()

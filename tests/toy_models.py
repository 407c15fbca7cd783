"""Small models with known learning coefficients, shared by the tests."""
from __future__ import annotations

import math

import torch
from torch import nn



class Linear(nn.Module):
    """y = x @ w (no bias); ``w`` has shape [d]."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x):
        return x @ self.w


class PowerModel(nn.Module):
    """f(x) = x * w1^p1 * w2^p2, at w = 0 its learning coefficient is 1 / (2 max(p1, p2))."""

    def __init__(self, p1: int, p2: int):
        super().__init__()
        self.p1, self.p2 = p1, p2
        self.w1 = nn.Parameter(torch.zeros(()))
        self.w2 = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x * self.w1**self.p1 * self.w2**self.p2


def gaussian_nll(sigma: float):
    """loss_fn for (x, y) batches: mean 0.5 * (y - f(x))^2 / sigma^2 (constants dropped)."""

    def loss_fn(model, batch):
        x, y = batch
        return 0.5 * ((y - model(x)) ** 2).mean() / sigma**2

    return loss_fn


def nbeta_for(n: int) -> float:
    """The usual n * beta = n / log n."""
    return n / math.log(n)

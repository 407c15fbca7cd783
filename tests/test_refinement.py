"""Weight refinement: SGLD moves only the component, and restricting a model restricts its LLC."""
import numpy as np
import torch
from torch import nn

import rllc_fast as r
from toy_models import Linear, gaussian_nll


class WithDeadWeights(nn.Module):
    """A linear model plus parameters the loss never reads."""

    def __init__(self, w):
        super().__init__()
        self.lin = Linear(w)
        self.dead = nn.Parameter(torch.randn(5))

    def forward(self, x):
        return self.lin(x)


def _regression(n=400, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5][:d]) + torch.randn(n, generator=g)
    w = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1)
    return x, y, w


CFG = r.SGLDConfig(step_size=1e-3, nbeta=100.0, localization=1.0, num_chains=4, num_draws=400,
                   batch_size=None, seed=3)


def test_component_the_loss_ignores_contributes_nothing():
    x, y, w = _regression()
    model = WithDeadWeights(w)
    res = r.estimate_llc(model, (x, y), CFG, components=[r.from_params(model, ["dead"], name="dead"),
                                                           r.from_params(model, ["lin.w"], name="live")],
                         loss_fn=gaussian_nll(1.0))
    assert np.all(res["dead"].llc_per_chain == 0.0)
    assert np.all(res["dead"].distance_trace[:, -1] > 0)  # the dead weights did move
    assert res["live"].llc_mean > 0.5  # while the live ones give a real estimate


class Fixed3rd(nn.Module):
    """The 3-weight regression with w3 baked in as a constant: a 2-parameter model."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w[:2].clone())
        self.register_buffer("w3", w[2].clone())

    def forward(self, x):
        return x[:, :2] @ self.w + x[:, 2] * self.w3


def test_restricting_three_weights_to_two_equals_the_two_weight_model():
    x, y, w = _regression()
    three = Linear(w)
    two = Fixed3rd(w)
    comp3 = r.components.make_component(three, "first two", [("w", (slice(0, 2),))])
    comp2 = r.components.make_component(two, "first two", [("w", ())])
    res3 = r.estimate_llc(three, (x, y), CFG, components=[comp3], loss_fn=gaussian_nll(1.0))["first two"]
    res2 = r.estimate_llc(two, (x, y), CFG, components=[comp2], loss_fn=gaussian_nll(1.0))["first two"]
    spread = max(res3.llc_std, res2.llc_std)
    assert abs(res3.llc_mean - res2.llc_mean) < spread
    # same seed and component name -> same noise; the two computations differ only by rounding
    np.testing.assert_allclose(res3.loss_trace, res2.loss_trace, rtol=1e-5)
    # and the 2-parameter model's LLC is near d/2 = 1 (a regular model)
    assert 0.7 < res2.llc_mean < 1.3


def test_sgld_on_one_head_leaves_every_other_parameter_bit_for_bit():
    model = r.models.attn_only()  # the paper's config
    names = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in names.items()}
    target = r.heads(model)["1:6"]
    own = {s.param for s in target.slices}
    seen = {"calls": 0, "head_moved": False}

    def checking_loss(m, tokens):
        # called with the sampler's current weights: everything off the head must be exactly w*
        for n, p in names.items():
            if n in own:
                others = torch.ones(p.shape[0], dtype=torch.bool)
                others[6] = False
                assert torch.equal(p.detach()[others], before[n][others]), n
                seen["head_moved"] |= not torch.equal(p.detach()[6], before[n][6])
            else:
                assert torch.equal(p.detach(), before[n]), n
        seen["calls"] += 1
        return r.losses.next_token_loss(m, tokens)

    tokens = torch.randint(0, 5000, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = r.SGLDConfig(num_chains=2, num_draws=3, batch_size=None)
    r.estimate_llc(model, tokens, cfg, components=[target], loss_fn=checking_loss)
    assert seen["calls"] == 1 + 2 * 3 and seen["head_moved"]
    for n, p in names.items():  # and w* is restored exactly afterwards
        assert torch.equal(p.detach(), before[n])
        assert p.requires_grad

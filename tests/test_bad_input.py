"""Bad input and diverging chains give clear errors or are reported, never averaged in silently."""
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import rllc_fast as r
from toy_models import Linear, gaussian_nll


def _linear_problem(n=200):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g)
    y = x @ torch.tensor([1.0, 2.0]) + torch.randn(n, generator=g)
    return Linear(torch.tensor([1.0, 2.0])), (x, y)


def test_nan_in_one_chain_stops_it_marks_it_and_is_excluded():
    model, data = _linear_problem()
    cfg = r.SGLDConfig(step_size=1e-4, nbeta=50.0, num_chains=3, num_draws=10, batch_size=None)
    base = gaussian_nll(1.0)
    calls = {"n": 0}

    def poisoned(m, batch):  # call 0 is l(w*); then chain 0 steps 0-9, chain 1 steps 0-9, ...
        calls["n"] += 1
        loss = base(m, batch)
        return loss * float("nan") if calls["n"] == 1 + 10 + 4 else loss  # chain 1, step 3

    with pytest.warns(RuntimeWarning, match="diverged"):
        res = r.estimate_llc(model, data, cfg, loss_fn=poisoned, engine="reference")
    e = res["whole"]
    assert e.diverged.tolist() == [False, True, False]
    assert e.diverged_at.tolist() == [-1, 3, -1]
    assert math.isnan(e.llc_per_chain[1])
    assert np.isnan(e.loss_trace[1, 3:]).all() and np.isfinite(e.loss_trace[1, :3]).all()
    assert e.llc_mean == pytest.approx(np.mean(e.llc_per_chain[[0, 2]]))
    assert "diverged" in res.summary() and "excluded" in res.summary()
    assert res.diverged_chains() == {"whole": [1]}
    assert res.to_dataframe()["num_diverged"].tolist() == [1]


def test_huge_step_size_diverges_every_chain_and_suggests_a_smaller_one():
    model, data = _linear_problem()
    cfg = r.SGLDConfig(step_size=10.0, nbeta=1e4, num_chains=2, num_draws=50, batch_size=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(r.ChainsDivergedError, match="smaller step_size"):
            r.estimate_llc(model, data, cfg, loss_fn=gaussian_nll(1.0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_draws=0), "num_draws"),
        (dict(num_chains=0), "num_chains"),
        (dict(step_size=-1e-3), "step_size"),
        (dict(step_size=float("nan")), "step_size"),
        (dict(nbeta=0.0), "nbeta"),
        (dict(localization=-1.0), "localization"),
        (dict(batch_size=0), "batch_size"),
        (dict(num_burnin=-1), "num_burnin"),
    ],
)
def test_config_validation_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        r.SGLDConfig(**kwargs)


@pytest.fixture(scope="module")
def tiny_tl():
    return r.models.attn_only(n_layers=1, d_model=16, n_heads=2, d_head=8, n_ctx=8, d_vocab=11)


CFG = r.SGLDConfig(num_chains=1, num_draws=2, batch_size=2)


def test_empty_data(tiny_tl):
    with pytest.raises(ValueError, match="empty"):
        r.estimate_llc(tiny_tl, torch.zeros(0, 8, dtype=torch.long), CFG)
    with pytest.raises(ValueError, match="empty"):
        r.estimate_llc(tiny_tl, [], CFG)


def test_mismatched_shapes(tiny_tl):
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        r.estimate_llc(tiny_tl, torch.zeros(4, 8, 2, dtype=torch.long), CFG)
    with pytest.raises(ValueError, match="n_ctx"):
        r.estimate_llc(tiny_tl, torch.zeros(4, 9, dtype=torch.long), CFG)
    with pytest.raises(ValueError, match="token ids"):
        r.estimate_llc(tiny_tl, torch.full((4, 8), 11), CFG)


def test_negative_token_ids_are_refused_before_sampling(tiny_tl):
    """Negative ids are refused by the check with its message, for a TransformerLens model and for a model
    that states no vocabulary (torch would otherwise fail later with an unrelated indexing error, or a
    model that wraps ids silently would give a wrong number)."""
    bad = torch.zeros(4, 8, dtype=torch.long)
    bad[2, 3] = -1
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 11\) for this model; found -1\.\.0"):
        r.estimate_llc(tiny_tl, bad, CFG)

    class Wrapping(nn.Module):  # an embedding model that would accept -1 (Python-style indexing)
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(11, 11))

        def forward(self, tokens):
            return self.table[tokens]

    with pytest.raises(ValueError, match="token ids must be >= 0; found -1..0"):
        r.estimate_llc(Wrapping(), bad, CFG)
    with pytest.raises(ValueError, match="token ids"):
        r.hessian.trace(tiny_tl, bad, num_probes=2, num_batches=1, batch_size=4)
    with pytest.raises(TypeError, match="integer"):
        r.estimate_llc(tiny_tl, torch.zeros(4, 8), CFG)
    with pytest.raises(ValueError, match="first"):
        r.estimate_llc(nn.Linear(2, 1), (torch.zeros(4, 2), torch.zeros(5)), CFG,
                       loss_fn=lambda m, b: m(b[0]).sum())
    with pytest.raises(ValueError, match="batch_size"):
        r.estimate_llc(tiny_tl, torch.zeros(1, 8, dtype=torch.long), CFG)


def test_loss_fn_must_return_a_scalar():
    model, data = _linear_problem()
    with pytest.raises(ValueError, match="scalar"):
        r.estimate_llc(model, data, CFG, loss_fn=lambda m, b: (b[1] - m(b[0])) ** 2)


def test_wrong_types(tiny_tl):
    with pytest.raises(TypeError, match="SGLDConfig"):
        r.estimate_llc(tiny_tl, torch.zeros(4, 8, dtype=torch.long), config={"step_size": 1e-3})
    with pytest.raises(TypeError, match="components"):
        r.estimate_llc(tiny_tl, torch.zeros(4, 8, dtype=torch.long), CFG, components="0:0")
    with pytest.raises(ValueError, match="engine"):
        r.estimate_llc(tiny_tl, torch.zeros(4, 8, dtype=torch.long), CFG, engine="fast?")
    with pytest.raises(TypeError, match="one-shot iterator"):
        r.estimate_llc(tiny_tl, iter([torch.zeros(2, 8, dtype=torch.long)]), CFG)

"""The same seed gives the same chains bit for bit on CPU; another seed gives other chains."""
import numpy as np
import torch

import rllc_fast as r


def _run(seed):
    model = r.models.attn_only(n_layers=2, d_model=32, n_heads=2, d_head=16, n_ctx=16, d_vocab=64, seed=1)
    tokens = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(0))
    cfg = r.SGLDConfig(num_chains=2, num_draws=20, batch_size=4, seed=seed)
    return r.estimate_llc(model, tokens, cfg, components=r.heads(model))


def test_same_seed_same_result_bit_for_bit():
    a, b = _run(7), _run(7)
    assert np.array_equal(a.loss_trace, b.loss_trace)
    assert a.llc_mean == b.llc_mean


def test_different_seed_different_chains():
    a, b = _run(7), _run(8)
    assert not np.array_equal(a.loss_trace, b.loss_trace)


def test_chains_differ_from_each_other():
    a = _run(7)
    assert not np.array_equal(a["0:0"].loss_trace[0], a["0:0"].loss_trace[1])

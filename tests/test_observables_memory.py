"""Probe-set forward passes stay within max_memory (issue 22, must-show 5): a next-token pass over a probe
set holds ``[contexts, T, vocab]`` logits, so the passes at w* (every engine) and per replica (generic and
reference engines) score the contexts in row chunks sized by the budget, with the same losses as one pass.
Before this, a Pythia-70m-shaped model peaked at 5.5 GiB on two probe sets of 16 x 512 tokens whatever
max_memory said (the w* pass alone: 16 x 512 x 50304 float32 logits, 1.6 GB, plus the log-softmax)."""
import numpy as np
import pytest
import torch

import rllc_fast as r
from rllc_fast.losses import next_token_loss
from rllc_fast.observables import LOGIT_COPIES, per_token_losses, rows_per_pass

VOCAB, T_PROBE, T_DATA = 64, 24, 20


@pytest.fixture(scope="module")
def small():
    model = r.models.attn_only(n_layers=2, d_model=32, n_heads=4, d_head=8, n_ctx=24, d_vocab=VOCAB, seed=5)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (32, T_DATA), generator=g)
    probes = {"a": torch.randint(0, VOCAB, (5, T_PROBE), generator=g),
              "b": torch.randint(0, VOCAB, (3, T_PROBE), generator=g)}
    return model, tokens, probes


def test_rows_per_pass_fits_the_logits_in_the_budget(small):
    model, _, probes = small
    per_context = LOGIT_COPIES * T_PROBE * VOCAB * 4
    assert rows_per_pass(probes["a"], model, 2 * per_context) == 2
    assert rows_per_pass(probes["a"], model, 2 * per_context - 1) == 1
    assert rows_per_pass(probes["a"], model, 1) == 1                  # at least one context per pass
    assert rows_per_pass((probes["a"],), model, 1) is None            # not a token tensor: all at once
    assert rows_per_pass(probes["a"], torch.nn.Linear(2, 2), 1) is None  # vocabulary unknown


def test_chunked_per_token_losses_equal_one_pass(small):
    model, _, probes = small
    whole = per_token_losses(next_token_loss.per_token, model, probes["a"], "a")
    for rows in (1, 2, 4, 5, 9):
        torch.testing.assert_close(per_token_losses(next_token_loss.per_token, model, probes["a"], "a", rows), whole)


@pytest.mark.parametrize("engine", ["batched", "generic", "reference"])
def test_probe_passes_respect_max_memory_and_record_the_same_losses(small, engine):
    model, tokens, probes = small
    budget = 2 * LOGIT_COPIES * T_PROBE * VOCAB * 4     # two probe contexts per pass
    cfg = r.SGLDConfig(num_chains=2, num_draws=3, batch_size=8, seed=1)
    comps = {"1:2": r.heads(model)["1:2"], "L1": r.layer(model, 1)}
    seen = []  # [N, T] of every full forward pass (to the logits; the structured path's shared pass below a
    # head's layer, run_with_cache(stop_at_layer=...), holds no logits and is not counted)

    def record(module, args, kwargs):
        if kwargs.get("stop_at_layer") is None:
            seen.append(tuple(args[0].shape))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        chunked = r.estimate_llc(model, tokens, cfg, components=comps, engine=engine, observables=probes,
                                 max_memory=budget).observations
    finally:
        hook.remove()
    probe_passes = [s for s in seen if s[1] == T_PROBE]
    assert probe_passes and max(n for n, _ in probe_passes) == 2
    unchunked = r.estimate_llc(model, tokens, cfg, components=comps, engine=engine, observables=probes).observations
    for name in probes:
        np.testing.assert_allclose(chunked.at_optimum[name], unchunked.at_optimum[name], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(chunked[name], unchunked[name], rtol=1e-4, atol=1e-5)

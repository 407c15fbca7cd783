"""Observables: per-token probe losses recorded by every engine at the observed draws."""
import numpy as np
import pytest
import torch

import rllc_fast as r
from rllc_fast.losses import next_token_loss
from rllc_fast.observables import ProbeRecorder
from devices import DEVICES
from toy_models import Linear, gaussian_nll


@pytest.fixture(scope="module")
def small_tl():
    model = r.models.attn_only(n_layers=2, d_model=32, n_heads=4, d_head=8, n_ctx=24, d_vocab=64, seed=5)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (32, 24), generator=g)
    probes = {"a": torch.randint(0, 64, (5, 24), generator=g), "b": torch.randint(0, 64, (3, 17), generator=g),
              "c": torch.randint(0, 64, (2, 24), generator=g)}  # "a" and "c" are scored in one pass
    return model, tokens, probes


def _components(model):
    comps = dict(r.heads(model))
    comps["L1"] = r.layer(model, 1)          # not a head: the generic path, in the same run
    comps["whole"] = r.whole(model)
    return comps


def test_every_engine_records_the_same_probe_losses_and_draw_0_is_at_w_star(small_tl):
    model, tokens, probes = small_tl
    cfg = r.SGLDConfig(num_chains=2, num_draws=5, num_burnin=0, thinning=2, batch_size=8, seed=2)
    comps = _components(model)
    runs = {e: r.estimate_llc(model, tokens, cfg, components=comps, engine=e, observables=probes, observe_every=2)
            for e in ("batched", "generic", "reference")}
    obs = runs["batched"].observations
    assert obs.components == list(comps) and obs.names == ["a", "b", "c"] and obs.num_chains == 2
    assert obs.draws.tolist() == [0, 2, 4] and obs.steps.tolist() == [0, 4, 8]
    assert obs["a"].shape == (len(comps), 2, 3, 5, 23) and obs["b"].shape == (len(comps), 2, 3, 3, 16)
    assert obs["c"].shape == (len(comps), 2, 3, 2, 23)
    for name, batch in probes.items():
        with torch.no_grad():
            at_w_star = next_token_loss.per_token(model, batch).numpy()
        np.testing.assert_allclose(obs.at_optimum[name], at_w_star, rtol=1e-6)
        # no burn-in: the first observed draw is w* itself, for every replica and every path
        np.testing.assert_allclose(obs[name][:, :, 0], np.broadcast_to(at_w_star, obs[name][:, :, 0].shape),
                                   rtol=2e-5, atol=2e-5)
        # later draws moved: the losses differ from w*'s, and the chains from each other
        assert np.abs(obs[name][:, :, 2] - at_w_star).min(axis=(-1, -2)).max() > 0
        assert not np.allclose(obs[name][:, 0, 2], obs[name][:, 1, 2])
        for e in ("generic", "reference"):
            np.testing.assert_allclose(obs[name], runs[e].observations[name], rtol=1e-4, atol=1e-5)


def test_probe_losses_are_those_of_the_weights_of_the_draw(small_tl):
    """Replay one replica by hand with the reference engine's noise: its probe losses at draw d are the
    model's per-token losses at the weights it had before step d's update (the same weights as l(w_t))."""
    model, tokens, probes = small_tl
    cfg = r.SGLDConfig(num_chains=1, num_draws=3, batch_size=8, seed=7)
    head = r.heads(model)["1:2"]
    captured = []

    def loss_fn(m, batch):  # records the model's probe losses whenever the sampled loss is taken
        with torch.no_grad():
            captured.append(next_token_loss.per_token(m, probes["a"]).clone())
        return next_token_loss(m, batch)

    class Recording:
        per_token = staticmethod(lambda m, b: next_token_loss.per_token(m, b))

        def __call__(self, m, batch):
            return loss_fn(m, batch)

    res = r.estimate_llc(model, tokens, cfg, components={"1:2": head}, engine="reference", loss_fn=Recording(),
                         observables={"a": probes["a"]})
    got = res.observations["a"][0, 0]
    # calls: l(w*) on each distinct batch first, then one per step
    per_step = captured[-cfg.num_steps:]
    for d in range(3):
        np.testing.assert_allclose(got[d], per_step[d].numpy(), rtol=1e-6)


def test_observations_on_disk_reopen_and_float16(small_tl, tmp_path):
    model, tokens, probes = small_tl
    cfg = r.SGLDConfig(num_chains=2, num_draws=4, batch_size=8, seed=1)
    comps = {k: v for k, v in r.heads(model).items() if k.startswith("0:")}
    in_ram = r.estimate_llc(model, tokens, cfg, components=comps, observables=probes).observations
    on_disk = r.estimate_llc(model, tokens, cfg, components=comps, observables=probes,
                             observables_dir=tmp_path / "obs").observations
    assert isinstance(on_disk["a"], np.memmap) and on_disk.directory == tmp_path / "obs"
    reopened = r.Observations.load(tmp_path / "obs")
    assert reopened.components == in_ram.components and reopened.names == in_ram.names
    for n in probes:
        np.testing.assert_array_equal(reopened[n], in_ram[n])
        np.testing.assert_array_equal(reopened.tokens[n], probes[n].numpy())
        np.testing.assert_array_equal(reopened.at_optimum[n], in_ram.at_optimum[n])
    half = r.estimate_llc(model, tokens, cfg, components=comps, observables=probes,
                          observables_dir=tmp_path / "half", observables_dtype="float16").observations
    assert half["a"].dtype == np.float16
    np.testing.assert_allclose(half["a"].astype(np.float32), in_ram["a"], rtol=2e-3)
    lab = reopened.labelled("b").sel(component="0:1", chain=1)
    assert lab.dims == ["draw", "context", "position"]
    np.testing.assert_array_equal(lab.values, in_ram["b"][1, 1])
    frame = reopened.labelled("b").sel(component="0:1").to_dataframe("loss")
    assert len(frame) == 2 * 4 * 3 * 16 and set(frame.columns) == {"chain", "draw", "context", "position", "loss"}


def test_an_interrupted_folder_is_not_reopened(small_tl, tmp_path):
    model, tokens, probes = small_tl
    cfg = r.SGLDConfig(num_chains=1, num_draws=2, batch_size=8)
    r.estimate_llc(model, tokens, cfg, components={"0:0": r.head(model, 0, 0)}, observables=probes,
                   observables_dir=tmp_path)
    recorder = ProbeRecorder(probes, next_token_loss.per_token, model, 1, cfg, directory=tmp_path)  # a rerun starts
    assert recorder.arrays["a"].shape[0] == 1
    with pytest.raises(FileNotFoundError, match="no finished observations"):
        r.Observations.load(tmp_path)


def test_too_large_for_ram_asks_for_a_folder(small_tl, monkeypatch):
    import rllc_fast.observables as observables

    model, tokens, probes = small_tl
    monkeypatch.setattr(observables, "IN_MEMORY_BYTES", 1000)
    with pytest.raises(ValueError, match="observables_dir"):
        r.estimate_llc(model, tokens, r.SGLDConfig(num_chains=1, num_draws=2, batch_size=8),
                       components={"0:0": r.head(model, 0, 0)}, observables=probes)


def test_diverged_chains_record_nan_from_their_divergence_on():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 2, generator=g)
    y = x @ torch.tensor([1.0, 2.0]) + torch.randn(200, generator=g)
    model = Linear(torch.tensor([1.0, 2.0]))
    cfg = r.SGLDConfig(step_size=1e-4, nbeta=50.0, num_chains=4, num_draws=10, batch_size=None)
    a = r.from_params(model, [("w", slice(0, 1))], name="a")
    b = r.from_params(model, [("w", slice(1, 2))], name="b")
    base = gaussian_nll(1.0)

    class Poisoned:  # NaN once w[0] has wandered 0.03 from w*: only component "a" moves it
        def per_token(self, m, batch):
            xb, yb = batch
            return 0.5 * (yb - m(xb)) ** 2

        def __call__(self, m, batch):
            loss = base(m, batch)
            return loss * float("nan") if abs(float(m.w[0]) - 1.0) > 0.03 else loss

    for engine in ("batched", "reference"):
        with pytest.warns(RuntimeWarning, match="diverged"):
            res = r.estimate_llc(model, (x, y), cfg, components=[a, b], loss_fn=Poisoned(), engine=engine,
                                 observables={"p": (x[:7], y[:7])})
        obs = res.observations["p"]                                     # [2, 4, 10, 7, 1]
        diverged_at = res["a"].diverged_at
        assert diverged_at.tolist() == [4, -1, 3, -1]
        for c, step in enumerate(diverged_at):
            if step >= 0:
                assert np.isfinite(obs[0, c, :step]).all() and np.isnan(obs[0, c, step:]).all()
            else:
                assert np.isfinite(obs[0, c]).all()
        assert np.isfinite(obs[1]).all()


def test_bad_probe_sets_are_refused_with_the_argument_named(small_tl):
    model, tokens, probes = small_tl
    cfg = r.SGLDConfig(num_chains=1, num_draws=2, batch_size=8)
    comp = {"0:0": r.head(model, 0, 0)}

    def run(**kw):
        return r.estimate_llc(model, tokens, cfg, components=comp, **kw)

    with pytest.raises(ValueError, match=r"observables\['big'\]: token ids must lie in \[0, 64\)"):
        run(observables={"big": torch.full((2, 8), 64)})
    with pytest.raises(ValueError, match=r"observables\['long'\]: contexts have 30 tokens but the model's n_ctx is 24"):
        run(observables={"long": torch.zeros(2, 30, dtype=torch.long)})
    with pytest.raises(ValueError, match="the name 'a' is given twice"):
        run(observables=[("a", probes["a"]), ("a", probes["b"])])
    with pytest.raises(ValueError, match="must be a word"):
        run(observables={"../x": probes["a"]})
    with pytest.raises(ValueError, match="observe_every must be an int >= 1"):
        run(observables=probes, observe_every=0)
    with pytest.raises(ValueError, match="observables_dtype must be one of"):
        run(observables=probes, observables_dtype="int8")
    with pytest.raises(ValueError, match="loss_fn has no per_token"):
        r.estimate_llc(model, tokens, cfg, components=comp, loss_fn=lambda m, b: next_token_loss(m, b),
                       observables=probes)


def test_bayesian_influence_finds_exact_duplicates_and_needs_aligned_draws(small_tl):
    """BIF sanity: a query's largest influence is its own copy among the training samples (correlation
    within 0.01 of 1), for a head and for the whole model; shuffling one side's draws destroys it."""
    model, tokens, _ = small_tl
    g = torch.Generator().manual_seed(5)
    queries = torch.randint(0, 64, (4, 24), generator=g)
    others = torch.randint(0, 64, (8, 24), generator=g)
    where = torch.randperm(12, generator=g)[:4]              # the queries' copies, at scattered rows
    train = torch.empty(12, 24, dtype=torch.long)
    rest = [i for i in range(12) if i not in where.tolist()]
    train[where], train[rest] = queries, others
    cfg = r.SGLDConfig(num_chains=3, num_draws=40, batch_size=8, seed=0)
    comps = {"1:1": r.head(model, 1, 1), "whole": r.whole(model)}
    obs = r.estimate_llc(model, tokens, cfg, components=comps, observables={"q": queries, "train": train}).observations
    for comp in comps:
        q, t = obs.component_losses("q", comp), obs.component_losses("train", comp)
        seq = r.bayesian_influence(q, t)                                       # [4, 12]
        assert seq.argmax(1).tolist() == where.tolist(), (comp, seq)
        assert np.all(np.abs(seq[np.arange(4), where] - 1) < 0.01)
        assert np.abs(np.delete(seq, where, axis=1)).max() < 0.99
        tok = r.bayesian_influence(q, t, per="token", max_memory=20000)        # [4, 12, 23, 23], in blocks
        assert tok.shape == (4, 12, 23, 23)
        diag = tok[np.arange(4), where][:, np.arange(23), np.arange(23)]       # each token with its own copy
        assert np.all(np.abs(diag - 1) < 0.01)
        np.testing.assert_allclose(r.bayesian_influence(q, t, per="token"), tok, rtol=1e-5, atol=1e-6)
        shuffled = np.asarray(t)[:, np.random.default_rng(0).permutation(t.shape[1])]
        broken = r.bayesian_influence(q, shuffled)[np.arange(4), where]
        assert np.abs(broken).mean() < 0.4, broken


@pytest.mark.parametrize("device", DEVICES)
def test_structured_and_generic_paths_record_the_same_probe_losses(small_tl, device):
    """On each device (CUDA: the Philox noise, probe losses kept on the device until the engine's host reads)."""
    import copy

    model, tokens, probes = small_tl
    model = copy.deepcopy(model).to(device)
    cfg = r.SGLDConfig(num_chains=2, num_draws=20, batch_size=8, seed=3)
    comps = {**r.heads(model), "whole": r.whole(model)}
    runs = {e: r.estimate_llc(model, tokens, cfg, components=comps, engine=e, observables=probes).observations
            for e in ("batched", "generic")}
    for name in probes:
        np.testing.assert_allclose(runs["batched"][name], runs["generic"][name], rtol=1e-4, atol=2e-5)
        first = runs["batched"][name][:, :, 0]
        np.testing.assert_allclose(first, np.broadcast_to(runs["batched"].at_optimum[name], first.shape),
                                   rtol=2e-5, atol=2e-5)
        assert np.isfinite(runs["batched"][name]).all()

"""Hessian metrics against exact answers: block traces of Hessians formed in full, the Fisher trace of a softmax
model in closed form, planted ranks of matrices with known spectra, and bad input."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import rllc_fast as r
from rllc_fast import hessian
from rllc_fast.models import attn_only


def _within(result, exact: dict, sigmas: float = 3.0):
    for name, value in exact.items():
        est = result[name]
        assert abs(est.value - value) <= sigmas * est.sem + 1e-5 * abs(value), (name, est.value, est.sem, value)


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(48, 5), torch.randint(0, 3, (48,))
    return model, (x, y)


def _ce(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _exact_hessian(model, params: list, loss):
    """Blocks ``H[i][j]`` of the Hessian of ``loss()`` in ``params`` (by name) formed in full."""
    named = dict(model.named_parameters())
    originals = [named[n] for n in params]

    def f(*values):
        return loss({n: v for n, v in zip(params, values)})

    return torch.autograd.functional.hessian(f, tuple(p.detach() for p in originals))


def _mlp_layer_traces(model, data):
    """The exact Hessian traces of the MLP's two layers ``{"L0", "L2"}`` (weights and biases) on ``data``, and
    the two components."""
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    H = _exact_hessian(model, names, lambda pd: _ce(lambda x: torch.func.functional_call(model, pd, (x,)), data))
    diag = [H[i][i].reshape(p.numel(), p.numel()).diagonal().sum().item()
            for i, p in enumerate(dict(model.named_parameters())[n] for n in names)]
    comps = [r.from_params(model, names[:2], name="L0"), r.from_params(model, names[2:], name="L2")]
    return {"L0": diag[0] + diag[1], "L2": diag[2] + diag[3]}, comps


def test_mlp_block_traces_match_the_exact_hessian():
    model, data = _mlp()
    exact, comps = _mlp_layer_traces(model, data)
    for probes in ("shared", "per-component"):
        res = hessian.trace(model, data, comps, num_probes=2000, num_batches=1, batch_size=48, loss_fn=_ce,
                            probes=probes, probe_chunk=16)
        _within(res, exact)
        assert res["L0"].numel == 42 and res["L2"].numel == 24
    hpp = hessian.trace(model, data, comps, num_probes=90, num_batches=1, batch_size=48, loss_fn=_ce, hutchpp=True)
    _within(hpp, exact)


def test_traces_over_several_batches_are_the_hessian_of_the_mean_loss_over_all_of_them():
    """``num_batches=2``: the estimate is the trace of the Hessian of the mean loss over both batches (here
    every row), whose two halves' traces differ by far more than the standard error (rows of very
    different scales). Catches an estimate that uses only one of the batches."""
    model, (x, y) = _mlp()
    data = (x * torch.linspace(0.2, 3.0, 48)[:, None], y)
    exact, comps = _mlp_layer_traces(model, data)
    _within(hessian.trace(model, data, comps, num_probes=2000, num_batches=2, batch_size=24, loss_fn=_ce,
                          probe_chunk=16), exact)
    _within(hessian.trace(model, data, comps, num_probes=90, num_batches=2, batch_size=24, loss_fn=_ce,
                          hutchpp=True), exact)


def test_hutchpp_is_exact_when_the_sketch_spans_the_block():
    model, data = _mlp()
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    H = _exact_hessian(model, names, lambda pd: _ce(lambda x: torch.func.functional_call(model, pd, (x,)), data))
    bias = r.from_params(model, ["2.bias"], name="b")  # 3 weights: 3 sketch probes span them
    res = hessian.trace(model, data, bias, num_probes=9, num_batches=1, batch_size=48, loss_fn=_ce, hutchpp=True)
    assert res["b"].value == pytest.approx(H[3][3].trace().item(), rel=1e-4)


def _tiny_transformer():
    model = attn_only(seed=1, n_layers=2, d_model=8, n_heads=2, d_head=4, n_ctx=6, d_vocab=12)
    tokens = torch.randint(0, 12, (32, 6), generator=torch.Generator().manual_seed(0))
    return model, tokens


def test_tiny_transformer_head_traces_match_the_exact_hessian():
    model, tokens = _tiny_transformer()
    heads = r.heads(model)
    names = sorted({p for c in heads.values() for p in c.param_names})
    loss = r.losses.NextTokenLoss() if hasattr(r, "losses") else None
    from rllc_fast.losses import NextTokenLoss

    loss = NextTokenLoss()
    H = _exact_hessian(model, names,
                       lambda pd: loss(lambda t: torch.func.functional_call(model, pd, (t,)), tokens))
    params = dict(model.named_parameters())
    exact = {k: 0.0 for k in heads}
    for i, n in enumerate(names):  # every head parameter is [n_heads, ...]: the diagonal per head index
        shape = params[n].shape
        diag = H[i][i].reshape(params[n].numel(), -1).diagonal().view(shape)
        layer = int(n.split(".")[1])
        for h in range(shape[0]):
            exact[f"{layer}:{h}"] += diag[h].sum().item()
    for probes in ("shared", "per-component"):
        res = hessian.trace(model, tokens, heads, num_probes=2000, num_batches=1, batch_size=32, probes=probes,
                            probe_chunk=32)
        _within(res, exact)


def test_hvp_methods_agree_with_the_exact_hessian():
    model, tokens = _tiny_transformer()
    name = "blocks.1.attn.W_K"
    from rllc_fast.losses import NextTokenLoss

    loss = NextTokenLoss()
    H = _exact_hessian(model, [name], lambda pd: loss(lambda t: torch.func.functional_call(model, pd, (t,)), tokens[:8]))
    n = H[0][0].shape[:3].numel()
    v = torch.randn(3, 2, 8, 4, generator=torch.Generator().manual_seed(0))
    want = (v.reshape(3, n) @ H[0][0].reshape(n, n)).reshape(v.shape)
    for method in hessian.METHODS:
        for chunk in (1, 3):
            got = hessian.hvp(model, tokens[:8], {name: v}, method=method, chunk=chunk)[name]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_probes_do_not_depend_on_the_chunk_or_method():
    model, tokens = _tiny_transformer()
    runs = [hessian.trace(model, tokens, r.heads(model), num_probes=6, num_batches=2, batch_size=8, hvp=m,
                          probe_chunk=c) for m, c in [("double-backward", 1), ("double-backward", 4),
                                                      ("forward-over-reverse", 3)]]
    for other in runs[1:]:
        for name in runs[0].estimates:
            assert other[name].value == pytest.approx(runs[0][name].value, rel=1e-4, abs=1e-6)


def test_fim_trace_matches_the_closed_form_fisher_of_a_softmax_model():
    torch.manual_seed(0)
    model = nn.Linear(4, 5)
    x = torch.randn(800, 4)
    with torch.no_grad():
        p = torch.softmax(model(x), dim=-1)
    # d log p_y / dW_kj = (1[y=k] - p_k) x_j, db_k likewise with x_j = 1: E_y over the model gives p_k(1 - p_k)
    exact = ((p * (1 - p)).sum(1) * (x.pow(2).sum(1) + 1)).mean().item()
    res = hessian.fim_trace(model, x, num_probes=4, num_batches=200, batch_size=4, probe_chunk=4)
    _within(res, {"whole": exact})
    assert res["whole"].sem < 0.05 * exact


def test_fim_trace_of_a_language_model_runs_per_head():
    model, tokens = _tiny_transformer()
    res = hessian.fim_trace(model, tokens, r.heads(model), num_probes=2, num_batches=4, batch_size=4)
    assert set(res.estimates) == set(r.heads(model)) and all(np.isfinite(e.value) and e.value > 0 for e in res)


def _planted(n=1000, rank=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.cat([0.5 + 0.5 * torch.rand(rank, generator=g, dtype=torch.float64),
                     0.02 * torch.rand(n - rank, generator=g, dtype=torch.float64) - 0.01])
    return (q * lam) @ q.T


def test_rank_recovers_a_planted_rank():
    A = _planted()
    for interval in ("adaptive", (-0.1, 1.1)):
        est, sem, _ = hessian.matrix_rank(A, tau=0.25, interval=interval, degree=100, num_probes=100)
        assert abs(est - 300) <= 0.03 * 300 and sem < 5, (interval, est, sem)


class _Quadratic(nn.Module):
    """A "model" whose loss is ``w^T A w / 2``: its Hessian is ``A`` exactly."""

    def __init__(self, A):
        super().__init__()
        self.A = A.float()
        self.w = nn.Parameter(torch.randn(A.shape[0]))
        self.u = nn.Parameter(torch.zeros(3))  # a parameter the loss never uses


def _quadratic_loss(model, batch):
    return 0.5 * model.w @ model.A @ model.w + 0.0 * batch.sum()


def test_model_rank_recovers_a_planted_hessian_rank():
    A = _planted(n=200, rank=60, seed=1)
    model = _Quadratic(A)
    data = torch.zeros(8, 1)
    w = r.from_params(model, ["w"], name="w")
    res = hessian.approx_rank(model, data, w, tau=0.25, num_probes=60, num_batches=1, batch_size=8,
                              loss_fn=_quadratic_loss, degree=100)
    assert abs(res["w"].value - 60) <= 0.05 * 60, res
    assert res.info["w"]["highest_eigenvalue"] == pytest.approx(float(torch.linalg.eigvalsh(A)[-1]), rel=0.02)
    fixed = hessian.approx_rank(model, data, w, tau=0.25, interval=(-0.1, 1.2), num_probes=60, num_batches=1,
                                batch_size=8, loss_fn=_quadratic_loss)
    assert abs(fixed["w"].value - 60) <= 0.05 * 60
    with pytest.raises(hessian.SpectrumOutsideIntervalError, match="does not contain the spectrum"):
        hessian.approx_rank(model, data, w, tau=0.25, interval=(0.0, 0.5), num_probes=4, num_batches=1,
                            batch_size=8, loss_fn=_quadratic_loss)


def test_model_rank_runs_per_head():
    model, tokens = _tiny_transformer()
    res = hessian.approx_rank(model, tokens, r.heads(model), num_probes=2, degree=20, power_iters=5,
                              num_batches=1, batch_size=8)
    for name, e in res.estimates.items():
        assert 0 <= e.value <= 1.2 * e.numel and res.info[name]["interval"][0] < 0 < res.info[name]["interval"][1]


# ---------------------------------------------------------------------------- bad input
def test_a_non_scalar_loss_is_refused():
    model, data = _mlp()
    per_sample = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
    with pytest.raises(ValueError, match="scalar"):
        hessian.trace(model, data, num_probes=2, num_batches=1, batch_size=8, loss_fn=per_sample)


def test_a_component_the_loss_ignores_has_trace_zero_with_a_warning():
    model = _Quadratic(_planted(n=20, rank=5))
    comps = [r.from_params(model, ["w"], name="w"), r.from_params(model, ["u"], name="u")]
    with pytest.warns(UserWarning, match="'u': the loss does not depend on its parameters"):
        res = hessian.trace(model, torch.zeros(8, 1), comps, num_probes=4, num_batches=1, batch_size=8,
                            loss_fn=_quadratic_loss)
    assert res["u"].value == 0.0 and res["w"].value != 0.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_probes=0), "num_probes must be an integer >= 1"),
    (dict(num_probes=2, hutchpp=True), "need num_probes >= 3"),
    (dict(probes="blocks"), "probes must be one of"),
    (dict(num_batches=100), "give more data or lower num_batches"),
    (dict(hvp="finite-differences"), "hvp must be 'auto' or one of"),
])
def test_bad_trace_arguments_name_the_argument(kwargs, message):
    model, tokens = _tiny_transformer()
    args = dict(num_probes=2, num_batches=1, batch_size=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        hessian.trace(model, tokens, **args)


def test_bad_rank_arguments_name_the_argument():
    model, tokens = _tiny_transformer()
    with pytest.raises(ValueError, match="needs an absolute tau inside it"):
        hessian.approx_rank(model, tokens, interval=(-1.0, 1.0), num_batches=1)
    with pytest.raises(ValueError, match="num_probes must be an integer >= 1"):
        hessian.approx_rank(model, tokens, num_probes=0, num_batches=1)


def test_jackson_damped_step_is_a_step():
    from rllc_fast.hessian.chebyshev import step_coefficients

    c = step_coefficients(200, -1.0, 1.0, 0.2)
    x = np.linspace(-1, 1, 401)
    p = np.polynomial.chebyshev.chebval(x, c)
    assert np.all(np.abs(p[x < 0.1]) < 0.02) and np.all(np.abs(p[x > 0.3] - 1) < 0.02)
    assert math.isclose(np.polynomial.chebyshev.chebval(0.2, c), 0.5, abs_tol=0.02)


def test_a_list_of_batches_is_the_same_data_as_the_stacked_tensor():
    model, tokens = _tiny_transformer()
    batches = list(tokens.split(8))  # four [8, 6] batches
    heads = r.heads(model)
    calls = [
        lambda d: hessian.trace(model, d, heads, num_probes=3, num_batches=2, batch_size=4),
        lambda d: hessian.fim_trace(model, d, heads, num_probes=2, num_batches=2, batch_size=4),
        lambda d: hessian.approx_rank(model, d, heads, num_probes=2, num_batches=1, batch_size=4, degree=6,
                                      power_iters=3),
    ]
    for call in calls:
        stacked, listed = call(tokens), call(batches)
        for name in heads:
            assert listed[name].value == stacked[name].value and listed[name].sem == stacked[name].sem, name
    mlp, (x, y) = _mlp()  # batches (x_b, y_b) stack into the columns (x, y)
    pairs = list(zip(x.split(16), y.split(16)))
    args = dict(num_probes=4, num_batches=2, batch_size=8, loss_fn=_ce)
    assert hessian.trace(mlp, pairs, **args)["whole"].value == hessian.trace(mlp, (x, y), **args)["whole"].value
    with pytest.raises(ValueError, match="read as a list of batches.*as a tuple"):
        hessian.trace(mlp, [x, y], **args)  # columns in a list: refused, not read as two odd batches


# ---------------------------------------------------------------------------- device placement
def test_matrix_rank_works_on_the_matrix_device(monkeypatch):
    """Probes and start vector are made on the matrix's device and dtype (the meta device stands in for a GPU:
    mixing it with CPU tensors fails as CUDA would)."""
    from rllc_fast.hessian import chebyshev

    seen = []

    def bounds(matvec, v0, iters):
        seen.append(("start", v0.device.type, v0.dtype, matvec(v0).device.type))
        return torch.tensor([-1.0]), torch.tensor([1.0])

    def count(matvec, probes, a, b, tau, degree):
        seen.append(("probes", probes.device.type, probes.dtype, matvec(probes).device.type))
        return torch.ones(probes.shape[0], dtype=torch.float64)

    A = torch.empty(6, 6, dtype=torch.float64, device="meta")
    monkeypatch.setattr(chebyshev, "spectral_bounds", bounds)
    monkeypatch.setattr(chebyshev, "count_above", count)
    est, _, _ = hessian.matrix_rank(A, tau=0.5, num_probes=4)
    assert est == 1.0
    assert seen == [("start", "meta", torch.float64, "meta"), ("probes", "meta", torch.float64, "meta")]


def test_fim_labels_are_drawn_on_the_model_device():
    """The Fisher trace's labels never bring the [positions, classes] probabilities to the host: drawn on the
    meta device they stay there; on the CPU they follow the model's distribution (zero-probability classes never)."""
    from rllc_fast.hessian.trace import draw_labels

    meta = nn.Linear(4, 6).to("meta")
    labels = draw_labels(meta, torch.empty(3, 5, 4, device="meta"), torch.Generator().manual_seed(0))
    assert labels.device.type == "meta" and labels.shape == (3, 5) and labels.dtype == torch.int64

    p = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0])

    class Fixed(nn.Module):
        def forward(self, x):
            return p.log().expand(x.shape[0], -1)

    labels = draw_labels(Fixed(), torch.zeros(40_000, 1), torch.Generator().manual_seed(0))
    freq = torch.bincount(labels, minlength=5).double() / labels.numel()
    assert freq[1] == 0 and freq[4] == 0
    assert torch.allclose(freq, p.double(), atol=4 * math.sqrt(0.25 / labels.numel()))
    again = draw_labels(Fixed(), torch.zeros(40_000, 1), torch.Generator().manual_seed(0))
    assert torch.equal(labels, again)  # a seed gives the same labels


def test_probe_seeds_reach_the_device_in_one_copy(monkeypatch):
    """Each probe's rng_state is a row of one [probes, 2] tensor made at once (not a blocking copy per probe),
    and each row is still [seed, stream]: the probes are those drawn one by one."""
    from rllc_fast import ops
    from rllc_fast.hessian.operator import Support

    model, _ = _mlp()
    comps = {"a": r.from_params(model, ["0.weight"], name="a"), "b": r.from_params(model, ["2.weight"], name="b")}
    support = Support(model, comps, "cpu")
    states = []
    with monkeypatch.context() as m:
        m.setattr(ops, "rademacher", lambda P, n, state: states.append(state) or torch.ones(P, n))
        support.shared_probes(7, [3, 4, 5])
        support.component_probes(["a", "b"], 7, [1, 2])
    assert [s.tolist() for s in states] == [[7, 3], [7, 4], [7, 5], [7, 1], [7, 2]]
    assert len({s.untyped_storage().data_ptr() for s in states[:3]}) == 1
    assert len({s.untyped_storage().data_ptr() for s in states[3:]}) == 1
    one = ops.rademacher(1, support.numel, torch.tensor([7, 4]))
    assert torch.equal(support.shared_probes(7, [3, 4, 5])[1], (one * support.mask)[0])


def test_metrics_move_a_model_quietly_and_only_when_elsewhere(capsys):
    """TransformerLens prints when a model is moved; a Hessian metric asked for another device moves it without
    printing (a sweep printed "Moving model to device: cuda" per unit), and leaves one already there alone."""
    from rllc_fast.hessian.setup import prepare

    model, tokens = _tiny_transformer()
    prepare(model, None, tokens, 1, 8, 0, "auto", None, torch.device("cpu"))
    setup = prepare(model, None, tokens, 1, 8, 0, "auto", None, "meta")
    assert next(model.parameters()).device.type == "meta" and setup.device.type == "meta"
    assert setup.support.mask.device.type == "meta" and setup.batches[0].device.type == "meta"
    assert capsys.readouterr().out == ""

"""The custom ops: the PyTorch fallback against literal loops, opcheck, noise statistics, errors.

CUDA cases exist only where a GPU is present (DEVICES), where the CUDA kernels are checked
against the CPU fallback: same formula, noise checked statistically, reproducible under a seed.
"""
import math
import re
from pathlib import Path

import pytest
import torch

from rllc_fast import ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ROOT = Path(__file__).resolve().parents[1]


def _literal_sgld(w, grad, w_star, lengths, noise, eps, nbeta, gamma):
    """The formula written out per replica tensor, element range by element range."""
    out = w.clone()
    for r in range(w.shape[0]):
        k = int(lengths[r])
        v, g, v0, xi = w[r, :k].float(), grad[r, :k].float(), w_star[r, :k].float(), noise[r, :k]
        out[r, :k] = (v - eps / 2 * (nbeta * g + gamma * (v - v0)) + math.sqrt(eps) * xi).to(w.dtype)
    return out


def _inputs(device, dtype=torch.float32, R=5, n=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(R, n, generator=g).to(device, dtype)
    grad = torch.randn(R, n, generator=g).to(device, dtype)
    w_star = torch.randn(R, n, generator=g).to(device, dtype)
    lengths = torch.tensor([n, 0, 5, n - 1, 20][:R], device=device)
    noise = torch.randn(R, n, generator=g).to(device)
    return w, grad, w_star, lengths, noise


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sgld_step_matches_literal_loop_and_leaves_padding_untouched(device, dtype):
    w, grad, w_star, lengths, noise = _inputs(device, dtype)
    expected = _literal_sgld(w.cpu(), grad.cpu(), w_star.cpu(), lengths.cpu(), noise.cpu(), 1e-2, 30.0, 200.0)
    before = w.clone()
    sq = ops.sgld_step(w, grad, w_star, lengths, step_size=1e-2, nbeta=30.0, localization=200.0, noise=noise)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(w.cpu(), expected, **tol)
    for r, k in enumerate(lengths.tolist()):  # padding: bit for bit
        assert torch.equal(w[r, k:], before[r, k:])
    mask = torch.arange(w.shape[1], device=device) < lengths[:, None]
    want = (((w.float() - w_star.float()) * mask) ** 2).sum(1)
    torch.testing.assert_close(sq, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_generated_noise_is_standard_normal_and_independent(device):
    R, n = 8, 20_000
    w = torch.zeros(R, n, device=device)
    zeros = torch.zeros_like(w)
    lengths = torch.full((R,), n, device=device)
    rng = torch.tensor([1234, 0], device=device)
    ops.sgld_step(w, zeros, zeros, lengths, step_size=1e-2, nbeta=1.0, localization=0.0, rng_state=rng)
    xi = (w / math.sqrt(1e-2)).double().cpu()
    assert abs(xi.mean()) < 5 / math.sqrt(R * n)
    assert abs(xi.var() - 1) < 0.02
    assert abs((xi**4).mean() / xi.var() ** 2 - 3) < 0.1  # Gaussian kurtosis
    corr = torch.corrcoef(xi)  # across replicas
    off = corr[~torch.eye(R, dtype=torch.bool)]
    assert off.abs().max() < 5 / math.sqrt(n)
    lag1 = (xi[:, 1:] * xi[:, :-1]).mean()  # across neighbouring elements
    assert abs(lag1) < 5 / math.sqrt(R * n)


@pytest.mark.parametrize("device", DEVICES)
def test_generated_noise_is_reproducible_and_offset_changes_it(device):
    def draw(seed, offset):
        w = torch.zeros(3, 100, device=device)
        z = torch.zeros_like(w)
        ops.sgld_step(w, z, z, torch.full((3,), 100, device=device), step_size=1.0, nbeta=1.0,
                      localization=0.0, rng_state=torch.tensor([seed, offset], device=device))
        return w

    assert torch.equal(draw(5, 0), draw(5, 0))
    assert not torch.equal(draw(5, 0), draw(5, 1))
    assert not torch.equal(draw(5, 0), draw(6, 0))


@pytest.mark.parametrize("device", DEVICES)
def test_rademacher_probes(device):
    rng = torch.tensor([7, 3], device=device)
    v = ops.rademacher(16, 5000, rng)
    assert v.shape == (16, 5000) and v.dtype == torch.float32
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    assert abs(v.mean().item()) < 5 / math.sqrt(v.numel())
    corr = torch.corrcoef(v.double().cpu())
    assert corr[~torch.eye(16, dtype=torch.bool)].abs().max() < 5 / math.sqrt(5000)
    assert torch.equal(v, ops.rademacher(16, 5000, rng))


@pytest.mark.parametrize("device", DEVICES)
def test_blocked_dot_matches_dense_per_block_sums(device):
    g = torch.Generator().manual_seed(0)
    v, hv = torch.randn(4, 50, generator=g).to(device), torch.randn(4, 50, generator=g).to(device)
    offsets = torch.tensor([0, 10, 10, 33, 50], device=device)
    got = ops.blocked_dot(v, hv, offsets)
    want = torch.stack([(v[:, a:b] * hv[:, a:b]).sum(1) for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())], 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    w, grad, w_star, lengths, noise = _inputs(device)
    torch.library.opcheck(torch.ops.rllc_fast.sgld_step.default,
                          (w, grad, w_star, lengths, noise, None, 1e-3, 30.0, 200.0))
    rng = torch.tensor([1, 2], device=device)
    torch.library.opcheck(torch.ops.rllc_fast.sgld_step.default,
                          (w, grad, w_star, lengths, None, rng, 1e-3, 30.0, 200.0),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.rllc_fast.rademacher.default, (4, 10, rng),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.rllc_fast.blocked_dot.default,
                          (noise, noise, torch.tensor([0, 7, 37], device=device)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(w=a["w"][0]), "w must be 2-D"),
        (lambda a: a.update(w=a["w"].double()), "w must be float32"),
        (lambda a: a.update(grad=a["grad"][:, :3]), "grad must have w's shape"),
        (lambda a: a.update(w_star=a["w_star"].bfloat16()), "w_star must have w's dtype"),
        (lambda a: a.update(lengths=a["lengths"][:2]), "lengths must be"),
        (lambda a: a.update(lengths=a["lengths"].int()), "lengths must be int64"),
        (lambda a: a.update(noise=a["noise"][:, :2]), "noise must have w's shape"),
        (lambda a: a.update(noise=None), "pass noise or rng_state"),
        (lambda a: a.update(noise=None, rng_state=torch.tensor([1.0, 2.0], device=a["w"].device)), "rng_state must be int64"),
    ],
)
def test_bad_arguments_name_the_argument(device, change, match):
    w, grad, w_star, lengths, noise = _inputs(device)
    args = dict(w=w, grad=grad, w_star=w_star, lengths=lengths, noise=noise, rng_state=None)
    change(args)
    with pytest.raises(ValueError, match=match):
        torch.ops.rllc_fast.sgld_step(args["w"], args["grad"], args["w_star"], args["lengths"], args["noise"],
                                      args["rng_state"], 1e-3, 30.0, 200.0)


def test_python_schemas_equal_the_cpp_definitions():
    source = (ROOT / "csrc" / "ops.cpp").read_text()
    cpp = dict((m.group(1), m.group(0)[1:-1]) for m in re.finditer(r'"(\w+)\([^"]*"', source))
    assert cpp == ops.SCHEMAS


def test_backend_reports_an_implementation():
    assert "fallback" in ops.backend() or "CUDA kernels" in ops.backend()


def test_rmsprop_delta_is_the_written_formula():
    from rllc_fast.sgld import rmsprop_sgld_delta

    g = torch.Generator().manual_seed(0)
    v, grad, v_star, noise = (torch.randn(5, 7, generator=g) for _ in range(4))
    avg = torch.rand(5, 7, generator=g)
    a0 = avg.clone()
    eps, nbeta, gamma, alpha, reps = 1e-3, 30.0, 200.0, 0.9, 0.1
    delta = rmsprop_sgld_delta(v, grad, v_star, noise, avg, eps, nbeta, gamma, alpha, reps)
    a1 = alpha * a0 + (1 - alpha) * grad**2
    P = 1 / (a1.sqrt() + reps)
    expect = -eps / 2 * P * (nbeta * grad + gamma * (v - v_star)) + (eps * P).sqrt() * noise
    torch.testing.assert_close(avg, a1)
    torch.testing.assert_close(delta, expect)

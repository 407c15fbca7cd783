"""The custom ops: the PyTorch fallback against literal loops, opcheck, noise statistics, errors.

CUDA cases (DEVICES, tests/devices.py: marked ``cuda``, skipped without a GPU) check the CUDA kernels
against the CPU fallback: same formula, noise checked statistically, reproducible under a seed.
"""
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from devices import DEVICES, cuda_only
from rllc_fast import ops

ROOT = Path(__file__).resolve().parents[1]


def _literal_sgld(w, grad, w_star, lengths, noise, eps, nbeta, gamma, square_avg=None, alpha=0.99, reps=0.1):
    """The formula written out per replica tensor, element range by element range.

    Returns the new ``w`` (and the new ``square_avg`` when one is given: the RMSProp variant)."""
    out, avg = w.clone(), None if square_avg is None else square_avg.clone()
    for r in range(w.shape[0]):
        k = int(lengths[r])
        v, g, v0, xi = w[r, :k].float(), grad[r, :k].float(), w_star[r, :k].float(), noise[r, :k]
        if avg is None:
            out[r, :k] = (v - eps / 2 * (nbeta * g + gamma * (v - v0)) + math.sqrt(eps) * xi).to(w.dtype)
        else:
            avg[r, :k] = alpha * avg[r, :k] + (1 - alpha) * g * g
            P = 1 / (torch.sqrt(avg[r, :k]) + reps)
            out[r, :k] = (v - eps / 2 * P * (nbeta * g + gamma * (v - v0)) + torch.sqrt(eps * P) * xi).to(w.dtype)
    return out if avg is None else (out, avg)


def _noise_drawn_by_op(device, rng_state, R, n):
    """The noise ``sgld_step`` draws from ``rng_state`` for an ``[R, n]`` buffer: the step from
    w = w* = 0 with zero gradient and step size 1 is exactly xi."""
    w = torch.zeros(R, n, device=device)
    z = torch.zeros_like(w)
    ops.sgld_step(w, z, z, torch.full((R,), n, device=device), step_size=1.0, nbeta=1.0, localization=0.0,
                  rng_state=rng_state)
    return w


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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsprop_step_matches_literal_loop_and_leaves_padding_untouched(device, dtype):
    w, grad, w_star, lengths, noise = _inputs(device, dtype)
    avg = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)).to(device)
    want_w, want_avg = _literal_sgld(w.cpu(), grad.cpu(), w_star.cpu(), lengths.cpu(), noise.cpu(), 1e-2, 30.0,
                                     200.0, avg.cpu(), alpha=0.9, reps=0.05)
    w0, avg0 = w.clone(), avg.clone()
    sq = ops.sgld_step(w, grad, w_star, lengths, step_size=1e-2, nbeta=30.0, localization=200.0, noise=noise,
                       square_avg=avg, rmsprop_alpha=0.9, rmsprop_eps=0.05)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(w.cpu(), want_w, **tol)
    torch.testing.assert_close(avg.cpu(), want_avg, rtol=1e-6, atol=1e-6)
    for r, k in enumerate(lengths.tolist()):
        assert torch.equal(w[r, k:], w0[r, k:]) and torch.equal(avg[r, k:], avg0[r, k:])
    mask = torch.arange(w.shape[1], device=device) < lengths[:, None]
    torch.testing.assert_close(sq, (((w.float() - w_star.float()) * mask) ** 2).sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_in_padding_stays_out_of_the_distance(device):
    w, grad, w_star, lengths, noise = _inputs(device)
    w[2, 5:] = float("nan")  # replica 2 uses 5 elements
    sq = ops.sgld_step(w, grad, w_star, lengths, step_size=1e-2, nbeta=30.0, localization=200.0, noise=noise)
    assert torch.isfinite(sq).all()
    assert torch.isnan(w[2, 5:]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rmsprop", [False, True])
def test_replicas_longer_than_a_tile_are_updated_and_measured_in_every_tile(device, rmsprop):
    """Replicas of more than ``ops.TILE_ELEMENTS`` weights (a Pythia-70m head slice has 131,264) span
    several column tiles of the CPU fallback: every tile must be updated and every tile's part of
    ``||w - w*||^2`` summed. Catches a distance that keeps only the last tile, and a last (partial)
    tile that is never updated; lengths end inside the first, second and third tile."""
    n = 2 * ops.TILE_ELEMENTS + 37
    g = torch.Generator().manual_seed(7)
    w_star = torch.randn(3, n, generator=g)
    w = w_star + 0.01 * torch.randn(3, n, generator=g)
    grad, noise = torch.randn(3, n, generator=g), torch.randn(3, n, generator=g)
    lengths = torch.tensor([n, ops.TILE_ELEMENTS + 5, 1000])
    avg = torch.rand(3, n, generator=g) if rmsprop else None
    want = _literal_sgld(w, grad, w_star, lengths, noise, 1e-3, 30.0, 200.0,
                         *(() if avg is None else (avg, 0.99, 0.1)))
    want_w = want if avg is None else want[0]
    got = w.clone().to(device)
    sq = ops.sgld_step(got, grad.to(device), w_star.to(device), lengths.to(device), step_size=1e-3, nbeta=30.0,
                       localization=200.0, noise=noise.to(device), square_avg=None if avg is None else avg.to(device))
    torch.testing.assert_close(got.cpu(), want_w, rtol=1e-6, atol=1e-6)
    assert not torch.equal(got.cpu()[0, -37:], w[0, -37:])  # the last partial tile moved
    expect_sq = torch.stack([((want_w[r, :k] - w_star[r, :k]) ** 2).sum() for r, k in enumerate(lengths.tolist())])
    torch.testing.assert_close(sq.cpu(), expect_sq, rtol=1e-5, atol=0.0)


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
        return _noise_drawn_by_op(device, torch.tensor([seed, offset], device=device), 3, 100)

    assert torch.equal(draw(5, 0), draw(5, 0))
    assert not torch.equal(draw(5, 0), draw(5, 1))
    assert not torch.equal(draw(5, 0), draw(6, 0))


@pytest.mark.parametrize("device", DEVICES)
def test_new_rng_state_follows_manual_seed_and_generators(device):
    def noise(rng):
        return _noise_drawn_by_op(device, rng, 2, 50)

    torch.manual_seed(3)
    a = ops.new_rng_state(device)
    torch.manual_seed(3)
    b = ops.new_rng_state(device)
    assert a.dtype == torch.int64 and a.device.type == device and int(a[1]) == 0
    assert torch.equal(noise(a), noise(b))
    assert not torch.equal(noise(a), noise(ops.new_rng_state(device)))  # the global stream moved on
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(noise(ops.new_rng_state(device, g1)), noise(ops.new_rng_state(device, g2)))


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
    torch.library.opcheck(torch.ops.rllc_fast.sgld_step.default,
                          (w, grad, w_star, lengths, noise, None, 1e-3, 30.0, 200.0, torch.rand_like(w), 0.9, 0.1))
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
        (lambda a: a.update(grad=a["grad"].t().contiguous().t()), r"grad must be contiguous \(pass grad.contiguous\(\)\)"),
        (lambda a: a.update(noise=a["noise"].t().contiguous().t()), "noise must be contiguous"),
        (lambda a: a.update(lengths=torch.stack([a["lengths"], a["lengths"]], 1)[:, 0]), "lengths must be contiguous"),
        (lambda a: a.update(lengths=a["lengths"][:2]), "lengths must be"),
        (lambda a: a.update(lengths=a["lengths"].int()), "lengths must be int64"),
        (lambda a: a.update(noise=a["noise"][:, :2]), "noise must have w's shape"),
        (lambda a: a.update(noise=None), "pass noise or rng_state"),
        (lambda a: a.update(noise=None, rng_state=torch.tensor([1.0, 2.0], device=a["w"].device)), "rng_state must be int64"),
        (lambda a: a.update(square_avg=torch.zeros_like(a["w"]).double()), "square_avg must be float32"),
        (lambda a: a.update(square_avg=torch.zeros_like(a["w"])[:, :4]), "square_avg must have w's shape"),
        (lambda a: a.update(square_avg=torch.zeros_like(a["w"]), alpha=1.0), "rmsprop_alpha must be in"),
        (lambda a: a.update(square_avg=torch.zeros_like(a["w"]), reps=0.0), "rmsprop_eps must be > 0"),
    ],
)
def test_bad_arguments_name_the_argument(device, change, match):
    w, grad, w_star, lengths, noise = _inputs(device)
    args = dict(w=w, grad=grad, w_star=w_star, lengths=lengths, noise=noise, rng_state=None, square_avg=None,
                alpha=0.99, reps=0.1)
    change(args)
    with pytest.raises(ValueError, match=match):
        torch.ops.rllc_fast.sgld_step(args["w"], args["grad"], args["w_star"], args["lengths"], args["noise"],
                                      args["rng_state"], 1e-3, 30.0, 200.0, args["square_avg"], args["alpha"],
                                      args["reps"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda d: ops.blocked_dot(torch.ones(2, 5, device=d), torch.ones(2, 4, device=d), torch.tensor([0, 5], device=d)),
         "hv must have v's shape"),
        (lambda d: ops.blocked_dot(torch.ones(2, 5, device=d).double(), torch.ones(2, 5, device=d).double(),
                                   torch.tensor([0, 5], device=d)), "v must be float32"),
        (lambda d: ops.blocked_dot(torch.ones(2, 5, device=d), torch.ones(2, 5, device=d), torch.tensor([0, 5.0], device=d)),
         "offsets must be int64"),
        (lambda d: ops.rademacher(0, 5, torch.tensor([0, 0], device=d)), "num_probes and n must be >= 1"),
        (lambda d: ops.rademacher(2, 5, torch.tensor([0, 0, 0], device=d)), r"rng_state must be int64 \[2\]"),
    ],
)
def test_hutchinson_ops_bad_arguments_name_the_argument(device, call, match):
    with pytest.raises(ValueError, match=match):
        call(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offsets", [[0, 3, 4], [0, 3, 2, 5], [1, 3, 5]])
def test_blocked_dot_bad_offsets_raise_on_cpu_and_give_nan_on_cuda(device, offsets):
    """The CPU op reads the offsets and raises; the CUDA kernel checks them without a host sync and
    makes the blocks they spoil NaN (the CUDA op then cannot raise without a sync)."""
    v = torch.ones(2, 5, device=device)
    bad = torch.tensor(offsets, device=device)
    if device == "cpu" or not ops.CUDA_KERNELS:
        with pytest.raises(ValueError, match="offsets must rise from 0 to n = 5"):
            ops.blocked_dot(v, v, bad)
    else:
        assert torch.isnan(ops.blocked_dot(v, v, bad)).any()


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_raise_in_a_fresh_process(device):
    """Each op given a bad argument raises ValueError in a process of its own, so that a crash (as the
    CUDA op's `w must be 2-D` case ended the test process on the 2026-11-30 H200 run) is reported with
    its signal here instead of ending the test session."""
    code = f"""
import torch
from rllc_fast import ops
d = {device!r}
w = torch.zeros(3, 8, device=d)
calls = [
    lambda: ops.sgld_step(w[0], w[0], w[0], torch.tensor([8], device=d), step_size=1.0, nbeta=1.0, localization=0.0,
                          noise=w[0]),
    lambda: ops.sgld_step(w, w.t().contiguous().t(), w, torch.tensor([8, 8, 8], device=d), step_size=1.0, nbeta=1.0,
                          localization=0.0, noise=w),
    lambda: ops.rademacher(2, 5, torch.tensor([0, 0, 0], device=d)),
    lambda: ops.blocked_dot(w[0], w[0], torch.tensor([0, 8], device=d)),
]
for call in calls:
    try:
        call()
    except ValueError as e:
        print(e)
    else:
        raise SystemExit("no ValueError")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, f"exit status {out.returncode} (negative: killed by that signal)\n{out.stderr}"
    assert out.stdout.splitlines() == [
        "sgld_step: w must be 2-D [replicas, n], got shape [8]",
        "sgld_step: grad must be contiguous (pass grad.contiguous())",
        "rademacher: rng_state must be int64 [2] = [seed, offset], got int64 [3]",
        "blocked_dot: v must be 2-D [probes, n], got shape [8]",
    ]


def test_python_schemas_equal_the_cpp_definitions():
    source = (ROOT / "csrc" / "ops.cpp").read_text()
    cpp = dict((m.group(1), m.group(0)[1:-1]) for m in re.finditer(r'"(\w+)\([^"]*"', source))
    assert cpp == ops.SCHEMAS


def test_package_works_without_the_compiled_extension():
    """With ``rllc_fast._C`` unimportable, ops.py defines the schemas itself and the fallback serves."""
    code = """
import sys
sys.modules["rllc_fast._C"] = None  # makes `from . import _C` raise ImportError
import torch
from rllc_fast import ops
assert not ops._EXTENSION and "extension not built" in ops.backend(), ops.backend()
assert torch.ops.rllc_fast.sgld_step.default._schema == torch._C.parse_schema("rllc_fast::" + ops.SCHEMAS["sgld_step"])
w = torch.zeros(2, 3); z = torch.zeros_like(w); avg = torch.zeros_like(w)
sq = ops.sgld_step(w, z, z, torch.tensor([3, 1]), step_size=1.0, nbeta=1.0, localization=0.0, noise=torch.ones_like(w),
                   square_avg=avg, rmsprop_eps=0.01)
assert torch.equal(w, torch.tensor([[10.0, 10.0, 10.0], [10.0, 0.0, 0.0]])), w  # sqrt(1 / (0 + 0.01)) = 10
assert torch.equal(sq, torch.tensor([300.0, 100.0]))
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_backend_names_the_state_that_holds():
    """``backend()`` names which of its three states holds here (the old check accepted any of its
    strings, since all of them contain "fallback"); the "not built" state is checked in a subprocess above."""
    import importlib.util
    built = importlib.util.find_spec("rllc_fast._C") is not None
    assert ops._EXTENSION == built
    if torch.version.cuda is None:  # a CPU-only torch cannot have registered CUDA kernels
        assert not ops.CUDA_KERNELS
    if ops.CUDA_KERNELS:
        assert ops.backend().startswith("compiled extension: CUDA kernels on GPU")
    elif built:
        assert ops.backend() == "compiled extension without CUDA: PyTorch fallback on every device but the two CPU kernels"
        assert ops.CPU_KERNELS  # built from these sources
    else:
        assert ops.backend() == "PyTorch fallback on every device (extension not built)"


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


# ---------------------------------------------------------------------------- CUDA kernels
# Their CUDA cases need a GPU and the extension built with CUDA (FORCE_CUDA=1 pip install ...); without a
# GPU they are skipped, which the README's test section and the GPU results JSON say.
@pytest.mark.parametrize("device", DEVICES)
def test_every_op_has_a_kernel_for_the_device(device):
    key = {"cpu": "CPU", "cuda": "CUDA"}[device]
    for name in ops.SCHEMAS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rllc_fast::{name}", key), (name, key)
    if device == "cuda":
        assert ops.CUDA_KERNELS, ("a GPU is visible but rllc_fast._C has no CUDA kernels: rebuild with "
                                  "FORCE_CUDA=1 pip install --no-build-isolation -e .")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rmsprop", [False, True])
def test_op_equals_the_cpu_fallback_and_the_literal_loop(device, dtype, rmsprop):
    """n = 3001 spans several CUDA blocks per replica; the CPU op is the fallback."""
    args = _inputs("cpu", dtype, R=5, n=3001)
    avg = torch.rand(args[0].shape, generator=torch.Generator().manual_seed(2)) if rmsprop else None
    kw = dict(step_size=1e-3, nbeta=30.0, localization=200.0, rmsprop_alpha=0.9, rmsprop_eps=0.1)
    literal = _literal_sgld(*args, 1e-3, 30.0, 200.0, avg, alpha=0.9, reps=0.1)
    want_w = literal[0] if rmsprop else literal
    dev_args = [a.to(device, copy=True) for a in args]
    dev_avg = avg.to(device, copy=True) if rmsprop else None
    sq_cpu = ops.sgld_step(*args[:4], noise=args[4], square_avg=avg, **kw)
    sq_dev = ops.sgld_step(*dev_args[:4], noise=dev_args[4], square_avg=dev_avg, **kw)
    loop_tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(args[0], want_w, **loop_tol)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-5)  # 1 bf16 ulp
    torch.testing.assert_close(dev_args[0].cpu(), args[0], **tol)
    torch.testing.assert_close(sq_dev.cpu(), sq_cpu, rtol=1e-4, atol=1e-4)
    if rmsprop:
        torch.testing.assert_close(avg, literal[1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dev_avg.cpu(), avg, rtol=1e-6, atol=1e-6)


# The kernels' own Philox draws, element by element: no CPU counterpart in this file (the CPU fallback
# draws from torch generators); the emulated kernels (pytest -k emulat) check the same on the CPU.
@cuda_only
def test_cuda_noise_is_the_philox_stream_of_each_element():
    """xi of flat element r * n + j from Philox(seed, step), four elements per call; n > 1024 blocks x
    256 threads x 4 elements, so the grid-stride loop covers some elements on a second pass: the draw
    must not depend on the launch grid."""
    from philox_reference import philox_normal

    R, n, seed, step = 2, 1_100_003, 2**62 + 12345, 7
    w = _noise_drawn_by_op("cuda", torch.tensor([seed, step], device="cuda"), R, n)
    want = torch.from_numpy(philox_normal(seed, step, range(R * n))).reshape(R, n)
    torch.testing.assert_close(w.cpu(), want, rtol=1e-5, atol=1e-5)


@cuda_only
def test_cuda_rademacher_is_the_philox_stream():
    from philox_reference import philox_rademacher

    P, n = 3, 100_003
    v = ops.rademacher(P, n, torch.tensor([99, 4], device="cuda"))
    want = torch.from_numpy(philox_rademacher(99, 4, range(P * n))).reshape(P, n)
    assert torch.equal(v.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rmsprop", [False, True])
def test_graph_of_a_full_sgld_step_replays_like_eager_steps(device, rmsprop):
    """Gradient (of a least-squares loss per replica), the fused step and the step counter, captured
    once and replayed: the same as the same steps run eagerly (same noise: the counter advances).
    On CUDA a CUDA graph; on the CPU the "replay" reruns the step on a second state: bit for bit."""
    R, n, m, steps = 6, 257, 40, 5
    g = torch.Generator().manual_seed(3)
    A, b = torch.randn(m, n, generator=g).to(device) / n, torch.randn(R, m, generator=g).to(device)
    w0 = torch.randn(R, n, generator=g).to(device)
    lengths = torch.tensor([n, n, 100, 0, n - 1, 7], device=device)

    def make_state():
        return dict(w=w0.clone(), grad=torch.zeros_like(w0), rng=torch.tensor([11, 0], device=device),
                    avg=torch.zeros_like(w0) if rmsprop else None, sq=torch.zeros(R, device=device))

    def full_step(s):
        s["grad"].copy_(2 * (s["w"] @ A.T - b) @ A)
        s["sq"].copy_(ops.sgld_step(s["w"], s["grad"], w0, lengths, step_size=1e-3, nbeta=30.0, localization=200.0,
                                    rng_state=s["rng"], square_avg=s["avg"]))
        s["rng"][1] += 1

    eager = make_state()
    for _ in range(steps):
        full_step(eager)

    graphed = make_state()
    if device == "cuda":
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture, then reset the state
            full_step(make_state())
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            full_step(graphed)
        replay = graph.replay
    else:
        def replay():
            full_step(graphed)
    # capture does not run the step: graphed is still at its initial state
    assert torch.equal(graphed["w"], w0) and int(graphed["rng"][1]) == 0
    for _ in range(steps):
        replay()
    if device == "cuda":
        torch.cuda.synchronize()
    assert int(graphed["rng"][1]) == steps
    # the matmul may pick another cuBLAS algorithm under capture: equal up to float rounding
    close = dict(rtol=1e-5, atol=1e-6) if device == "cuda" else dict(rtol=0, atol=0)
    torch.testing.assert_close(graphed["w"], eager["w"], **close)
    torch.testing.assert_close(graphed["sq"], eager["sq"], **close)
    if rmsprop:
        torch.testing.assert_close(graphed["avg"], eager["avg"], **close)
    assert not torch.equal(graphed["w"], w0)  # the replays did move the chains
    for r, k in enumerate(lengths.tolist()):
        assert torch.equal(graphed["w"][r, k:], w0[r, k:])


def test_the_fallback_warns_once_when_it_serves_a_cuda_device(monkeypatch):
    """Without compiled CUDA kernels the fallback would serve CUDA tensors silently (noise drawn on the CPU
    and copied over every step): it warns once per process, naming the rebuild."""
    import warnings

    monkeypatch.setattr(ops, "_warned_fallback_on_cuda", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.warn_fallback_on(torch.device("cpu"), "sgld_step")
    with pytest.warns(ops.FallbackOnCudaWarning, match="sgld_step on cuda:0 runs the PyTorch fallback.*FORCE_CUDA=1"):
        ops.warn_fallback_on(torch.device("cuda:0"), "sgld_step")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.warn_fallback_on(torch.device("cuda:1"), "rademacher")

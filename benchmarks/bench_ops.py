"""sgld_step (one op over all replicas) against the unfused PyTorch expression and a per-replica
loop (devinterp's way), plain and RMSProp-preconditioned; on a GPU also with the kernel's own Philox
noise; Hutchinson's blocked reduction against a PyTorch per-block loop.

Run:  python -m pytest benchmarks/bench_ops.py --benchmark-json=benchmarks/results/ops-<device>.json
Each row's extra_info holds the replicas, elements, bytes moved per step, achieved GB/s and the
fraction of the reference bandwidth (vendor peak on a known GPU, measured copy rate on a CPU).
"""
import math

import pytest
import torch

from conftest import device_name, sync
from rllc_fast import ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
EPS, NBETA, GAMMA = 1e-3, 30.0, 200.0

# (case, replicas, elements per replica); Pythia-70m head: 3 x 512 x 64 + 64 x 512 + 3 x 64.
CASES = {
    "2layer-heads-64rep": (64, 32_864),
    "pythia70m-head-192rep": (192, 131_264),
    "pythia70m-layer-24rep": (24, 3_151_872),   # 6 layers x 4 chains (whole blocks)
}
GPU_ONLY = {"pythia70m-layer-192rep": (192, 3_151_872)}


def _buffers(device, replicas, n):
    g = torch.Generator(device=device).manual_seed(0)
    make = lambda: torch.randn(replicas, n, device=device, generator=g)  # noqa: E731
    return make(), make(), make(), make(), torch.full((replicas,), n, device=device)


def _record(benchmark, bandwidth_reference, device, replicas, n, kind, arrays=5):
    """``arrays``: float32 arrays read or written once per step (5: read w, grad, w*, noise; write w)."""
    bytes_moved = arrays * replicas * n * 4
    seconds = benchmark.stats.stats.min
    ref, what = bandwidth_reference(device)
    benchmark.extra_info.update(
        device=device_name(device), replicas=replicas, elements=replicas * n, kind=kind,
        bytes_per_step=bytes_moved, achieved_GBps=bytes_moved / seconds / 1e9,
        fraction_of_reference=bytes_moved / seconds / ref, reference=what, reference_GBps=ref / 1e9,
    )


def _cases(device):
    cases = dict(CASES)
    if device == "cuda":
        cases.update(GPU_ONLY)
    return [(device, name, *shape) for name, shape in cases.items()]


PARAMS = [c for d in DEVICES for c in _cases(d)]
IDS = [f"{d}-{name}" for d, name, _, _ in PARAMS]


@pytest.mark.parametrize("device, case, replicas, n", PARAMS, ids=IDS)
def test_sgld_step_op(benchmark, bandwidth_reference, device, case, replicas, n):
    benchmark.group = f"sgld_step {case} {device}"
    w, grad, w_star, noise, lengths = _buffers(device, replicas, n)

    def run():
        ops.sgld_step(w, grad, w_star, lengths, step_size=EPS, nbeta=NBETA, localization=GAMMA, noise=noise)
        sync(device)

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    _record(benchmark, bandwidth_reference, device, replicas, n, "fused op (one call, all replicas)")


CUDA_PARAMS = [c for c in PARAMS if c[0] == "cuda"]


@pytest.mark.parametrize("device, case, replicas, n", CUDA_PARAMS, ids=[f"{d}-{c}" for d, c, _, _ in CUDA_PARAMS])
def test_sgld_step_op_philox_noise(benchmark, bandwidth_reference, device, case, replicas, n):
    """The engine's GPU call: noise drawn in the kernel (Philox), so 4 arrays move instead of 5."""
    benchmark.group = f"sgld_step {case} {device}"
    w, grad, w_star, _, lengths = _buffers(device, replicas, n)
    rng = torch.tensor([1, 0], device=device)

    def run():
        ops.sgld_step(w, grad, w_star, lengths, step_size=EPS, nbeta=NBETA, localization=GAMMA, rng_state=rng)
        sync(device)

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    _record(benchmark, bandwidth_reference, device, replicas, n, "fused op, Philox noise in the kernel", arrays=4)


@pytest.mark.parametrize("device, case, replicas, n", PARAMS, ids=IDS)
def test_unfused_expression(benchmark, bandwidth_reference, device, case, replicas, n):
    benchmark.group = f"sgld_step {case} {device}"
    w, grad, w_star, noise, _ = _buffers(device, replicas, n)

    def run():
        w.add_(-EPS / 2 * (NBETA * grad + GAMMA * (w - w_star)) + math.sqrt(EPS) * noise)
        sync(device)

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    _record(benchmark, bandwidth_reference, device, replicas, n, "unfused PyTorch expression over all replicas")


@pytest.mark.parametrize("device, case, replicas, n", PARAMS, ids=IDS)
def test_per_replica_loop(benchmark, bandwidth_reference, device, case, replicas, n):
    benchmark.group = f"sgld_step {case} {device}"
    w, grad, w_star, noise, _ = _buffers(device, replicas, n)

    def run():
        for r in range(replicas):
            w[r].add_(-EPS / 2 * (NBETA * grad[r] + GAMMA * (w[r] - w_star[r])) + math.sqrt(EPS) * noise[r])
        sync(device)

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    _record(benchmark, bandwidth_reference, device, replicas, n, "per-replica loop (devinterp style)")


# Hutchinson: 16 heads of the 2-layer model as blocks, 8 probes per batch.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["blocked_dot op", "pytorch per-block loop"])
def test_hutchinson_blocked_reduction(benchmark, device, impl):
    benchmark.group = f"hutchinson per-block v.Hv {device}"
    probes, blocks, size = 8, 16, 32_864
    v = ops.rademacher(probes, blocks * size, torch.tensor([0, 0], device=device))
    hv = torch.randn_like(v)
    offsets = torch.arange(0, (blocks + 1) * size, size, device=device)
    bounds = list(zip(offsets[:-1].tolist(), offsets[1:].tolist()))

    def fused():
        out = ops.blocked_dot(v, hv, offsets)
        sync(device)
        return out

    def loop():
        out = torch.stack([(v[:, a:b] * hv[:, a:b]).sum(1) for a, b in bounds], 1)
        sync(device)
        return out

    benchmark.pedantic(fused if impl == "blocked_dot op" else loop, rounds=10, warmup_rounds=2)
    benchmark.extra_info.update(device=device_name(device), probes=probes, blocks=blocks, block_size=size)


# RMSProp-preconditioned SGLD: 7 arrays (read w, grad, w*, noise, square_avg; write w, square_avg).
@pytest.mark.parametrize("device, case, replicas, n", PARAMS, ids=IDS)
@pytest.mark.parametrize("impl", ["fused op", "unfused PyTorch expression"])
def test_rmsprop_step(benchmark, bandwidth_reference, device, case, replicas, n, impl):
    benchmark.group = f"rmsprop sgld_step {case} {device}"
    w, grad, w_star, noise, lengths = _buffers(device, replicas, n)
    avg = torch.zeros_like(w)
    alpha, reps = 0.99, 0.1

    def fused():
        ops.sgld_step(w, grad, w_star, lengths, step_size=EPS, nbeta=NBETA, localization=GAMMA, noise=noise,
                      square_avg=avg, rmsprop_alpha=alpha, rmsprop_eps=reps)
        sync(device)

    def unfused():
        avg.mul_(alpha).add_((1 - alpha) * grad * grad)
        precond = 1 / (avg.sqrt() + reps)
        w.add_(-EPS / 2 * precond * (NBETA * grad + GAMMA * (w - w_star)) + (EPS * precond).sqrt() * noise)
        sync(device)

    benchmark.pedantic(fused if impl == "fused op" else unfused, rounds=5, warmup_rounds=1)
    _record(benchmark, bandwidth_reference, device, replicas, n, f"rmsprop: {impl}", arrays=7)

"""One GPU session: every check and measurement of rllc_fast that needs a GPU, in one call of at most
9 minutes on an H200, build included (benchmarks/gpu_session.sh runs it there), or the same steps at tiny
shapes on the CPU (``--dry-run``, run by tests/test_gpu_session_dry_run.py), so that it cannot rot.

    python benchmarks/gpu_session.py run --out DIR [--dry-run] [--only STEP,STEP]
    python benchmarks/gpu_session.py sanitize-target        # the short op run compute-sanitizer checks

Each step runs in a child process (forked from the driver, so the heavy imports are paid once) with its
own time limit (BUDGET_S); a step that fails, crashes or runs out of time is recorded and the next one
runs. Written to DIR (the device tool brings back at most 8 files):
    session.json    device, date, commit, versions; per step: status (ok, failed, timeout, skipped),
                    seconds, budget and results
    session.log     every step's output, in order
    tests.xml       junit XML of the CUDA tests (pytest -m cuda)
    ops-bench.json  pytest-benchmark JSON of benchmarks/bench_ops.py on CUDA
    engine.json     the engine measurements (end to end, paper shape, devinterp, Pythia-70m's shape)
Statuses: the dry run skips only the nvcc build, the carried wheels and compute-sanitizer (and devinterp
where it is not installed); every other step must be ok.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(os.environ.get("RLLC_GPU_SITE", "/tmp/rllc-gpu-site"))  # where the carried wheels are installed

# Seconds each step may take (its process is killed past that). They add up to 510 s, leaving 30 s of the
# 9-minute call for the driver and the shell; measured on 2026-11-30 at 04ccf08: build 32 s, 39 op tests
# 18 s, paper-shape step 0.785 s, Pythia-shape step 5.3 s, devinterp call 3.8 s + 6.6 ms per chain-step.
BUDGET_S = {
    "env": 10,            # versions, device, driver, commit
    "wheels": 15,         # pip install --no-index --no-deps --target of .whl/ (transformer_lens, devinterp, ...)
    "build": 60,          # setup.py build_ext --inplace with the CUDA kernels (sm_90a)
    "tests": 50,          # pytest -m cuda: CUDA op vs fallback, Philox per element, reruns, graph replay
    "memcheck": 30,       # compute-sanitizer --tool memcheck on sanitize-target
    "racecheck": 30,      # compute-sanitizer --tool racecheck on sanitize-target
    "e2e": 55,            # estimate_llc CUDA vs CPU: structured, generic, KL, RMSProp; exact op chain
    "hessian": 20,        # hessian.trace CUDA vs CPU
    "sweep": 30,          # rllc sweep --device cuda of two checkpoints into a store, rllc plot, rllc export
    "bench_paper": 85,    # paper shape, 16 heads x 4 chains, batch 8 and 16: s/step, TFLOP/s, peak memory;
                          # then batch 8 with cuda_graph=True
    "devinterp": 40,      # devinterp 2.0.1 on the paper shape, two heads, extrapolated to 16
    "bench_pythia": 55,   # Pythia-70m's shape, 48 heads x 4 chains, batch 8 x 512: s/step, peak memory
    "bench_ops": 30,      # benchmarks/bench_ops.py -k cuda (CUDA events via synchronize)
}
STEPS = list(BUDGET_S)
SESSION_LIMIT_S = 540     # the whole run: a step gets at most what is left of this
DRY_RUN_SLACK = 4         # the CPU dry run's limits are this many times the GPU's (a loaded 2-core CI machine)
Z_MAX = 5.0               # CUDA vs CPU: largest |difference| / combined standard error accepted per component
                          # (8 chains a side: a false alarm over 32 comparisons is about 1 in 150)
ENGINE_STEPS = ("e2e", "bench_paper", "devinterp", "bench_pythia")

# Shapes per mode: the real ones on a GPU, tiny ones in the CPU dry run.
SHAPES = {
    False: dict(
        small=dict(n_layers=2, d_model=32, n_heads=4, d_head=8, n_ctx=32, d_vocab=256), train_steps=100,
        e2e_cfg=dict(num_chains=8, num_draws=40, batch_size=8), contexts=256,
        hessian=dict(num_probes=40, num_batches=4, batch_size=8),
        sweep=dict(train_steps=20, draws=20, chains=2),
        paper=dict(model={}, rows=64, batches=(8, 16), draws=(2, 12)),
        devinterp=dict(model={}, rows=256, heads=("0:0", "1:0"), draws=(3, 23)),
        pythia=dict(model={}, rows=64, ctx=512, batch=8, draws=(1, 3)),
        ops_filter="cuda",
    ),
    True: dict(
        small=dict(n_layers=2, d_model=16, n_heads=2, d_head=8, n_ctx=16, d_vocab=256), train_steps=5,
        e2e_cfg=dict(num_chains=2, num_draws=4, batch_size=4), contexts=32,
        hessian=dict(num_probes=3, num_batches=2, batch_size=4),
        sweep=dict(train_steps=2, draws=3, chains=2),
        paper=dict(model=dict(d_model=16, n_heads=2, d_head=8, n_ctx=16, d_vocab=64), rows=16, batches=(2, 4),
                   draws=(1, 2)),
        devinterp=dict(model=dict(d_model=16, n_heads=2, d_head=8, n_ctx=16, d_vocab=64), rows=32,
                       heads=("1:0",), draws=(1, 2)),
        pythia=dict(model=dict(n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=64, d_vocab=64, n_ctx=32,
                               rotary_dim=4), rows=16, ctx=16, batch=2, draws=(1, 2)),
        ops_filter="cpu-2layer-heads or (hutchinson and cpu)",
    ),
}


# ---------------------------------------------------------------------------- results of one step
class Record(dict):
    """A step's results, written to ``path`` after every change, so a step killed at its time limit
    still leaves what it had measured."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self, indent=1, default=str))
        os.replace(tmp, self.path)


class StepSkipped(Exception):
    """Raised by a step that does not apply here (the reason is recorded)."""


class CheckFailed(Exception):
    """Raised by a step whose check ran and failed (the reason is recorded)."""


def _run(cmd, **kw):
    """Runs a command (output to this process's stdout/stderr, i.e. the session log); returns its code."""
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, **kw).returncode


def _device(dry: bool) -> str:
    import torch

    if dry:
        return "cpu"
    if not torch.cuda.is_available():
        raise CheckFailed("torch sees no CUDA device")
    return "cuda"


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _z(a_mean, a_sem, b_mean, b_sem) -> float:
    """|a - b| / combined standard error (0 when both are equal; inf when they differ with no spread)."""
    diff = abs(a_mean - b_mean)
    se = math.hypot(a_sem, b_sem)
    if diff == 0:
        return 0.0
    return diff / se if se > 0 else float("inf")


def _agreement(cpu: dict, dev: dict) -> dict:
    """Per component {cpu, dev, z} and the largest z, from ``{name: (mean, sem)}`` on each side."""
    rows = {k: dict(cpu=cpu[k][0], dev=dev[k][0], cpu_sem=cpu[k][1], dev_sem=dev[k][1],
                    z=_z(*cpu[k], *dev[k])) for k in cpu}
    zs = [r["z"] for r in rows.values()]
    finite = all(math.isfinite(r[k]) for r in rows.values() for k in ("cpu", "dev", "cpu_sem", "dev_sem"))
    return dict(rows=rows, max_z=max(zs), finite=finite, z_limit=Z_MAX)


# ---------------------------------------------------------------------------- steps
def step_env(rec: Record, dry: bool, out: Path) -> None:
    import platform

    import torch

    rec["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    commit = os.environ.get("COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True, timeout=5).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    rec["commit"] = commit or "unknown (set COMMIT=<sha>)"
    rec["python"] = platform.python_version()
    rec["torch"] = torch.__version__
    rec["torch_cuda"] = torch.version.cuda
    rec["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        rec["device"] = dict(name=p.name, memory_bytes=p.total_memory, multiprocessors=p.multi_processor_count,
                             capability=f"{p.major}.{p.minor}")
    else:
        rec["device"] = dict(name="cpu", cores=os.cpu_count())
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        rec["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        rec["driver"] = q.stdout.split(",")[1].strip() if q.returncode == 0 and "," in q.stdout else None
    else:
        rec["nvidia_smi"] = None
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if nvcc:
        v = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout.strip()
        rec["nvcc"] = v.splitlines()[-1] if v else None
    else:
        rec["nvcc"] = None
    rec["compute_sanitizer"] = _sanitizer()
    from importlib import metadata

    versions = {}
    for name in ("transformer_lens", "devinterp", "zarr", "datasets", "transformers", "numpy", "pytest",
                 "pytest-benchmark", "tslearn"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    rec["packages"] = versions


def _sanitizer():
    for path in (shutil.which("compute-sanitizer"), "/usr/local/cuda/bin/compute-sanitizer"):
        if path and Path(path).exists():
            return path
    return None


def step_wheels(rec: Record, dry: bool, out: Path) -> None:
    if dry:
        raise StepSkipped("dry run: uses this machine's installed packages")
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    rec["wheels"] = [w.name for w in wheels]
    if not wheels:
        raise CheckFailed("no .whl/*.whl: run benchmarks/gpu_wheels.sh on the CPU machine and carry .whl")
    rc = _run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", SITE, *wheels])
    rec["pip_exit_code"] = rc
    if rc != 0:
        raise CheckFailed(f"pip install exited {rc}")
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{SITE}")
    probe = subprocess.run([sys.executable, "-c", "import transformer_lens, devinterp.slt.llc, tslearn; print('ok')"],
                           env=env, capture_output=True, text=True, cwd=ROOT)
    rec["imports"] = probe.stdout.strip() or probe.stderr.strip()[-2000:]
    if probe.returncode != 0:
        raise CheckFailed("the carried packages do not import (see imports)")


def step_build(rec: Record, dry: bool, out: Path) -> None:
    if dry:
        raise StepSkipped("dry run: no nvcc build (CI compiles every .cu with .ci/nvcc_check.sh)")
    env = dict(os.environ, FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0a"),
               MAX_JOBS=os.environ.get("MAX_JOBS", "16"))
    t0 = time.perf_counter()
    rc = _run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], env=env)
    rec["seconds"] = time.perf_counter() - t0
    rec["exit_code"] = rc
    if rc != 0:
        raise CheckFailed(f"setup.py build_ext exited {rc} (the log has the compiler's message)")
    probe = subprocess.run([sys.executable, "-c", "from rllc_fast import ops; print(ops.backend()); "
                            "assert ops.CUDA_KERNELS"], capture_output=True, text=True, cwd=ROOT)
    rec["backend"] = probe.stdout.strip() or probe.stderr.strip()[-500:]
    if probe.returncode != 0:
        raise CheckFailed("built, but rllc_fast.ops has no CUDA kernels")


def _junit_counts(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    bad = [f'{c.get("classname")}::{c.get("name")}' for s in suites for c in s
           if c.find("failure") is not None or c.find("error") is not None]
    return dict(counts, not_passed=bad)


def step_tests(rec: Record, dry: bool, out: Path) -> None:
    if dry:  # the CPU cases of the same machinery (the cuda ones are skipped without a GPU)
        select = ["tests/test_ops.py", "-m", "not cuda", "-k", "literal_loop"]
    else:
        select = ["tests", "-m", "cuda", "-k", "not emulat"]
    pytest_with_crash_reruns(select, out / "tests.xml", rec)
    if not dry and rec.get("junit", {}).get("skipped", 0):
        raise CheckFailed("CUDA tests were skipped on the GPU machine")


def pytest_with_crash_reruns(select, xml: Path, rec, max_crashes: int = 3, cwd: Path = ROOT) -> None:
    """Runs pytest on ``select`` (in ``cwd``) with junit XML to ``xml``; a test that kills the process (a
    segfault in a kernel's argument checks, as on 2026-11-30) is recorded in ``rec["crashed"]``, deselected,
    and the run repeated. Raises CheckFailed when a test crashed or failed."""
    base = [sys.executable, "-m", "pytest", *select, "-v", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    log = xml.with_suffix(".console.tmp")
    crashed = []
    while True:
        xml.unlink(missing_ok=True)
        rc = _run_tee(base + [f"--deselect={t}" for t in crashed], log, cwd)
        rec["exit_code"] = rc
        if rc in (0, 1, 5) and xml.exists() or len(crashed) >= max_crashes:
            break
        last = _last_started_test(log.read_text(errors="replace"), _collected(base, cwd))
        if last is None or last in crashed:
            break
        crashed.append(last)
        rec["crashed"] = crashed
    log.unlink(missing_ok=True)
    rec["crashed"] = crashed
    if xml.exists():
        rec["junit"] = _junit_counts(xml)
    if crashed:
        raise CheckFailed(f"the test process died in {crashed}")
    if rc != 0:
        raise CheckFailed(f"pytest exited {rc}")


def _collected(base, cwd: Path = ROOT) -> list:
    """The node ids pytest would run (they may hold spaces, e.g. a message in a parametrization)."""
    cmd = [c for c in base if not str(c).startswith("--junitxml") and c != "-v"] + ["--collect-only", "-q"]
    lines = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True).stdout.splitlines()
    return [line for line in lines if "::" in line]


def _run_tee(cmd, log: Path, cwd: Path = ROOT) -> int:
    """Runs ``cmd`` with its output copied to this process's stdout and to ``log``; returns its code."""
    print("+", " ".join(str(c) for c in cmd), flush=True)
    with open(log, "w") as f:
        p = subprocess.Popen([str(c) for c in cmd], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, errors="replace")
        for line in p.stdout:
            sys.stdout.write(line)
            f.write(line)
        return p.wait()


def _last_started_test(text: str, ids) -> str | None:
    """The node id of the last test ``pytest -v`` started but did not finish (a crash ends its line)."""
    by_length = sorted(ids, key=len, reverse=True)
    for line in reversed(text.splitlines()):
        started = next((i for i in by_length if line.startswith(i)), None)
        if started is not None:
            rest = line[len(started):]
            return None if re.search(r"\b(PASSED|FAILED|SKIPPED|XFAIL|XPASS|ERROR)\b", rest) else started
    return None


def sanitize_target() -> None:
    """Every kernel once at small sizes, with padding and several blocks per replica: what
    compute-sanitizer checks (memcheck: out-of-bounds and misaligned accesses; racecheck: shared memory)."""
    import torch

    from rllc_fast import ops

    d = "cuda"
    g = torch.Generator().manual_seed(0)
    R, n = 5, 3001
    lengths = torch.tensor([n, 0, 5, n - 1, 20], device=d)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w, grad, w_star = (torch.randn(R, n, generator=g).to(d, dtype) for _ in range(3))
        noise = torch.randn(R, n, generator=g).to(d)
        ops.sgld_step(w, grad, w_star, lengths, step_size=1e-3, nbeta=30.0, localization=200.0, noise=noise)
        ops.sgld_step(w, grad, w_star, lengths, step_size=1e-3, nbeta=30.0, localization=200.0,
                      rng_state=torch.tensor([3, 1], device=d))
        ops.sgld_step(w, grad, w_star, lengths, step_size=1e-3, nbeta=30.0, localization=200.0, noise=noise,
                      square_avg=torch.zeros(R, n, device=d))
    v = ops.rademacher(3, 10_007, torch.tensor([9, 2], device=d))
    ops.blocked_dot(v, torch.randn_like(v), torch.tensor([0, 10, 10, 5000, 10_007], device=d))
    torch.cuda.synchronize()
    print("sanitize-target: done")


def _sanitize(tool: str, rec: Record, dry: bool) -> None:
    if dry:
        raise StepSkipped("dry run: compute-sanitizer needs a GPU")
    exe = _sanitizer()
    if exe is None:
        raise StepSkipped("compute-sanitizer not found on this machine")
    log = Path(tempfile.mkstemp(suffix=".log")[1])
    # every tensor its own cudaMalloc, so an access past a tensor's end is outside any allocation
    os.environ["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
    rc = _run_tee([exe, "--tool", tool, "--error-exitcode", "99", "--print-limit", "20", sys.executable,
                   Path(__file__), "sanitize-target"], log)
    text = log.read_text(errors="replace")
    log.unlink(missing_ok=True)
    summary = re.findall(r"ERROR SUMMARY: .*|RACECHECK SUMMARY: .*", text)
    rec["exit_code"], rec["summary"] = rc, summary
    if rc != 0 or "sanitize-target: done" not in text:
        raise CheckFailed(f"compute-sanitizer --tool {tool} exited {rc}: {summary}")


def step_memcheck(rec, dry, out):
    _sanitize("memcheck", rec, dry)


def step_racecheck(rec, dry, out):
    _sanitize("racecheck", rec, dry)


def _small_trained(shape: dict):
    """(model, held-out tokens) of the small 2-layer model, trained briefly on stdlib source bytes."""
    import rllc_fast as r
    from rllc_fast.data.stdlib_bytes import stdlib_byte_tokens
    from rllc_fast.models.train import train_next_token

    ctx = shape["small"]["n_ctx"]
    model = r.models.attn_only(seed=0, **shape["small"])
    train_next_token(model, stdlib_byte_tokens(1024, ctx, seed=0), shape["train_steps"], seed=0)
    return model, stdlib_byte_tokens(shape["contexts"], ctx, seed=1)


def step_e2e(rec: Record, dry: bool, out: Path) -> None:
    """estimate_llc on the device against the CPU run of the same call (different noise streams:
    statistical agreement per head), and a short chain through the public op with the same noise."""
    import rllc_fast as r

    device = _device(dry)
    shape = SHAPES[dry]
    model, tokens = _small_trained(shape)
    cfg = r.SGLDConfig(seed=0, **shape["e2e_cfg"])
    variants = {
        "structured": dict(engine="batched"),
        "generic": dict(engine="generic", heads=("0:0", "1:1")),  # the per-replica path: 10x the cost on a CPU
        "kl": dict(engine="batched", kl=True),
        "rmsprop": dict(engine="batched", config=r.SGLDConfig(seed=0, sampler="rmsprop", **shape["e2e_cfg"])),
    }
    bad = []
    for name, v in variants.items():
        sides = {}
        for key, side in (("cpu", "cpu"), ("dev", device)):
            m = copy.deepcopy(model)
            data = r.ModelDistribution(copy.deepcopy(model), tokens) if v.get("kl") else tokens
            comps = {k: c for k, c in r.heads(m).items() if k in v.get("heads", (k,))}
            seconds, res = _timed(lambda: r.estimate_llc(m, data, v.get("config", cfg), components=comps,
                                                          device=side, engine=v["engine"]), side)
            sides[key] = ({k: (e.llc_mean, e.llc_sem) for k, e in res.estimates.items()}, seconds)
        agree = _agreement(sides["cpu"][0], sides["dev"][0])
        agree.update(cpu_seconds=sides["cpu"][1], dev_seconds=sides["dev"][1])
        rec[name] = agree
        if not agree["finite"] or agree["max_z"] > Z_MAX:
            bad.append(f"{name}: max z {agree['max_z']:.2f}")
    rec["op_chain"] = _op_chain(model, tokens, device)
    rec["note"] = ("estimate_llc takes no noise argument, so the exact check runs a short chain through the public "
                   "op rllc_fast.ops.sgld_step with the same given noise on both devices; dev = "
                   + ("the CPU again (dry run)" if dry else "cuda"))
    if not rec["op_chain"]["ok"]:
        bad.append(f"op chain differs: {rec['op_chain']}")
    if bad:
        raise CheckFailed("; ".join(bad))


def _op_chain(model, tokens, device: str, steps: int = 5) -> dict:
    """Five SGLD steps of every weight of ``model`` through ``ops.sgld_step`` with the same given noise on the
    CPU and on ``device``: losses and weights must agree to float32 rounding."""
    import torch

    from rllc_fast import ops
    from rllc_fast.losses import next_token_loss

    g = torch.Generator().manual_seed(0)
    n = sum(p.numel() for p in model.parameters())
    noises = [torch.randn(1, n, generator=g) for _ in range(steps)]
    batch = tokens[:8]
    runs = {}
    for side in ("cpu", device):
        m = copy.deepcopy(model).to(side)
        params = list(m.parameters())
        w_star = torch.cat([p.detach().reshape(-1) for p in params])[None].clone()
        w = w_star.clone()
        lengths = torch.tensor([n], device=side)
        losses = []
        for t in range(steps):
            with torch.no_grad():
                offset = 0
                for p in params:
                    p.copy_(w[0, offset:offset + p.numel()].view_as(p))
                    offset += p.numel()
            for p in params:
                p.grad = None
            loss = next_token_loss(m, batch.to(side))
            loss.backward()
            grad = torch.cat([p.grad.reshape(-1) for p in params])[None]
            losses.append(float(loss))
            ops.sgld_step(w, grad, w_star, lengths, step_size=1e-3, nbeta=30.0, localization=200.0,
                          noise=noises[t].to(side))
        runs[side] = (losses, w.cpu())
    (l0, w0), (l1, w1) = runs["cpu"], runs[device]
    loss_diff = max(abs(a - b) for a, b in zip(l0, l1))
    w_diff = float((w0 - w1).abs().max())
    return dict(steps=steps, weights=n, max_loss_diff=loss_diff, max_weight_diff=w_diff,
                ok=loss_diff <= 1e-3 * max(1.0, abs(l0[0])) and w_diff <= 1e-3)


def step_hessian(rec: Record, dry: bool, out: Path) -> None:
    import torch

    import rllc_fast as r

    device = _device(dry)
    shape = SHAPES[dry]
    model = r.models.attn_only(seed=1, **shape["small"])
    tokens = torch.randint(0, shape["small"]["d_vocab"], (64, shape["small"]["n_ctx"]),
                           generator=torch.Generator().manual_seed(0))
    sides = {}
    for key, side in (("cpu", "cpu"), ("dev", device)):
        m = copy.deepcopy(model)
        seconds, res = _timed(lambda: r.hessian.trace(m, tokens, components=r.heads(m), seed=0, device=side,
                                                      **shape["hessian"]), side)
        sides[key] = {e.name: (e.value, e.sem if math.isfinite(e.sem) else 0.0) for e in res}
        rec[f"{key}_seconds"] = seconds
    agree = _agreement(sides["cpu"], sides["dev"])
    rec["trace"] = agree
    if not agree["finite"] or agree["max_z"] > Z_MAX:
        raise CheckFailed(f"hessian.trace: max z {agree['max_z']:.2f}")


def step_sweep(rec: Record, dry: bool, out: Path) -> None:
    import csv

    import numpy as np
    import torch

    import rllc_fast as r
    from rllc_fast import cli
    from rllc_fast.models.train import train_next_token

    device = _device(dry)
    shape = SHAPES[dry]
    small = shape["small"]
    work = Path(tempfile.mkdtemp(prefix="rllc-gpu-sweep-"))
    steps = shape["sweep"]["train_steps"]
    model = r.models.attn_only(seed=0, **small)
    tokens = torch.randint(0, small["d_vocab"], (128, small["n_ctx"]), generator=torch.Generator().manual_seed(0))
    train_next_token(model, tokens, steps, seed=0, save_at=(0, steps), save_dir=work / "ckpts")
    np.save(work / "data.npy", tokens[:64].numpy())
    store = work / "store.sqlite"
    sweep = ["sweep", "--checkpoints", work / "ckpts", "--data", f"mix={work / 'data.npy'}", "--store", store,
             "--components", "heads,whole", "--device", device, "--draws", shape["sweep"]["draws"],
             "--chains", shape["sweep"]["chains"], "--quiet"]
    codes = {}
    for name, argv in (("sweep", sweep), ("plot", ["plot", "--store", store, "--out", work / "report", "--quiet"]),
                       ("export", ["export", "--store", store, "--format", "csv", "--out", work / "rows.csv"])):
        t0 = time.perf_counter()
        codes[name] = cli.main([str(a) for a in argv])
        rec[f"{name}_seconds"] = time.perf_counter() - t0
    rec["exit_codes"] = codes
    with open(work / "rows.csv") as f:
        rows = list(csv.DictReader(f))
    want = 2 * (small["n_layers"] * small["n_heads"] + 1)
    rec["rows"], rec["rows_expected"] = len(rows), want
    rec["report_files"] = sorted(p.name for p in (work / "report").iterdir()) if (work / "report").exists() else []
    shutil.rmtree(work, ignore_errors=True)
    if any(codes.values()) or len(rows) != want or not rec["report_files"]:
        raise CheckFailed(f"exit codes {codes}, {len(rows)} rows of {want}, report {rec['report_files']}")


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _peak(device: str):
    import torch

    return int(torch.cuda.max_memory_allocated()) if device == "cuda" else None


def _reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _per_step(model, tokens, comps, batch, draws, device, rec: Record, key: str, chains: int = 4,
              count_flops: bool = False, cuda_graph: bool = False) -> dict:
    """Seconds per SGLD step (all replicas) as (t(d2) - t(d1)) / (d2 - d1), so setup is excluded; the fixed
    cost, the implied 200-draw checkpoint, peak device memory of the d2 call, and (optionally) the FLOPs
    torch's FlopCounterMode counts per step (same difference) and the TFLOP/s they imply. ``cuda_graph``:
    ``estimate_llc(cuda_graph=True)`` (a failed capture's warning is recorded)."""
    import warnings

    import rllc_fast as r

    d1, d2 = draws
    out = dict(batch=batch, replicas=len(comps) * chains, draws=[d1, d2], cuda_graph=cuda_graph)

    def call(d):
        cfg = r.SGLDConfig(num_chains=chains, num_draws=d, batch_size=batch, seed=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = r.estimate_llc(model, tokens, cfg, components=comps, device=device, cuda_graph=cuda_graph)
        failed = [str(w.message) for w in caught if "CUDA graph" in str(w.message)]
        if failed:
            out["cuda_graph_capture_failed"] = failed[0]
        return result

    t1, _ = _timed(lambda: call(d1), device)
    _reset_peak(device)
    t2, _ = _timed(lambda: call(d2), device)
    step = (t2 - t1) / (d2 - d1)
    out.update(t_d1=t1, t_d2=t2, step_s=step, fixed_s=t1 - d1 * step, checkpoint_200_draws_s=t1 - d1 * step + 200 * step,
               peak_bytes=_peak(device))
    rec[key] = out
    if count_flops:
        f1, f2 = _flops(lambda: call(1)), _flops(lambda: call(2))
        out.update(flops_per_step=f2 - f1, tflops_per_s=(f2 - f1) / step / 1e12 if step > 0 else None,
                   flop_count="torch.utils.flop_counter.FlopCounterMode over estimate_llc: (2 draws) - (1 draw)")
        rec[key] = out
    return out


def step_bench_paper(rec: Record, dry: bool, out: Path) -> None:
    import torch

    import rllc_fast as r

    device = _device(dry)
    p = SHAPES[dry]["paper"]
    model = r.models.attn_only(seed=0, device=device, **p["model"])
    cfg = model.cfg
    tokens = torch.randint(0, cfg.d_vocab, (p["rows"], cfg.n_ctx), generator=torch.Generator().manual_seed(0))
    comps = r.heads(model)
    rec["shape"] = dict(n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, d_vocab=cfg.d_vocab,
                        n_ctx=cfg.n_ctx, heads=len(comps), chains=4, max_memory="default (estimate_llc's)",
                        tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    warm = r.SGLDConfig(num_chains=4, num_draws=1, batch_size=p["batches"][0], seed=0)
    rec["warmup_s"] = _timed(lambda: r.estimate_llc(model, tokens, warm, components=comps, device=device), device)[0]
    for batch in p["batches"]:
        _per_step(model, tokens, comps, batch, p["draws"], device, rec, f"batch{batch}", count_flops=True)
    if device == "cuda":  # last, so the figures above are kept if the step's time runs out here
        _per_step(model, tokens, comps, p["batches"][0], p["draws"], device, rec, f"batch{p['batches'][0]}_cuda_graph",
                  cuda_graph=True)


def step_devinterp(rec: Record, dry: bool, out: Path) -> None:
    """devinterp 2.0.1's sample() + compute_llc() (what its llc() runs) head by head on the same model, shape
    and settings; per chain-step time from two draw counts, extrapolated to 16 heads x 4 chains x 200 draws."""
    import torch

    import rllc_fast as r

    try:
        from datasets import Dataset
        from devinterp.slt.llc import compute_llc
        from devinterp.slt.sampling import sample
        from devinterp.slt.weight_restrictions import create_param_masks
    except ImportError as err:
        if dry:
            raise StepSkipped(f"devinterp not installed ({err})")
        raise
    import warnings

    device = _device(dry)
    p = SHAPES[dry]["devinterp"]
    model = r.models.attn_only(seed=0, device=device, **p["model"])
    cfg = model.cfg
    tokens = torch.randint(0, cfg.d_vocab, (p["rows"], cfg.n_ctx), generator=torch.Generator().manual_seed(0))
    ds = Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")
    chains, batch = 4, 8 if not dry else 2
    heads = {}

    def call(head, draws):
        layer, h = head.split(":")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            samples = sample(model, ds, {}, lr=1e-3, n_beta=30.0, localization=200.0, num_chains=chains,
                             num_draws=draws, batch_size=batch, param_masks=create_param_masks(model, f"l{layer}h{h}"),
                             device=device)
            return compute_llc(samples)

    d1, d2 = p["draws"]
    for head in p["heads"]:
        t1, _ = _timed(lambda: call(head, d1), device)
        t2, _ = _timed(lambda: call(head, d2), device)
        step = (t2 - t1) / ((d2 - d1) * chains)
        heads[head] = dict(t_d1=t1, t_d2=t2, chain_step_s=step, fixed_s=t1 - d1 * chains * step)
        rec["heads"] = heads
    step = sum(h["chain_step_s"] for h in heads.values()) / len(heads)
    fixed = sum(h["fixed_s"] for h in heads.values()) / len(heads)
    n = cfg.n_layers * cfg.n_heads
    rec["extrapolated"] = dict(
        checkpoint_s=n * (fixed + chains * 200 * step), heads=n, chains=chains, draws=200, batch=batch,
        label=f"extrapolated from heads {list(heads)}: {n} x (fixed + {chains} x 200 x chain-step), means of those heads")


def step_bench_pythia(rec: Record, dry: bool, out: Path) -> None:
    import torch

    import rllc_fast as r

    device = _device(dry)
    p = SHAPES[dry]["pythia"]
    model = r.models.pythia_like(seed=0, device=device, **p["model"])
    cfg = model.cfg
    tokens = torch.randint(0, cfg.d_vocab, (p["rows"], p["ctx"]), generator=torch.Generator().manual_seed(0))
    comps = r.heads(model)
    rec["shape"] = dict(n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, d_vocab=cfg.d_vocab,
                        context=p["ctx"], heads=len(comps), chains=4, batch=p["batch"])
    one = dict(list(comps.items())[:1])  # warm-up: CUDA context, cuBLAS, allocator; not timed below
    warm = r.SGLDConfig(num_chains=1, num_draws=1, batch_size=p["batch"], seed=0)
    rec["warmup_s"] = _timed(lambda: r.estimate_llc(model, tokens, warm, components=one, device=device), device)[0]
    res = _per_step(model, tokens, comps, p["batch"], p["draws"], device, rec, "all_heads")
    res["s_per_draw"] = res["step_s"]
    rec["all_heads"] = res


def step_bench_ops(rec: Record, dry: bool, out: Path) -> None:
    path = out / "ops-bench.json"
    rc = _run([sys.executable, "-m", "pytest", "benchmarks/bench_ops.py", "-q", "-p", "pytest_benchmark.plugin",
               "-p", "no:cacheprovider", "-k", SHAPES[dry]["ops_filter"], f"--benchmark-json={path}",
               "--benchmark-columns=min,median,rounds"])
    rec["exit_code"] = rc
    try:
        benchmarks = json.loads(path.read_text())["benchmarks"]
    except (OSError, ValueError, KeyError):
        benchmarks = []
    rec["rows"] = {b["name"]: dict(min_ms=b["stats"]["min"] * 1e3,
                                   fraction_of_reference=b["extra_info"].get("fraction_of_reference"))
                   for b in benchmarks}
    if rc != 0 or not benchmarks:
        raise CheckFailed(f"bench_ops exited {rc} with {len(benchmarks)} benchmarks")


def _step_function(name: str):
    return globals()[f"step_{name}"]


# ---------------------------------------------------------------------------- the driver
def _child(name: str, dry: bool, out: Path, result: Path, log_path: Path) -> None:
    """Runs one step in this (forked) process: own process group (same session, so the device tool still ends
    it with the call), output to the session log."""
    import importlib

    os.setpgid(0, 0)
    importlib.invalidate_caches()  # the wheels step may have filled SITE after the driver looked at it
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    rec = Record(result)
    rec["status"] = "running"
    code = 0
    try:
        _step_function(name)(rec, dry, out)
        rec["status"] = "ok"
    except StepSkipped as why:
        rec["reason"] = str(why)
        rec["status"] = "skipped"
    except CheckFailed as why:
        rec["reason"] = str(why)
        rec["status"] = "failed"
        code = 1
    except BaseException as err:  # noqa: BLE001 - recorded, the session goes on
        traceback.print_exc()
        rec["reason"] = f"{type(err).__name__}: {err}"
        rec["traceback"] = traceback.format_exc()[-3000:]
        rec["status"] = "failed"
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _preimport() -> None:
    """Imports the heavy third-party modules once, before the steps are forked (never rllc_fast, which the
    build step may rebuild, and never CUDA: the children initialise it)."""
    for name in ("torch", "numpy", "transformer_lens"):
        try:
            __import__(name)
        except Exception:  # noqa: BLE001 - the step that needs it records the error
            pass


def _cuda_initialised() -> bool:
    """Whether this driver process initialised CUDA (then forked steps could not use it)."""
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def run_session(out: Path, dry: bool, only=None) -> dict:
    import multiprocessing

    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "session.log"
    log_path.write_text("")
    scratch = Path(tempfile.mkdtemp(prefix="rllc-gpu-session-"))
    os.environ.setdefault("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # typeguard's and zarr's plugins break pytest
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # is_available() without initialising CUDA
    os.environ["PYTHONUNBUFFERED"] = "1"
    paths = [str(ROOT)] + ([str(SITE)] if not dry else []) + [p for p in os.environ.get("PYTHONPATH", "").split(":") if p]
    os.environ["PYTHONPATH"] = ":".join(dict.fromkeys(paths))
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)
    if not dry:
        SITE.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("fork")
    start = time.perf_counter()
    current = {}

    def stop(signum, frame):  # the shell's backstop timeout: end the running step, keep what was written
        if current.get("pid"):
            try:
                os.killpg(current["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
        _write(out, session, start)
        sys.exit(124)

    signal.signal(signal.SIGTERM, stop)
    slack = DRY_RUN_SLACK if dry else 1
    session = dict(dry_run=dry, budget_s=BUDGET_S, session_limit_s=SESSION_LIMIT_S, limit_factor=slack, steps={})
    for name in STEPS:
        if only and name not in only:
            continue
        if name == "e2e":
            _preimport()  # after env, wheels and build: the carried packages are installed by now
            session["driver_initialised_cuda"] = _cuda_initialised()
        left = slack * SESSION_LIMIT_S - (time.perf_counter() - start)
        limit = min(slack * BUDGET_S[name], left)
        entry = dict(budget_s=BUDGET_S[name])
        if limit < 3:
            entry.update(status="skipped", reason="no session time left")
            session["steps"][name] = entry
            continue
        with open(log_path, "a") as log:
            log.write(f"\n===== {name} (limit {limit:.0f} s) =====\n")
        result = scratch / f"{name}.json"
        t0 = time.perf_counter()
        proc = ctx.Process(target=_child, args=(name, dry, out, result, log_path))
        proc.start()
        current["pid"] = proc.pid
        proc.join(limit)
        timed_out = proc.is_alive()
        if timed_out:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.join(10)
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        data = json.loads(result.read_text()) if result.exists() else {}
        entry.update(data)
        if timed_out:
            entry.update(status="timeout", reason=f"killed after {limit:.0f} s")
        elif data.get("status") in (None, "running"):
            entry.update(status="failed", reason=f"the step's process ended with exit code {proc.exitcode}")
        current["pid"] = None
        session["steps"][name] = entry
        with open(log_path, "a") as log:
            log.write(f"===== {name}: {entry['status']} in {entry['seconds']} s"
                      + (f" ({entry['reason']})" if entry.get("reason") else "") + "\n")
        _write(out, session, start)
    shutil.rmtree(scratch, ignore_errors=True)
    return _write(out, session, start)


def _write(out: Path, session: dict, start: float) -> dict:
    env = session["steps"].get("env", {})
    header = {k: env.get(k) for k in ("date", "commit", "python", "torch", "torch_cuda", "driver", "device",
                                      "nvcc", "compute_sanitizer", "packages")}
    session = dict(header, **session, total_s=round(time.perf_counter() - start, 2),
                   statuses={k: v["status"] for k, v in session["steps"].items()})
    (out / "session.json").write_text(json.dumps(session, indent=1, default=str))
    engine = dict(header, dry_run=session["dry_run"],
                  **{k: session["steps"][k] for k in ENGINE_STEPS if k in session["steps"]})
    (out / "engine.json").write_text(json.dumps(engine, indent=1, default=str))
    return session


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="every step, each with its time limit; results to --out")
    run.add_argument("--out", required=True, type=Path)
    run.add_argument("--dry-run", action="store_true", default=os.environ.get("RLLC_GPU_DRY_RUN") == "1",
                     help="tiny shapes on the CPU; skips the build and compute-sanitizer (default: $RLLC_GPU_DRY_RUN=1)")
    run.add_argument("--only", help="comma-separated steps (default: all): " + ",".join(STEPS))
    sub.add_parser("sanitize-target", help="the short op run that compute-sanitizer checks")
    args = parser.parse_args(argv)
    if args.command == "sanitize-target":
        sanitize_target()
        return 0
    only = set(args.only.split(",")) if args.only else None
    if only and not only <= set(STEPS):
        parser.error(f"--only: unknown steps {sorted(only - set(STEPS))}; steps are {STEPS}")
    session = run_session(args.out, args.dry_run, only)
    for name, status in session["statuses"].items():
        entry = session["steps"][name]
        print(f"{name:13s} {status:8s} {entry.get('seconds', 0):7.1f} s / {entry['budget_s']:3d} s  {entry.get('reason', '')}")
    print(f"total {session['total_s']:.1f} s; {args.out / 'session.json'}")
    return 0 if all(s in ("ok", "skipped") for s in session["statuses"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Peak resident memory and wall time of observables at Pythia-70m's shape (issue 22, must-show 5).

All 48 heads x ``--chains`` chains of a Pythia-70m-shaped model with random weights (``models.pythia_like``,
nothing downloaded), sampling on random contexts (``--batch`` x ``--context``), once without observables and
once with two probe sets of ``--probe-contexts`` x ``--probe-length`` random tokens recorded at every
``--observe-every``-th draw into a temporary ``observables_dir`` (memory-mapped). Each run is its own
subprocess, so each peak (``ru_maxrss`` of that process) is its own; the parent prints a table and, with
``--json``, writes the figures.

Run (from the repository root):
    OMP_NUM_THREADS=1 python benchmarks/pythia_observables_memory.py --draws 2 --observe-every 2
Observing a draw costs every replica a forward pass of its head, the layers above it and the 50k-word
unembedding over all probe tokens (48 x 4 x 2 x 16 x 512 rows of 50304 logits: ~1.6e14 FLOP), so on a CPU each
observed draw takes far longer than an SGLD step; ``--observe-every`` equal to ``--draws`` observes draw 0 only.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB = 50304


def _rss_gib() -> float:
    """Peak resident memory of this process so far (GiB; Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child(args) -> dict:
    """One run in this process; returns its figures."""
    import numpy as np
    import torch

    import rllc_fast as r

    torch.set_num_threads(args.threads)
    model = r.models.pythia_like(seed=0)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (16, args.context), generator=g)
    probes = {name: torch.randint(0, VOCAB, (args.probe_contexts, args.probe_length), generator=g)
              for name in ("probe_a", "probe_b")}
    comps = r.heads(model)
    cfg = r.SGLDConfig(num_chains=args.chains, num_draws=args.draws, batch_size=args.batch, seed=0)
    rss_before = _rss_gib()
    out = {"mode": args.child, "replicas": len(comps) * args.chains, "draws": args.draws,
           "max_memory": args.max_memory, "threads": args.threads, "batch": [args.batch, args.context],
           "rss_before_run_gib": rss_before}
    with tempfile.TemporaryDirectory(prefix="rllc-obs-") as folder:
        kwargs = dict(components=comps, max_memory=args.max_memory)
        if args.child == "with":
            kwargs.update(observables=probes, observe_every=args.observe_every, observables_dir=folder)
        t0 = time.perf_counter()
        result = r.estimate_llc(model, tokens, cfg, **kwargs)
        out["seconds"] = time.perf_counter() - t0
        assert np.isfinite(result.loss_trace).all()
        if args.child == "with":
            obs = result.observations
            out.update(probe_sets={n: list(obs[n].shape) for n in obs.names}, observed_draws=obs.draws.tolist(),
                       observables_on_disk_bytes=sum(f.stat().st_size for f in Path(folder).iterdir()),
                       probe_losses_finite=bool(all(np.isfinite(np.asarray(obs[n])).all() for n in obs.names)))
    out["peak_rss_gib"] = _rss_gib()
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--draws", type=int, default=2)
    p.add_argument("--observe-every", type=int, default=1)
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--probe-contexts", type=int, default=16)
    p.add_argument("--probe-length", type=int, default=512)
    p.add_argument("--batch", type=int, default=2, help="SGLD minibatch (contexts)")
    p.add_argument("--context", type=int, default=128, help="SGLD context length (tokens)")
    p.add_argument("--max-memory", default="2GB", help="estimate_llc's max_memory (as bench_pythia_shape.py)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--modes", default="without,with", help="which runs: without, with or both (comma-separated)")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--child", choices=("with", "without"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    rows = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--child", mode] + [a for a in (argv if argv is not None else sys.argv[1:])]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"the {mode} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][len("RESULT "):]))
        row = rows[-1]
        print(f"{mode:>8} observables: {row['replicas']} replicas, {row['draws']} draws, wall {row['seconds']:.0f} s, "
              f"peak RSS {row['peak_rss_gib']:.2f} GiB (after building the model {row['rss_before_run_gib']:.2f} GiB)"
              + (f"; probe sets {row['probe_sets']} at draws {row['observed_draws']}, "
                 f"{row['observables_on_disk_bytes'] / 2**20:.0f} MiB on disk" if mode == "with" else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": "shared 2-core CPU (timings are not exclusive)",
                                               "command": " ".join(sys.argv), "runs": rows}, indent=1))


if __name__ == "__main__":
    main()

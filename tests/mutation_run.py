"""Plant known bugs one at a time and check that the tests catch each (not collected by pytest).

Each mutant below is a plausible bug (issue 23's list and the ones found since): a text substitution in
one source file, and the test files that must fail with it planted. The script copies the working tree
to a temporary directory (tracked and untracked-not-ignored files, plus the built extension), checks that
those tests pass unmutated, then plants each mutant in the copy, runs its tests and puts the file back.

    python tests/mutation_run.py                  # every mutant (about 15 min on a 2-core machine)
    python tests/mutation_run.py --list           # names only
    python tests/mutation_run.py -k tile -k demo  # mutants whose name contains one of the words

Outcomes: ``caught`` (a test failed), ``SURVIVED`` (every test passed: a gap), ``STALE`` (the text to
replace is no longer in the file exactly once: update the mutant after a refactor), ``BASELINE-FAIL``
(the tests fail without the mutant). Exit status 0 only when every mutant was caught.
Not run in CI (it reruns test files once per mutant); rerun it after changing the code a mutant names.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str                 # what the bug is
    path: str                 # file to change, relative to the repository root
    old: str                  # text that must occur exactly once
    new: str                  # its replacement
    tests: Tuple[str, ...]    # pytest arguments that must fail


MUTANTS: List[Mutant] = [
    Mutant("l(w*) taken on the previous step's minibatch", "rllc_fast/llc.py",
           "        value = cache[b]\n", "        value = cache[batch_ids[t - 1]] if t else cache[b]\n",
           ("tests/test_paper_formula.py",)),
    Mutant("reference engine records a draw after its update (first draw not at w*)", "rllc_fast/engine/reference.py",
           "                    d = config.draw_index(t)\n", "                    d = config.draw_index(t - 1)\n",
           ("tests/test_paper_formula.py",)),
    Mutant("SGLD drift without the 1/2", "rllc_fast/sgld.py",
           "delta.mul_(-0.5 * step_size)", "delta.mul_(-1.0 * step_size)", ("tests/test_paper_formula.py",)),
    Mutant("every chain of a component gets chain 0's noise", "rllc_fast/sgld.py",
           'f"{seed}|{component}|{chain}"', 'f"{seed}|{component}|0"', ("tests/test_paper_formula.py",)),
    Mutant("draw index off by one after burn-in", "rllc_fast/config.py",
           "        k = step - self.num_burnin\n", "        k = step - self.num_burnin + 1\n",
           ("tests/test_paper_formula.py",)),
    Mutant("sq_dist keeps only the last column tile", "rllc_fast/ops.py",
           "sq_dist[r0:r1] += diff.pow_(2).sum(dim=1)", "sq_dist[r0:r1] = diff.pow_(2).sum(dim=1)",
           ("tests/test_ops.py",)),
    Mutant("the last column tile is never updated", "rllc_fast/ops.py",
           "for c0 in range(0, n, cols):", "for c0 in range(0, max(n - cols, 1), cols):", ("tests/test_ops.py",)),
    Mutant("structured path skips the MLP of sequential blocks", "rllc_fast/engine/head_replicas.py",
           "            resid = resid + block.mlp(norm(block.ln2, resid))\n", "            pass\n",
           ("tests/test_structured_path.py",)),
    Mutant("backend() names the wrong state", "rllc_fast/ops.py",
           'return "compiled extension without CUDA: PyTorch fallback on every device but the two CPU kernels"',
           'return "compiled extension: CUDA kernels on GPU, PyTorch fallback on CPU but its two kernels"',
           ("tests/test_ops.py",)),
    Mutant("a diverged replica is not frozen (its lengths stay)", "rllc_fast/engine/batched.py",
           "        lengths.masked_fill_(bad, 0)\n", "        pass\n",
           ("tests/test_batched_engine.py", "tests/test_structured_path.py")),
    Mutant("rllc sweep exits 0 when a checkpoint fails", "rllc_fast/cli/sweep.py",
           "    return 0 if not report.failed else EXIT_FAILURES\n", "    return 0\n", ("tests/test_cli.py",)),
    Mutant("a unit's rows committed one at a time", "rllc_fast/store.py",
           "        with self._write() as con:\n"
           "            con.executemany(f\"INSERT OR REPLACE INTO estimates ({', '.join(columns)}) VALUES \"\n"
           "                            f\"({', '.join('?' * len(columns))})\", rows)\n",
           "        for row in rows:\n"
           "          with self._write() as con:\n"
           "            con.executemany(f\"INSERT OR REPLACE INTO estimates ({', '.join(columns)}) VALUES \"\n"
           "                            f\"({', '.join('?' * len(columns))})\", [row])\n"
           "        with self._write() as con:\n",
           ("tests/test_store.py",)),
    Mutant("Hessian trace uses only the last of num_batches batches", "rllc_fast/hessian/trace.py",
           "np.mean([pb[n] for pb in per_batch], axis=0)", "np.mean([pb[n] for pb in per_batch[-1:]], axis=0)",
           ("tests/test_hessian.py",)),
    Mutant("Hessian operator (Hutch++) uses only the last batch", "rllc_fast/hessian/operator.py",
           "            total += op.apply(v)\n", "            total = op.apply(v) * len(self.batches)\n",
           ("tests/test_hessian.py",)),
    Mutant("the demo's code drLLC is computed on the mixture", "rllc_fast/demo.py",
           "{REFINED: data[REFINED]}", "{REFINED: data[BASE]}", ("tests/test_toy_and_demo.py", "-k", "quick_demo")),
    Mutant("negative token ids accepted by the check", "rllc_fast/losses.py",
           "        if lo < 0 or (", "        if lo < -1 or (", ("tests/test_bad_input.py",)),
    Mutant("init_loss_trace of one batch too late in both engines", "rllc_fast/llc.py",
           "        init_losses = loss_at_optimum(model, batches, star_loss, schedule.distinct_batch_ids())\n",
           "        init_losses = loss_at_optimum(model, batches, star_loss, schedule.distinct_batch_ids())\n"
           "        init_losses = np.roll(init_losses, -1)\n", ("tests/test_batched_engine.py", "-k", "same_noise")),
    Mutant("cluster --apply-to returns the fitted run's labels", "rllc_fast/analysis/runs.py",
           "        labels = clustering.predict([head_curves(other, d, layer)[1] for d in data])\n",
           "        labels = dict(clustering.labels)\n", ("tests/test_analysis_cli.py", "-k", "every_subcommand")),
    Mutant("susceptibility baseline from the component's own run, not the whole model's",
           "rllc_fast/susceptibility.py",
           "            chi = chain_susceptibilities(phi, pt, losses[p][ok], full_delta[p])",
           "            chi = chain_susceptibilities(phi, pt, losses[p][ok], pt.mean() - losses[p][ok].mean(axis=(0, 1)))",
           ("tests/test_susceptibility_exact.py",)),
    Mutant("susceptibility standard errors leave out the whole-model run's noise", "rllc_fast/susceptibility.py",
           "            per_token_sem[p][i] = np.hypot(per_token_sem_chains[p][i], e_phi * delta_sem[p])\n",
           "            per_token_sem[p][i] = per_token_sem_chains[p][i]\n",
           ("tests/test_susceptibility_exact.py",)),
    Mutant("probe losses recorded after the step's update", "rllc_fast/engine/batched.py",
           "            for probe in probes if slot >= 0 else ():\n                probe(w, slot, trace.host_live)\n"
           "            graphs(\"update\", update)\n",
           "            graphs(\"update\", update)\n"
           "            for probe in probes if slot >= 0 else ():\n                probe(w, slot, trace.host_live)\n",
           ("tests/test_observables.py",)),
    Mutant("Bayesian influence without centring the losses", "rllc_fast/influence.py",
           "    x = x - x.mean(axis=0)\n", "    x = x - 0.0\n", ("tests/test_observables.py", "-k", "influence")),
    Mutant("probe sets of one length split in the wrong order", "rllc_fast/observables.py",
           "        return dict(zip(self.names, values.split(list(self.sizes), dim=dim)))",
           "        return dict(zip(self.names[::-1], values.split(list(self.sizes[::-1]), dim=dim)))",
           ("tests/test_observables.py",)),
    Mutant("the LLC estimate halved", "rllc_fast/result.py",
           "        per_chain[ok] = self.nbeta * (", "        per_chain[ok] = 0.5 * self.nbeta * (",
           ("tests/test_known_llc.py",)),
    Mutant("the LLC estimate halved, seen by the power models' scale test alone", "rllc_fast/result.py",
           "        per_chain[ok] = self.nbeta * (", "        per_chain[ok] = 0.5 * self.nbeta * (",
           ("tests/test_known_llc.py", "-k", "scale")),
    Mutant("the divergence step baked into the step as a host value (a CUDA graph would replay a stale one)",
           "rllc_fast/engine/batched.py",
           "        torch.where(bad, self.step, self.diverged_at, out=self.diverged_at)\n",
           "        self.diverged_at.masked_fill_(bad, int(self.step))\n", ("tests/test_cuda_graph.py",)),
    Mutant("the distances buffer swapped for a new tensor every step (a CUDA graph would read a stale one)",
           "rllc_fast/engine/batched.py",
           "            trace.sq_dist.copy_(updater.step())\n", "            trace.sq_dist = updater.step()\n",
           ("tests/test_cuda_graph.py",)),
    Mutant("the factored last-layer loss's gradient through the norm's scale with the wrong sign",
           "rllc_fast/engine/unembed_loss.py",
           "gs, neg_scale = torch.empty(R, rows_total, dtype=torch.float32, device=z.device), scale.neg()",
           "gs, neg_scale = torch.empty(R, rows_total, dtype=torch.float32, device=z.device), scale",
           ("tests/test_factored_unembedding.py",)),
    Mutant("the factored last-layer logits keep the w* head's output beside the replica's",
           "rllc_fast/engine/head_replicas.py",
           "            self._fused[key] = (W_O.detach() @ W).neg_()", "            self._fused[key] = W_O.detach() @ W",
           ("tests/test_factored_unembedding.py",)),
    Mutant("the cached -W_O W keyed on W's storage, not on the weights it is folded from",
           "rllc_fast/engine/head_replicas.py",
           "        key = (\"head_unembed\", layer) + _identity([W_O]) + folded\n",
           "        key = (\"head_unembed\", layer, W_O._version, W.data_ptr())\n", ("tests/test_factored_unembedding.py",)),
]


def _copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for built in (ROOT / "rllc_fast").glob("_C*.so"):
        shutil.copy2(built, dest / "rllc_fast" / built.name)


def _run_tests(tree: Path, tests: Tuple[str, ...], timeout: float) -> Tuple[int, float]:
    env = dict(os.environ, PYTHONPATH=str(tree), MPLBACKEND="Agg")
    start = time.monotonic()
    try:
        rc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                            cwd=tree, env=env, capture_output=True, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = -1
    return rc, time.monotonic() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", action="append", default=[], help="run mutants whose name contains this (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per test run (default 900)")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.k or any(k.lower() in m.name.lower() for k in args.k)]
    if args.list:
        for m in chosen:
            print(f"{m.name}  [{m.path}; {' '.join(m.tests)}]")
        return 0
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="rllc-mutants-") as tmp:
        tree = Path(tmp)
        _copy_tree(tree)
        baseline = {}
        for tests in sorted({m.tests for m in chosen}):
            baseline[tests], seconds = _run_tests(tree, tests, args.timeout)
            print(f"baseline {' '.join(tests)}: {'pass' if baseline[tests] == 0 else 'FAIL'} ({seconds:.0f} s)",
                  flush=True)
        for m in chosen:
            target = tree / m.path
            original = target.read_text()
            if original.count(m.old) != 1:
                outcome, seconds = "STALE", 0.0
            elif baseline[m.tests] != 0:
                outcome, seconds = "BASELINE-FAIL", 0.0
            else:
                target.write_text(original.replace(m.old, m.new))
                try:
                    rc, seconds = _run_tests(tree, m.tests, args.timeout)
                finally:
                    target.write_text(original)
                outcome = "SURVIVED" if rc == 0 else "caught" if rc in (1, -1) else f"caught (pytest exit {rc})"
            outcomes.append(outcome)
            print(f"{outcome:14s} {seconds:5.0f} s  {m.name}", flush=True)
    caught = sum(o.startswith("caught") for o in outcomes)
    print(f"{caught} of {len(outcomes)} mutants caught")
    return 0 if caught == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())

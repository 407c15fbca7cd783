"""CPU seconds per SGLD step of the default engine (all heads x chains), for before/after comparisons.

Per-step time = (T(11 draws) - T(1 draw)) / 10, the best of ``--repeats`` runs, so setup and l(w*) are
left out. Random weights (timing only). Cases:
  small:  2 layers x 4 heads, d_model 64, context 64, vocabulary 256; 2 chains (16 replicas), batch 16
  reduced: 2 layers x 8 heads, d_model 64, context 32, vocabulary 256; 4 chains (64 replicas), batch 8
  full16: the paper's model, contexts of 256 tokens; heads 0:0, 0:1, 1:0, 1:1 x 4 chains, batch 8

    OMP_NUM_THREADS=2 PYTHONPATH=$PWD python benchmarks/cpu_step_time.py [case ...]
"""
import sys
import time
import warnings

import torch

import rllc_fast as r


def case(name):
    g = torch.Generator().manual_seed(0)
    if name == "small":
        m = r.models.attn_only(n_layers=2, d_model=64, n_heads=4, d_head=16, n_ctx=64, d_vocab=256, seed=0)
        return m, torch.randint(0, 256, (256, 64), generator=g), r.heads(m), 2, 16
    if name == "reduced":
        m = r.models.attn_only(d_model=64, n_heads=8, d_head=8, n_ctx=32, d_vocab=256, seed=0)
        return m, torch.randint(0, 256, (256, 32), generator=g), r.heads(m), 4, 8
    if name == "full16":
        m = r.models.attn_only(n_ctx=256, seed=0)
        heads = r.heads(m)
        return m, torch.randint(0, 5000, (64, 256), generator=g), {k: heads[k] for k in ("0:0", "0:1", "1:0", "1:1")}, 4, 8
    raise ValueError(name)


def seconds(model, tokens, comps, chains, batch, draws):
    cfg = r.SGLDConfig(num_chains=chains, num_draws=draws, batch_size=batch, seed=0)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r.estimate_llc(model, tokens, cfg, components=comps)
    return time.perf_counter() - t0


if __name__ == "__main__":
    repeats = 3
    for name in sys.argv[1:] or ["small", "reduced", "full16"]:
        model, tokens, comps, chains, batch = case(name)
        seconds(model, tokens, comps, chains, batch, 1)  # warm-up
        one = min(seconds(model, tokens, comps, chains, batch, 1) for _ in range(repeats))
        eleven = min(seconds(model, tokens, comps, chains, batch, 11) for _ in range(repeats))
        step = max(eleven - one, 0.0) / 10
        print(f"{name}: {step * 1e3:.1f} ms/step ({len(comps) * chains} replicas, {torch.get_num_threads()} threads)")

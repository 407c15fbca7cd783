"""Do the response matrix's leading principal components set the induction heads apart (Baker et al.,
arXiv 2504.18274), on the demo's toy model? One ``estimate_llc`` over all 12 heads + the whole model at the
final checkpoint, with probe sets from every synthetic source and the training mixture as the sampling task;
susceptibilities, response matrices (per probe set, per probe token), their PCA, and separation figures.
Writes the figure (default docs/susceptibility-toy.png) and prints the numbers behind it.

    OMP_NUM_THREADS=1 python examples/susceptibility_toy.py            # the demo's full toy run (3000 steps)
    OMP_NUM_THREADS=1 python examples/susceptibility_toy.py --quick    # the quick demo's run (2000 steps)

The toy run is trained once (about a minute) into the cache (``--cache``, default ``rllc_fast.toy``'s).
"""
import argparse
import time

import numpy as np
import torch

from rllc_fast.analysis.figures import plot_response_pca
from rllc_fast.analysis.response import ResponseSettings, toy_response
from rllc_fast.toy import QUICK_RECIPE, ToyRecipe, train_toy


def describe(label, response):
    """Print the PCA and the separation of one set of susceptibilities; return the per-token and per-probe PCAs."""
    token, probe = response.pca("token", k=3), response.pca("probe", k=3)
    print(f"\n== {label}")
    for name, pca in (("per probe token", token), ("per probe set", probe)):
        sep2, sep3 = pca.separation(k=2), pca.separation(k=3)
        print(f"{name}: matrix {pca.matrix.values.shape}, explained variance PC1-3 {np.round(pca.explained, 3).tolist()}")
        print(f"  induction heads {sep3.members}; gap to the others' range per PC (score units) "
              f"{np.round(sep3.gaps, 4).tolist()}, relative to the PC's spread {np.round(sep3.relative_gaps, 2).tolist()}"
              f" (> 0: apart on that PC alone)")
        print(f"  linearly separable in PC1-2: {sep2.separable}; in PC1-3: {sep3.separable}")
        if name == "per probe token":
            shares = pca.loading_shares()
            print("  share of each PC's squared loading per probe set: "
                  + ", ".join(f"{p} {np.round(v, 2).tolist()}" for p, v in shares.items()))
        print(f"  {'head':>5} {'type':<15} {'PC1':>9} {'PC2':>9} {'PC3':>9}")
        for h, t, row in zip(pca.heads, pca.labels, pca.scores):
            print(f"  {h:>5} {t:<15} " + " ".join(f"{v:9.4f}" for v in row))
    return token, probe


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the quick demo's toy run instead of the full one")
    p.add_argument("--cache", help="toy-run cache folder (default: rllc_fast.toy.default_cache_dir())")
    p.add_argument("--chains", type=int, default=ResponseSettings.num_chains)
    p.add_argument("--draws", type=int, default=ResponseSettings.num_draws)
    p.add_argument("--probe-contexts", type=int, default=ResponseSettings.probe_contexts)
    p.add_argument("--out", default="docs/susceptibility-toy.png")
    args = p.parse_args()
    torch.set_num_threads(1)
    recipe = QUICK_RECIPE if args.quick else ToyRecipe()
    run = train_toy(args.cache, recipe, progress=False)
    settings = ResponseSettings(num_chains=args.chains, num_draws=args.draws, probe_contexts=args.probe_contexts)
    t0 = time.time()
    response = toy_response(run, settings)
    seconds = time.time() - t0
    final = run.final
    print(f"toy run {run.directory.name} ({'quick' if args.quick else 'full'} recipe), final step {final['step']}; "
          f"one estimate_llc over {len(response.result)} components, {settings}: {seconds:.0f} s "
          "(1 thread, shared machine)")
    chi = response.susceptibilities
    print(f"probe sets: {chi.probes} + sampling task {chi.sampling!r}, {settings.probe_contexts} x {recipe.n_ctx} tokens each")
    print(f"l(w*): whole model's init loss {response.result['whole'].init_loss:.4f} nats, sampling probe set at w* "
          f"{response.sampling_probe_loss:.4f} nats")
    print(f"  {'head':>5} {'type':<15} {'prev':>5} {'ind':>5} {'rLLC':>6}  aggregate susceptibility +- SE per probe set")
    types = response.head_types
    for i, h in enumerate(chi.components):
        layer, head = map(int, h.split(":"))
        print(f"  {h:>5} {types[h]:<15} {final['previous_token'][layer][head]:5.2f} {final['induction'][layer][head]:5.2f} "
              f"{response.result[h].llc_mean:6.2f}  " + "  ".join(
                  f"{p} {chi.aggregate[i, j]:+.4f}+-{chi.aggregate_sem[i, j]:.4f}" for j, p in enumerate(chi.probes)))
    token, probe = describe("phi = L - l(w*), l(w*) the sampling probe set's own loss at w* (phi(w*) = 0: the "
                            "package's default)", response)
    describe("phi = L - l(w*), l(w*) the whole model's init loss on the sampling minibatches (close to devinterp's)",
             response.rebased(response.result["whole"].init_loss))
    note = (f"final checkpoint (step {final['step']}) of the {'quick' if args.quick else 'full'} demo toy run; "
            f"{settings.num_chains} chains x {settings.num_draws} draws, probe sets {chi.probes} "
            f"({settings.probe_contexts} contexts each), sampling task {chi.sampling}")
    path = plot_response_pca({"response matrix per probe token": token, "response matrix per probe set": probe},
                             args.out, "Heads in the response matrix's first two principal components", note=note)
    print(f"\nfigure: {path}")


if __name__ == "__main__":
    main()

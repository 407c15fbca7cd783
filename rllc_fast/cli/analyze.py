"""``rllc analyze {scores,composition,ablation,tokens,cluster}``: the analysis suite (``rllc_fast.analysis``)
on a checkpoint series or a sweep's store, writing rows to the store and a figure to ``--out``."""
from __future__ import annotations

from pathlib import Path

from ..data.tokens import RAW_DTYPES
from .args import positive_int
from .common import NUM_CONTEXTS, load_data, load_like, open_store, store_notes

SUBCOMMANDS = {
    "scores": "previous-token, current-token, induction and prefix-matching scores over training, and head "
              "types (classify_heads) at the last checkpoint",
    "composition": "Q-, K- and V-composition scores between every earlier and later head over training",
    "ablation": "zero/mean/resample ablation score of each head, and the ICL score with each head mean-ablated, "
                "over training",
    "tokens": "classify each head's most affected tokens in context (induction, Dyck, skip n-gram, n-gram) at "
              "one checkpoint",
    "cluster": "cluster per-head rLLC curves of a sweep (K-means, DTW K-means, Ward, shape-based)",
}


def _series_arguments(p, data: bool) -> None:
    p.add_argument("--checkpoints", required=True, help="a checkpoint folder, file, Hugging Face directory or glob (as for `rllc sweep`)")
    if data:
        p.add_argument("--data", required=True, metavar="[NAME=]SPEC",
                       help="data: built-in corpus, synthetic:SOURCE or a token/text file (as for `rllc sweep`)")
        p.add_argument("--context", type=positive_int, help="tokens per context (default: the model's n_ctx, at most 64)")
        p.add_argument("--num-contexts", type=positive_int, default=NUM_CONTEXTS, help="contexts")
        p.add_argument("--dtype", default="uint16", choices=RAW_DTYPES,
                       help="element type of raw .bin token files (default uint16)")
        p.add_argument("--tokenizer", help="tokenizers JSON file for text data")
        p.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    p.add_argument("--like", help="a checkpoint whose architecture every checkpoint must match (plain state dicts)")


def add_parser(sub) -> None:
    analyze = sub.add_parser("analyze", help="analysis suite: head scores, composition, ablations, tokens in "
                                             "context, clustering of rLLC curves",
                             description="Independent tools to check rLLCs against (paper appendices B, E, F.4, "
                                         "F.5). Each subcommand writes its rows to --store (table analyses) and a "
                                         "figure to --out.")
    inner = analyze.add_subparsers(dest="analysis", required=True)
    for name, text in SUBCOMMANDS.items():
        p = inner.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        if name != "cluster":
            _series_arguments(p, data=name != "composition")
        p.add_argument("--store", required=True, help="SQLite result store (that of `rllc sweep`; created by the "
                                                      "first rows when missing)")
        p.add_argument("--out", default="rllc-analysis", help="folder for the figure (default ./rllc-analysis)")
        p.add_argument("--quiet", action="store_true", help="no progress bars or logs")
        p.set_defaults(func=run)
        if name == "scores":
            p.add_argument("--prev-threshold", type=float, default=0.5, help="previous-token score threshold (0.5)")
            p.add_argument("--induction-threshold", type=float, default=0.3, help="induction score threshold (0.3)")
            p.add_argument("--current-threshold", type=float, default=0.5, help="current-token score threshold (0.5)")
            p.add_argument("--low", type=int, default=None,
                           help="lowest token id of the repeated random sequences (default 0; synthetic data: "
                                "the first word id)")
        if name == "composition":
            p.add_argument("--types-from", metavar="STORE",
                           help="colour heads by the head types `rllc analyze scores` stored there (default --store)")
        if name == "ablation":
            p.add_argument("--kind", action="append", choices=["zero", "mean", "resample"],
                           help="ablation kind; repeatable (default mean)")
            p.add_argument("--heads", help="comma-separated heads l:h (default all)")
        if name == "tokens":
            p.add_argument("--step", type=int, help="the checkpoint's training step (default the last)")
            p.add_argument("--k", type=int, default=1000, help="tokens in context per head (default 1000)")
            p.add_argument("--heads", help="comma-separated heads l:h (default all)")
            p.add_argument("--brackets", help="bracket pairs as open:close token ids, comma-separated (default: the "
                                              "synthetic pairs for synthetic data, ASCII ()[]{} for byte data)")
        if name == "cluster":
            p.add_argument("--data", action="append", required=True,
                           help="data name in the store whose per-head curves are clustered; repeat to concatenate "
                                "(e.g. --data mixture --data code)")
            p.add_argument("--clusters", type=int, required=True, help="number of clusters")
            p.add_argument("--method", choices=["kmeans", "dtw", "ward", "sbd"], default="kmeans",
                           help="clustering method (default kmeans)")
            p.add_argument("--layer", type=int, help="cluster the heads of one layer only")
            p.add_argument("--resample", action="store_true", help="interpolate curves of unequal length")
            p.add_argument("--apply-to", action="append", default=[], metavar="STORE",
                           help="another run's store (read only) whose heads get labels from this clustering, "
                                "written to clusters.json and --store; repeatable")
            p.add_argument("--seed", type=int, default=0, help="clustering seed (default 0)")


def _heads(text):
    return [h.strip() for h in text.split(",") if h.strip()] if text else None


def _brackets(args, spec: str, vocab: int):
    if args.brackets:
        try:
            return dict(tuple(int(x) for x in pair.split(":")) for pair in args.brackets.split(","))
        except ValueError:
            raise SystemExit(f"rllc analyze tokens: --brackets {args.brackets!r}: expected open:close pairs, e.g. 0:1,2:3") from None
    if spec.startswith("synthetic:"):
        from ..data.synthetic import BRACKETS

        return {2 * k: 2 * k + 1 for k in range(BRACKETS)}
    if vocab <= 260 and not args.tokenizer:
        return {ord("("): ord(")"), ord("["): ord("]"), ord("{"): ord("}")}
    return {}


def run(args) -> int:
    """``rllc analyze ANALYSIS``: see the module doc."""
    from ..analysis import runs
    from ..progress import logger

    log = logger(args.quiet)
    out = Path(args.out)
    command = f"analyze {args.analysis}"
    what = f"rllc {command}"
    try:
        if args.analysis == "cluster":  # reads the sweep's rows: the store must exist
            open_store(args.store, what, readonly=True)
        store = open_store(args.store, what, readonly=False)
        out.mkdir(parents=True, exist_ok=True)  # once the store is known to be usable
        if args.analysis == "cluster":
            others = [open_store(p, what, readonly=True, flag="--apply-to") for p in args.apply_to]
            with store_notes(what):  # e.g. which configuration the curves are of
                clustering, applied = runs.analyze_clusters(store, args.data, args.clusters, args.method, out,
                                                            args.layer, args.seed, args.resample, others)
            print(f"{args.method}, {args.clusters} clusters on {' + '.join(args.data)}: " +
                  ", ".join(f"{h}={c}" for h, c in clustering.labels.items()))
            print("scores: " + ", ".join(f"{k} {v:.3f}" for k, v in clustering.scores.items()))
            for path, labels in applied.items():
                print(f"applied to {path}: " + ", ".join(f"{h}={c}" for h, c in labels.items()))
            log(f"wrote {out / 'clusters.png'} and {out / 'clusters.json'}")
            return 0
        from ..models.checkpoints import select_checkpoints

        series = select_checkpoints(args.checkpoints)
        like = load_like(args, command)
        progress = not args.quiet
        if args.analysis == "composition":
            types_store = open_store(args.types_from, what, readonly=True, flag="--types-from") if args.types_from \
                else store
            types = types_store.analysis_rows("head-type")
            head_types = dict(zip(types["head"], types["other"])) if not types.empty else None
            runs.analyze_composition(series, store, out, head_types, like, progress)
            log(f"wrote {out}/composition_{{Q,K,V}}.png")
            return 0
        first = series[-1].load(like=like)
        name, spec, tokens = load_data(args, args.context or min(64, first.cfg.n_ctx), command)
        if args.analysis == "scores":
            from ..data.synthetic import WORDS

            low = args.low if args.low is not None else (int(WORDS[0]) if spec.startswith("synthetic:") else 0)
            thresholds = {"previous_token": args.prev_threshold, "induction": args.induction_threshold,
                          "current_token": args.current_threshold}
            df, labels = runs.analyze_scores(series, tokens, name, store, out, thresholds, low=low, like=like,
                                             progress=progress)
            last = df[df["step"] == df["step"].max()].pivot_table(index="head", columns="name", values="value")
            print(f"head scores at step {int(df['step'].max())} on {name}:")
            print(last.assign(type=[labels[h] for h in last.index]).round(3).to_string())
            log(f"wrote {out / 'head_scores.png'}")
        elif args.analysis == "ablation":
            runs.analyze_ablation(series, tokens, name, store, out, args.kind or ["mean"], _heads(args.heads), like,
                                  progress)
            log(f"wrote {out / 'ablation.png'} and {out / 'icl.png'}")
        else:
            chosen = series[-1] if args.step is None else next((c for c in series if c.step == args.step), None)
            if chosen is None:
                raise ValueError(f"--step {args.step}: no checkpoint at that step; steps are {[c.step for c in series]}")
            summaries = runs.analyze_tokens(chosen, tokens, name, store, out, args.k,
                                            _brackets(args, spec, first.cfg.d_vocab), _heads(args.heads), like, progress)
            print(f"tokens in context at step {chosen.step} on {name} (% of top {args.k} per head):")
            for head, s in summaries.items():
                print(f"  {head}: " + ", ".join(f"{p} {v:.0f}%" for p, v in s["percent"].items()) +
                      f"; {s['unique_multigrams']} unique multigrams")
            log(f"wrote {out / 'tokens_in_context.png'}")
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise SystemExit(f"{what}: {err}") from None
    return 0

"""Write a small training run's checkpoints for `rllc sweep`: a 2-layer, 8-heads-per-layer attention-only
model trained on UTF-8 bytes of the Python standard library's source (offline), checkpoints at
log-spaced steps.

    python examples/train_stdlib_bytes.py --out runs/stdlib-bytes --steps 400 --checkpoints 8
"""
import argparse

from rllc_fast.data import corpus_tokens
from rllc_fast.models import attn_only
from rllc_fast.models.train import log_spaced_steps, train_next_token


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/stdlib-bytes", help="checkpoint folder (default runs/stdlib-bytes)")
    p.add_argument("--steps", type=int, default=400, help="AdamW steps (default 400)")
    p.add_argument("--checkpoints", type=int, default=8, help="about this many log-spaced checkpoints (default 8)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    model = attn_only(seed=args.seed, n_layers=2, d_model=64, n_heads=8, d_head=8, n_ctx=64, d_vocab=256)
    tokens = corpus_tokens("stdlib_code", 64, 4096, seed=args.seed)
    steps = log_spaced_steps(args.steps, args.checkpoints)
    loss = train_next_token(model, tokens, args.steps, seed=args.seed, progress=True, save_at=steps, save_dir=args.out)
    print(f"final training loss {loss:.3f} nats/byte; checkpoints at steps {steps} in {args.out}")


if __name__ == "__main__":
    main()

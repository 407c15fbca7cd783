"""CPU seconds per SGLD step, per model family loaded with ``load_hf``: the batched engine's structured path
(where ``plan`` routes the components to it) against its generic path, on every head x 2 chains and, for the
grouped-query families, also on every key/value group x 2 chains (a second row, component set ``groups``).

A tiny random model of each family (``transformers`` config, ``save_pretrained`` into a temporary folder,
``load_hf``): 2 layers x 4 heads of 16, d_model 64, MLP 128, vocabulary 256, context 32, batch 8;
grouped-query families with 2 key/value groups. Per-step time = (T(11 draws) - T(1 draw)) / 10, the best of
``--repeats`` runs (setup and l(w*) left out). Random weights: timing only.

    OMP_NUM_THREADS=2 PYTHONPATH=$PWD python benchmarks/bench_families.py [--repeats 3] [--out FILE.json]
"""
import argparse
import json
import platform
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch

import rllc_fast as r
from rllc_fast.engine.structured import plan
from rllc_fast.losses import next_token_loss
from rllc_fast.models import load_hf

SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=32)


def configs():
    import transformers as T

    rope = {"rope_type": "default", "rope_theta": 10000.0}
    return {
        "gpt_neox": T.GPTNeoXConfig(**SHAPE, rope_parameters={**rope, "partial_rotary_factor": 0.25}),
        "gpt2": T.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=32),
        "llama (MHA)": T.LlamaConfig(**SHAPE, num_key_value_heads=4),
        "llama (GQA)": T.LlamaConfig(**SHAPE, num_key_value_heads=2),
        "mistral": T.MistralConfig(**SHAPE, num_key_value_heads=2, sliding_window=None),
        "qwen2": T.Qwen2Config(**SHAPE, num_key_value_heads=2),
        "olmo": T.OlmoConfig(**SHAPE),
        "gemma": T.GemmaConfig(**SHAPE, num_key_value_heads=2, head_dim=16),
    }


def seconds(model, tokens, comps, engine, draws):
    cfg = r.SGLDConfig(num_chains=2, num_draws=draws, batch_size=8, seed=0)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r.estimate_llc(model, tokens, cfg, components=comps, engine=engine)
    return time.perf_counter() - t0


def per_step(model, tokens, comps, engine, repeats):
    seconds(model, tokens, comps, engine, 1)  # warm-up
    one = min(seconds(model, tokens, comps, engine, 1) for _ in range(repeats))
    eleven = min(seconds(model, tokens, comps, engine, 11) for _ in range(repeats))
    return max(eleven - one, 0.0) / 10


def main():
    import transformers as T

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()
    tokens = torch.randint(0, 256, (64, 32), generator=torch.Generator().manual_seed(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family, config in configs().items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.manual_seed(0)
                T.AutoModelForCausalLM.from_config(config).save_pretrained(Path(tmp) / "m")
            model = load_hf(Path(tmp) / "m")
            sets = {"heads": r.heads(model)}
            if r.components.kv_groups(model) is not None:
                sets["groups"] = r.groups(model)
            for name, comps in sets.items():
                structured, _, why = plan(model, comps, next_token_loss)
                row = {"family": family, "model_type": config.model_type, "components": name,
                       "replicas": 2 * len(comps),
                       "generic_s_per_step": per_step(model, tokens, comps, "generic", args.repeats),
                       "structured_s_per_step": None, "structured_components": len(structured),
                       "structured_kinds": sorted({u.kind for u in structured.values()}), "why_not_structured": why}
                if len(structured) == len(comps):
                    row["structured_s_per_step"] = per_step(model, tokens, comps, "batched", args.repeats)
                rows.append(row)
                s = row["structured_s_per_step"]
                print(f"{family:12s} {name:6s} generic {row['generic_s_per_step'] * 1e3:7.1f} ms/step   structured "
                      + (f"{s * 1e3:7.1f} ms/step" if s is not None else f"   -    ({why})"), flush=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or
            platform.machine(), "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                                         text=True).stdout.strip(), "repeats": args.repeats}
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Modelled vs measured peak memory of the structured path's largest chunk, on the meta device.

For each layer: the chunk the engine plans for ``max_memory`` (replicas of the layer, at most
``(budget - unembed share) // bytes_per_replica``), its modelled peak (``chunk x bytes_per_replica`` +
the unembedding's block share) and the peak of live meta tensors of its forward and backward
(attention as CUDA's fused kernel, tests/meta_cost.py). Projections for a GPU: nothing is computed.

    PYTHONPATH=$PWD python benchmarks/meta_memory.py paper 40GB
    PYTHONPATH=$PWD python benchmarks/meta_memory.py pythia 80GB
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import meta_cost  # noqa: E402
from rllc_fast.engine.structured import unembed_block_bytes  # noqa: E402
from rllc_fast.losses import next_token_loss  # noqa: E402
from rllc_fast.memory import parse_bytes  # noqa: E402
from rllc_fast.engine.head_replicas import HeadReplicas  # noqa: E402


def main(shape, budget_text, chains=4):
    model, tokens, N = meta_cost.model_and_tokens(shape)
    budget = parse_bytes(budget_text)
    block = unembed_block_bytes(budget)
    batch = tokens[:N].to("meta")
    T = batch.shape[1]
    for p in model.parameters():
        p.requires_grad_(False)
    hr = HeadReplicas(model)
    cfg = model.cfg
    with meta_cost.cuda_like_sdpa():
        shared = hr.shared(batch, list(range(cfg.n_layers)))
        for layer in range(cfg.n_layers):
            per = hr.bytes_per_replica(N, T, layer)
            R = min(cfg.n_heads * chains, max(1, (budget - block) // per))
            w = torch.zeros(R, hr.numel, device="meta")
            with meta_cost.peak_bytes() as pk:
                leaf = w.clone().requires_grad_(True)
                x = hr.replica_features(shared, layer, torch.zeros(R, dtype=torch.long, device="meta"), leaf)
                losses = next_token_loss.feature_losses(x, model.unembed.W_U, model.unembed.b_U, batch, None,
                                                        block_bytes=block)
                del x
                losses.sum().backward()
            modelled = R * per + block
            print(f"{shape} max_memory={budget_text} layer {layer}: chunk {R} replicas, modelled {modelled / 1e9:.2f} GB "
                  f"({per / 1e6:.0f} MB/replica + {block / 1e9:.2f} GB unembedding blocks), meta peak "
                  f"{pk.peak / 1e9:.2f} GB, modelled/peak {modelled / pk.peak:.2f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "paper", sys.argv[2] if len(sys.argv) > 2 else "40GB")

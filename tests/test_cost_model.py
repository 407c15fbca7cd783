"""The FLOP-and-bytes model of an SGLD step (rllc_fast.cost_model) against what a real step computes: FLOPs
counted by torch's FlopCounterMode, and every operator's reads and writes counted by a dispatch mode, over one
SGLD step of estimate_llc (a 2-draw run minus a 1-draw run) at tiny shapes of three architectures."""
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import rllc_fast as r
from rllc_fast import cost_model as cm
from rllc_fast import ops
from rllc_fast.models import PAPER_CONFIG

N, T, CHAINS = 3, 20, 2
TINY = {
    "paper-like": lambda: r.models.attn_only(seed=0, d_model=32, n_heads=4, d_head=8, n_ctx=24, d_vocab=50),
    "pythia-like": lambda: r.models.pythia_like(seed=0, n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64,
                                                d_vocab=70, n_ctx=32, rotary_dim=4),
    "gpt2-like": lambda: r.models.pythia_like(seed=0, n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=128,
                                              d_vocab=70, n_ctx=32, positional_embedding_type="standard",
                                              parallel_attn_mlp=False, original_architecture="GPT2LMHeadModel"),
}


class _Traffic(TorchDispatchMode):
    """Bytes every non-view operator reads (its tensor arguments, at most their storage) and writes."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.bytes += sum(min(t.numel() * t.element_size(), t.untyped_storage().nbytes())
                              for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
            self.bytes += sum(t.numel() * t.element_size() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


# torch's FLOP formulas for fused attention, applied to the CPU's fused attention kernels too (FlopCounterMode
# has them for the CUDA kernels only): the same products, counted causal or not, as the model counts them
_CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, **kwargs: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad_out, q, k, v, *args, **kwargs: sdpa_backward_flop_count(grad_out, q, k, v),
}


def _counted(model, tokens, draws):
    config = r.SGLDConfig(num_chains=CHAINS, num_draws=draws, batch_size=N, seed=0, step_size=1e-6)
    flops, traffic = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS), _Traffic()
    with flops, traffic, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r.estimate_llc(model, tokens, config, components=r.heads(model), progress=False)
    return flops.get_total_flops(), traffic.bytes


@pytest.fixture(scope="module", params=list(TINY))
def one_step(request):
    """(model, counted FLOPs, counted bytes) of one SGLD step of all heads x 2 chains, by torch's SDPA and
    cross-entropy passes (what a GPU runs, and what the model describes), not the CPU kernels."""
    model = TINY[request.param]()
    tokens = torch.randint(0, model.cfg.d_vocab, (40, T), generator=torch.Generator().manual_seed(0))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "cpu_kernels_serve", lambda t: False)
        f1, b1 = _counted(model, tokens, 1)
        f2, b2 = _counted(model, tokens, 2)
    return model, f2 - f1, b2 - b1


@pytest.mark.skipif(not ops.CPU_KERNELS or ops._cpu_capability() not in ops.CPU_KERNEL_CAPABILITIES,
                    reason="the engine uses the CPU kernels on AVX-512 CPUs with the extension built")
def test_the_cpu_kernels_leave_the_flop_count_unchanged(monkeypatch):
    """FlopCounterMode counts the CPU attention kernel's ops as torch's SDPA (rllc_fast.ops registers the same
    formulas), so a step counts the same FLOPs whichever serves."""
    model = TINY["paper-like"]()
    tokens = torch.randint(0, model.cfg.d_vocab, (40, T), generator=torch.Generator().manual_seed(0))
    with_kernels = _counted(model, tokens, 1)[0]
    monkeypatch.setattr(ops, "cpu_kernels_serve", lambda t: False)
    assert with_kernels == _counted(model, tokens, 1)[0]


def _modelled(model, **kwargs):
    """The model of the engine's default step: fused attention (SDPA), materialized (blocked) unembedding."""
    cfg = model.cfg
    kwargs = {"attention": "fused", **kwargs}
    return cm.step_cost(cfg, cm.replica_layers(cfg.n_layers, cfg.n_heads, CHAINS), N, T, **kwargs)


def test_modelled_flops_are_the_flops_a_step_computes(one_step):
    model, flops, _ = one_step
    assert flops > 0 and _modelled(model).flops == flops  # exact: every matrix product is accounted for


def test_modelled_bytes_bound_the_counted_reads_and_writes(one_step):
    """The elementwise pass counts (``cost_model.ELEMENTWISE_PASSES``) were taken from the TransformerLens-based
    eager step; the engine's fused norms, fused attention and one-pass token loss (2026-11-30) move fewer bytes,
    so the model now overestimates the traffic: 1.61-1.82x the count at these three tiny shapes (measured
    2026-11-30; re-taking the pass counts at the paper's and Pythia-70m's shapes is open, issue 19). The test
    keeps the model an upper bound within 2x, and the fused-attention model below the materialized one."""
    model, _, traffic = one_step
    assert 1.0 <= _modelled(model).bytes / traffic <= 2.0, _modelled(model).bytes / traffic
    materialized = _modelled(model, attention="materialized")
    fused = _modelled(model, attention="fused", unembedding="fused")
    assert fused.bytes < _modelled(model).bytes < materialized.bytes


@pytest.mark.parametrize("name", list(TINY))
def test_modelled_flops_of_the_factored_last_layer_are_the_flops_a_step_computes(name, monkeypatch):
    """With the factored last layer on (the engine's choice on CUDA, here forced on the CPU): exact again; for the
    GPT-2-like shape (sequential blocks: the last layer's MLP reads its output) the model, like the engine, keeps the
    plain form."""
    from rllc_fast.engine import unembed_loss

    monkeypatch.setattr(unembed_loss, "FACTORED_DEVICES", ("cuda", "meta", "cpu"))
    model = TINY[name]()
    tokens = torch.randint(0, model.cfg.d_vocab, (40, T), generator=torch.Generator().manual_seed(0))
    counted = _counted(model, tokens, 2)[0] - _counted(model, tokens, 1)[0]
    factored, plain = _modelled(model, last_layer="factored"), _modelled(model)
    assert factored.flops == counted
    assert (factored.flops < plain.flops) == (name != "gpt2-like")


def test_hand_count_of_the_per_replica_parts():
    """2 * m * n * k per product, written out for an attention-only model (frozen weights: the backward of a
    weight's product is the input gradient alone; the replica's head gets weight gradients)."""
    d, H, dh, V, L = 32, 4, 8, 50, 2
    cfg = dict(n_layers=L, d_model=d, n_heads=H, d_head=dh, d_vocab=V, attn_only=True)
    P = T - 1
    B = N * P
    cost = cm.step_cost(cfg, [0], N, T)
    own_forward = 3 * 2 * B * d * dh + 2 * (2 * N * P * P * dh) + 2 * (2 * B * dh * d)  # QKV, QK^T & AV, W_O & w*'s
    own_backward = 2 * (2 * B * dh * d) + 4 * (2 * N * P * P * dh) + 3 * 2 * B * d * dh
    assert cost.part("per-replica: own head").flops == own_forward + own_backward
    layer_forward = 3 * 2 * B * d * H * dh + 2 * (2 * N * H * P * P * dh) + 2 * B * H * dh * d
    layer_backward = 2 * B * d * H * dh + 4 * (2 * N * H * P * P * dh) + 3 * 2 * B * H * dh * d
    assert cost.part("per-replica: layers above").flops == layer_forward + layer_backward  # layer 1, once
    assert cost.part("per-replica: unembedding").flops == 2 * (2 * B * d * V)
    assert cm.step_cost(cfg, [1], N, T).part("per-replica: layers above").flops == 0
    factored = cm.step_cost(cfg, [1], N, T, last_layer="factored")
    assert factored.part("per-replica: unembedding").flops == (2 * dh * d * V + 2 * B * 2 * dh * V + 2 * B * V * dh
                                                               + 2 * dh * B * V + 2 * dh * V * d)
    assert factored.part("shared: w* pass").flops - cm.step_cost(cfg, [1], N, T).part("shared: w* pass").flops == \
        2 * B * d * V


def test_the_paper_shape_floor_is_the_issues_figure():
    """16 heads x 4 chains, batch 8 x 1024: about 4.1 TFLOP a step, 65% per-replica unembedding, 27% layer 1
    recomputed for the 32 layer-0 replicas (issue 19)."""
    cost = cm.step_cost(PAPER_CONFIG, cm.replica_layers(2, 8, 4), 8, 1024)
    assert cost.flops == pytest.approx(4.14e12, rel=0.01)
    assert cost.part("per-replica: unembedding").flops / cost.flops == pytest.approx(0.65, abs=0.01)
    assert cost.part("per-replica: layers above").flops / cost.flops == pytest.approx(0.265, abs=0.01)
    factored = cm.step_cost(PAPER_CONFIG, cm.replica_layers(2, 8, 4), 8, 1024, last_layer="factored")
    assert factored.flops / cost.flops == pytest.approx(0.76, abs=0.01)  # a quarter fewer: the engine's form on CUDA


def test_projection_is_a_roofline_and_says_so():
    cost = cm.step_cost(PAPER_CONFIG, cm.replica_layers(2, 8, 4), 8, 1024, attention="fused", unembedding="fused")
    device = {"name": "test", "flops": {"tf32": 1e15}, "bytes_per_s": 1e12}
    assert cost.seconds(device, "tf32") == pytest.approx(sum(max(p.flops / 1e15, p.bytes / 1e12) for p in cost.parts))
    summary = cost.summary(cm.H200, steps=200)
    assert "projection" in summary["label"] and summary["seconds_per_checkpoint"]["tf32"] == pytest.approx(
        200 * cost.seconds(cm.H200, "tf32"))
    table = cm.projections()
    assert set(table) >= {"paper batch 8 fused tf32", "pythia-70m batch 16 materialized fp32"}
    # batch 16 costs twice batch 8
    assert table["paper batch 16 fused tf32"]["tflop_per_step"] == pytest.approx(
        2 * table["paper batch 8 fused tf32"]["tflop_per_step"], rel=0.01)


@pytest.mark.parametrize("kwargs, message", [
    (dict(layers=[2]), "layers"), (dict(layers=[]), "layers"), (dict(precision="fp16"), "precision"),
    (dict(attention="flash"), "attention"), (dict(batch=0), "batch"), (dict(last_layer="low"), "last_layer"),
])
def test_bad_input_names_the_argument(kwargs, message):
    args = {**dict(layers=[0], batch=8, context=16), **kwargs}
    with pytest.raises(ValueError, match=message):
        cm.step_cost(PAPER_CONFIG, **args)
    with pytest.raises(ValueError, match="cfg"):
        cm.step_cost({"n_layers": 2}, [0], 8, 16)
    with pytest.raises(ValueError, match="precision"):
        cm.step_cost(PAPER_CONFIG, [0], 8, 16).seconds(cm.H200, "int8")

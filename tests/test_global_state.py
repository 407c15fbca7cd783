"""The package leaves global state as it found it: building or loading a model, training a toy run,
estimating an LLC or a Hessian metric change no global random state (torch, CUDA, numpy, ``random``) and no
global setting (threads, default dtype, TF32/matmul precision, warning filters)."""
import random
import warnings

import numpy as np
import pytest
import torch

import rllc_fast as r
from devices import DEVICES
from rllc_fast import hessian
from rllc_fast.data import data_from_spec
from rllc_fast.models import attn_only, checkpoint_series, load_gpt_neox, load_hf, pythia_like, save_checkpoint
from rllc_fast.models.train import train_next_token
from rllc_fast.toy import ToyRecipe, toy_model, train_toy

TINY = dict(n_layers=1, d_model=16, n_heads=2, d_head=8, n_ctx=8, d_vocab=30)


def _random_state():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return torch.get_rng_state(), cuda, np.random.get_state(), random.getstate()


def _assert_same_random_state(before, after):
    (t0, c0, n0, p0), (t1, c1, n1, p1) = before, after
    assert torch.equal(t0, t1), "torch's global (CPU) generator changed"
    assert len(c0) == len(c1) and all(torch.equal(a, b) for a, b in zip(c0, c1)), "a CUDA generator changed"
    assert n0[0] == n1[0] and np.array_equal(n0[1], n1[1]) and n0[2:] == n1[2:], "numpy's global RNG changed"
    assert p0 == p1, "Python's random state changed"


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _hf_dir(path, family: str):
    """A tiny random Hugging Face checkpoint of ``family`` ("neox" or "llama") saved in ``path``."""
    import transformers

    config_cls, model_cls, extra = {
        "neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
        "llama": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 1}),
    }[family]
    cfg = getattr(transformers, config_cls)(vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, max_position_embeddings=16, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        getattr(transformers, model_cls)(cfg).save_pretrained(path)
    return path


def _hf_neox_dir(path):
    return _hf_dir(path, "neox")


def _hf_llama_dir(path):
    return _hf_dir(path, "llama")


def _checkpoint_dir(path):
    save_checkpoint(attn_only(seed=1, **TINY), path / "step000001.pt", 1)
    return path


TINY_TOY = ToyRecipe(steps=2, checkpoints=2, n_layers=1, d_model=8, n_heads=2, n_ctx=16, batch_size=4, warmup=0,
                     num_contexts=16)

#: name -> (setup(tmp_path) -> argument, build(argument)); setup runs before the global state is recorded.
BUILDERS = {
    "attn_only": (lambda tmp: None, lambda _: attn_only(seed=3, **TINY)),
    "pythia_like": (lambda tmp: None, lambda _: pythia_like(seed=3, n_layers=1, d_model=16, n_heads=2, d_head=8,
                                                            d_mlp=32, n_ctx=8, d_vocab=30, rotary_dim=4)),
    "load_gpt_neox": (lambda tmp: _hf_neox_dir(tmp / "neox"), load_gpt_neox),
    "load_hf": (lambda tmp: _hf_llama_dir(tmp / "llama"), load_hf),
    "checkpoint.load": (_checkpoint_dir, lambda d: checkpoint_series(d)[0].load()),
    "checkpoint.load(like=)": (_checkpoint_dir, lambda d: checkpoint_series(d)[0].load(like=attn_only(**TINY).cfg)),
    "toy_model": (lambda tmp: None, lambda _: toy_model(TINY_TOY)),
    "train_next_token": (lambda tmp: (attn_only(**TINY), torch.randint(0, 30, (8, 8))),
                         lambda a: train_next_token(a[0], a[1], steps=2, batch_size=4)),
    "train_toy": (lambda tmp: tmp, lambda d: train_toy(d, TINY_TOY, progress=False, log=lambda s: None, force=True)),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_model_builders_leave_the_global_random_state_alone(name, tmp_path):
    setup, build = BUILDERS[name]
    argument = setup(tmp_path)
    _seed_everything(123)
    before = _random_state()
    build(argument)
    _assert_same_random_state(before, _random_state())


@pytest.mark.parametrize("device", DEVICES)
def test_building_on_a_device_leaves_its_generators_alone(device):
    if device == "cuda":
        torch.cuda.init()
    _seed_everything(5)
    before = _random_state()
    on_device = attn_only(seed=3, device=device, **TINY)
    _assert_same_random_state(before, _random_state())
    for (k, a), b in zip(on_device.state_dict().items(), attn_only(seed=3, **TINY).state_dict().values()):
        assert a.device.type == device and torch.equal(a.cpu(), b), k  # drawn on the CPU, then moved


def test_data_drawn_after_building_a_model_is_fresh():
    # The quickstart's bug: attn_only() reset the global seed, so tokens drawn after each of two builds were equal.
    attn_only(**TINY)
    tokens = torch.randint(0, 30, (4, 8))
    attn_only(**TINY)
    assert not torch.equal(torch.randint(0, 30, (4, 8)), tokens)


def test_the_seed_alone_fixes_the_initial_weights():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    _seed_everything(1)
    a = attn_only(seed=3, **TINY)
    _seed_everything(2)
    b = attn_only(seed=3, **TINY)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():  # TransformerLens's own seeding
        warnings.simplefilter("ignore")
        theirs = HookedTransformer(HookedTransformerConfig(**{**r.models.PAPER_CONFIG, **TINY}, seed=3))
    for (k, va), vb, vt in zip(a.state_dict().items(), b.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(va, vb) and torch.equal(va, vt), k
    assert a.cfg.seed == 3
    c = attn_only(seed=4, **TINY)
    assert not torch.equal(c.blocks[0].attn.W_Q, a.blocks[0].attn.W_Q)


def _settings() -> dict:
    return dict(
        num_threads=torch.get_num_threads(),
        default_dtype=torch.get_default_dtype(),
        matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        cudnn_benchmark=torch.backends.cudnn.benchmark,
        cudnn_deterministic=torch.backends.cudnn.deterministic,
        deterministic_algorithms=torch.are_deterministic_algorithms_enabled(),
        grad_enabled=torch.is_grad_enabled(),
        warning_filters=list(warnings.filters),
    )


def _package_calls(tmp_path) -> None:
    """A representative set of calls: build and load models, data, an LLC, the Hessian metrics."""
    model = attn_only(seed=3, **TINY)
    save_checkpoint(model, tmp_path / "step000001.pt", 1)
    checkpoint_series(tmp_path)[0].load(like=model)
    tokens = data_from_spec("synthetic:mixture", 8, 16)
    tokens = tokens % TINY["d_vocab"]
    config = r.SGLDConfig(num_chains=2, num_draws=3, num_burnin=0, batch_size=4, step_size=1e-4)
    for engine in ("batched", "reference"):
        r.estimate_llc(model, tokens, config, components=r.heads(model), engine=engine)
    hessian.trace(model, tokens, r.heads(model), num_probes=2, num_batches=2, batch_size=4)
    hessian.fim_trace(model, tokens, num_probes=2, num_batches=2, batch_size=4)
    hessian.approx_rank(model, tokens, num_probes=2, num_batches=1, batch_size=4, degree=4, power_iters=2)


def test_package_calls_leave_global_settings_and_random_state_alone(tmp_path):
    original = _settings()
    threads = 1 if original["num_threads"] != 1 else 2
    try:  # unusual values, so that a call that sets a "sensible" value shows
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision("medium")
        torch.backends.cudnn.allow_tf32 = not original["cudnn_allow_tf32"]
        warnings.filterwarnings("default", message="rllc_fast test sentinel")
        _seed_everything(7)
        before, state = _settings(), _random_state()
        _package_calls(tmp_path)
        after = _settings()
        assert after == before, {k: (before[k], after[k]) for k in before if before[k] != after[k]}
        _assert_same_random_state(state, _random_state())
    finally:
        torch.set_num_threads(original["num_threads"])
        torch.set_float32_matmul_precision(original["float32_matmul_precision"])
        torch.backends.cudnn.allow_tf32 = original["cudnn_allow_tf32"]
        warnings.filters[:] = original["warning_filters"]


def test_the_demo_sets_matplotlibs_cache_folder_only_while_it_runs(tmp_path, monkeypatch):
    import os

    from rllc_fast import demo

    seen = []
    monkeypatch.setattr(demo, "_run_demo", lambda *args: seen.append(os.environ.get("MPLCONFIGDIR")) or {})
    monkeypatch.delenv("MPLCONFIGDIR", raising=False)
    demo.run_demo(tmp_path / "out", cache_dir=tmp_path / "cache")
    assert seen == [str(tmp_path / "cache" / "matplotlib")] and "MPLCONFIGDIR" not in os.environ
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mine"))  # a user's own setting wins and stays
    demo.run_demo(tmp_path / "out", cache_dir=tmp_path / "cache")
    assert seen[-1] == str(tmp_path / "mine") and os.environ["MPLCONFIGDIR"] == str(tmp_path / "mine")

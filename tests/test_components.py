"""Components: heads of TransformerLens models (grouped-query attention too: query heads and key/value groups),
layers, MLPs, whole models, from_params with whole parameters or row/column slices."""
import pytest
import torch
from torch import nn

import rllc_fast as r
from rllc_fast.components import make_component


@pytest.fixture(scope="module")
def paper_model():
    return r.models.attn_only()  # the paper's shape: 2 layers x 8 heads, d_model 256


def test_paper_model_heads_have_32864_weights_each(paper_model):
    assert sum(p.numel() for p in paper_model.parameters()) == 3_355_016
    hs = r.heads(paper_model)
    assert list(hs) == [f"{l}:{h}" for l in range(2) for h in range(8)]
    assert all(c.numel == 32_864 for c in hs.values())
    one = hs["1:6"]
    assert {s.describe() for s in one.slices} == {
        f"blocks.1.attn.{p}[6]" for p in ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O")
    }
    assert not any(s.param.endswith("b_O") for c in hs.values() for s in c.slices)


def test_layers_whole_and_overlap(paper_model):
    l0 = r.layer(paper_model, 0)
    assert l0.name == "L0"
    assert l0.numel == sum(p.numel() for n, p in paper_model.named_parameters() if n.startswith("blocks.0."))
    assert r.whole(paper_model).numel == 3_355_016
    # overlapping components are allowed: a head and its layer are separate refinements
    comps = r.components.as_component_dict(paper_model, [r.heads(paper_model)["0:1"], l0])
    assert set(comps) == {"0:1", "L0"}


def test_from_params_names_and_regex():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    c = r.from_params(model, r"0\..*")
    assert c.param_names == ["0.bias", "0.weight"] and c.numel == 16
    c2 = r.from_params(model, ["2.weight"])
    assert c2.numel == 8
    with pytest.raises(ValueError, match="matches no parameter"):
        r.from_params(model, r"nothing.*")
    with pytest.raises(ValueError, match="no parameter"):
        r.from_params(model, ["5.weight"])


def test_refuses_slices_that_do_not_exist():
    model = nn.Linear(3, 4)
    with pytest.raises(ValueError, match="out of range"):
        make_component(model, "bad", [("weight", (7,))])
    with pytest.raises(ValueError, match="more dimensions"):
        make_component(model, "bad", [("bias", (0, 1))])
    with pytest.raises(ValueError, match="no parameter named"):
        make_component(model, "bad", [("W_Q", (0,))])


def test_head_index_out_of_range(paper_model):
    with pytest.raises(ValueError, match="head index 8 out of range"):
        r.head(paper_model, 0, 8)
    with pytest.raises(ValueError, match="layer index 2 out of range"):
        r.layer(paper_model, 2)
    with pytest.raises(TypeError, match="TransformerLens"):
        r.heads(nn.Linear(2, 2))


def test_component_from_another_model_is_refused():
    small = r.models.attn_only(n_layers=1, d_model=16, n_heads=2, d_head=8, n_ctx=8, d_vocab=11)
    other = r.models.attn_only(n_layers=2, d_model=16, n_heads=2, d_head=8, n_ctx=8, d_vocab=11)
    wider = r.models.attn_only(n_layers=1, d_model=32, n_heads=2, d_head=16, n_ctx=8, d_vocab=11)
    foreign = r.heads(other)["1:0"]
    with pytest.raises(ValueError, match="another model"):
        r.estimate_llc(small, torch.randint(0, 11, (4, 8)), components=[foreign])
    with pytest.raises(ValueError, match="has shape"):
        r.estimate_llc(small, torch.randint(0, 11, (4, 8)), components=[r.heads(wider)["0:0"]])


def test_head_names_are_built_and_parsed_in_one_place():
    """``head_name``/``parse_head_name`` (and the group forms) round-trip, and anything else is refused with
    the expected form; ``heads()`` keys and the analysis code use the same helper."""
    import rllc_fast as r

    assert r.head_name(1, 6) == "1:6" and r.parse_head_name("1:6") == (1, 6) and r.parse_head_name(" 12:0 ") == (12, 0)
    assert r.group_name(2, 0) == "2:g0" and r.parse_group_name("2:g0") == (2, 0)
    for bad in ("L1", "1:g0", "1:2:3", "a:b", "-1:2", ""):
        with pytest.raises(ValueError, match="expected 'layer:head'"):
            r.parse_head_name(bad)
    with pytest.raises(ValueError, match="expected 'layer:gGROUP'"):
        r.parse_group_name("1:0")
    model = r.models.attn_only(n_layers=2, d_model=16, n_heads=2, d_head=8, n_ctx=8, d_vocab=16)
    assert list(r.heads(model)) == [r.head_name(l, h) for l in range(2) for h in range(2)]


def _gqa_model(seed=0, n_layers=2, n_heads=4, n_kv=2):
    """A tiny Llama-like TransformerLens model with grouped-query attention, every weight non-zero."""
    from rllc_fast.models.build import hooked_config, hooked_transformer

    model = hooked_transformer(hooked_config(
        n_layers=n_layers, d_model=16, n_heads=n_heads, d_head=4, n_key_value_heads=n_kv, d_mlp=24, n_ctx=12,
        d_vocab=23, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=4,
        gated_mlp=True, final_rms=True, seed=seed))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # TransformerLens zero-initialises biases; give every weight a value
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _selected(model, comp):
    """``{parameter name: bool mask}`` of the weights ``comp`` selects (only the parameters it touches)."""
    params = dict(model.named_parameters())
    masks = {}
    for s in comp.slices:
        mask = masks.setdefault(s.param, torch.zeros(params[s.param].shape, dtype=torch.bool))
        s.view(mask).fill_(True)
    return masks


def test_gqa_query_heads_select_their_own_query_and_output_weights():
    model = _gqa_model()
    hs = r.heads(model)
    assert list(hs) == [f"{l}:{h}" for l in range(2) for h in range(4)]
    for (l, h), name in ((lh, r.head_name(*lh)) for lh in [(0, 0), (0, 3), (1, 2)]):
        masks = _selected(model, hs[name])
        assert set(masks) == {f"blocks.{l}.attn.{p}" for p in ("W_Q", "b_Q", "W_O")}
        for p, mask in masks.items():
            expect = torch.zeros_like(mask)
            expect[h] = True
            assert torch.equal(mask, expect), p
        assert hs[name].numel == 2 * 16 * 4 + 4 == sum(int(m.sum()) for m in masks.values())


def test_gqa_groups_hold_exactly_the_weights_transformer_lens_shares_among_their_heads():
    """Moving every weight of group ``l:gG`` (through the component's own slices) changes TransformerLens's
    expanded keys and values (``attn.W_K``, ``W_V``, ``b_K``, ``b_V``) and the queries and outputs of exactly
    the query heads that read that group, and no other weight of the model."""
    model = _gqa_model()
    gs = r.groups(model)
    assert list(gs) == [r.group_name(l, g) for l in range(2) for g in range(2)]
    params = dict(model.named_parameters())
    for name, comp in gs.items():
        l, g = r.parse_group_name(name)
        attn = model.blocks[l].attn
        before = {p: getattr(attn, p).detach().clone() for p in ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O")}
        untouched = {n: p.detach().clone() for n, p in params.items() if n not in comp.param_names}
        saved = {n: params[n].detach().clone() for n in comp.param_names}
        with torch.no_grad():
            for s in comp.slices:
                s.view(params[s.param]).add_(1.0)
            for p, old in before.items():
                changed = [h for h in range(4) if not torch.equal(getattr(attn, p)[h], old[h])]
                assert changed == [2 * g, 2 * g + 1], (name, p)
            for n, old in untouched.items():
                assert torch.equal(params[n], old), (name, n)
            for n, old in saved.items():
                params[n].copy_(old)
        assert comp.numel == 2 * 16 * 4 + 2 * 4 + 2 * (2 * 16 * 4 + 4) == sum(int(m.sum()) for m in
                                                                          _selected(model, comp).values())


def test_groups_need_grouped_query_attention_and_mlps_an_mlp(paper_model):
    with pytest.raises(ValueError, match="no grouped-query attention.*use heads"):
        r.groups(paper_model)
    with pytest.raises(ValueError, match="group index 2 out of range: the model has 2 key/value groups"):
        r.group(_gqa_model(), 0, 2)
    with pytest.raises(ValueError, match="no MLP parameters"):
        r.mlp(paper_model, 0)
    model = _gqa_model()
    m1 = r.mlps(model)["M1"]
    assert m1.param_names == sorted(f"blocks.1.mlp.{p}" for p in ("W_in", "b_in", "W_gate", "W_out", "b_out"))
    assert m1.numel == sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks.1.mlp."))


def test_from_params_takes_row_and_column_slices():
    model = nn.Linear(3, 5)
    c = r.from_params(model, [("weight", slice(0, 2)), ("weight", (slice(2, 5), 1)), ("bias", 4)], name="mix")
    expect = torch.zeros(5, 3, dtype=torch.bool)
    expect[:2] = True
    expect[2:, 1] = True
    masks = _selected(model, c)
    assert torch.equal(masks["weight"], expect) and masks["bias"].tolist() == [False] * 4 + [True]
    assert c.name == "mix" and c.numel == 6 + 3 + 1
    assert r.from_params(model, [("weight", (slice(None), 0))]).name == "weight[:, 0]"
    with pytest.raises(ValueError, match="overlap"):
        r.from_params(model, [("weight", slice(0, 2)), ("weight", (1, 2))])
    with pytest.raises(TypeError, match=r"a parameter name or a \(name, index\) pair"):
        r.from_params(model, [("weight", 0, 1)])
    with pytest.raises(ValueError, match="out of range"):
        r.from_params(model, [("bias", 5)])


@pytest.mark.filterwarnings("ignore::rllc_fast.SamplerWarning")  # 6 draws: R-hat is not the point here
def test_gqa_heads_and_groups_follow_the_reference_chains_on_both_paths():
    """Query heads and groups are estimated by the batched engine's structured path (its default) and its generic
    path with the reference engine's chains."""
    import numpy as np

    from rllc_fast.engine.structured import plan
    from rllc_fast.losses import next_token_loss

    model = _gqa_model(n_layers=1)
    tokens = torch.randint(0, 23, (16, 12), generator=torch.Generator().manual_seed(3))
    comps = {"0:1": r.head(model, 0, 1), "0:g1": r.group(model, 0, 1)}
    structured, generic, why = plan(model, comps, next_token_loss)
    assert structured == {"0:1": (0, 1, "query"), "0:g1": (0, 1, "group")} and generic == [] and why is None
    cfg = r.SGLDConfig(num_chains=2, num_draws=6, batch_size=4, seed=5, step_size=3e-3)
    ref = r.estimate_llc(model, tokens, cfg, components=comps, engine="reference")
    for engine in ("generic", "batched"):
        got = r.estimate_llc(model, tokens, cfg, components=comps, engine=engine)
        assert got.components == ref.components
        np.testing.assert_allclose(got.loss_trace, ref.loss_trace, rtol=1e-5, atol=1e-6)
        for name in comps:
            np.testing.assert_allclose(got[name].distance_trace, ref[name].distance_trace, rtol=1e-4, atol=1e-6)
    assert np.ptp(ref.loss_trace, axis=-1).min() > 0  # the chains moved

"""Components: heads of TransformerLens models, layers, whole models, from_params."""
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

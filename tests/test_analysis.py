"""The analysis suite against ground truth: a hand-built 2-layer attention-only model whose heads are set to
attend to the previous token, to the current token, to induct, and to the first token; composition scores
against the dense definition; the tokens-in-context classifier on hand-written examples; clustering on
planted groups of curves."""
import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from rllc_fast.analysis import (ablation_scores, classify_heads, classify_tokens_in_context, cluster_curves,
                                composition_scores, current_token_scores, icl_score, induction_scores, path_patch,
                                pattern_summary, per_head_icl_scores, per_token_loss_increase, prefix_matching_scores,
                                previous_token_scores, score_heads)
from rllc_fast.analysis.clustering import sbd
from rllc_fast.analysis.composition import dense_composition_score
from rllc_fast.analysis.head_scores import repeated_random_tokens
from rllc_fast.models import attn_only

V, T, SHARP = 40, 32, 40.0


def hand_built_model() -> HookedTransformer:
    """Residual stream = [token one-hot (V) | previous token one-hot (V) | copied token (V) | position one-hot (T)].
    0:0 attends to the previous position and writes its token into the "previous" block; 0:1 attends to the
    current position and writes nothing; 1:0 attends where the previous token equals the current token
    (induction) and writes the attended token into the "copied" block, which alone is unembedded; 1:1
    attends to position 0 and writes nothing."""
    d_model, d_head = 3 * V + T, max(V, T)
    cfg = HookedTransformerConfig(n_layers=2, d_model=d_model, n_ctx=T, d_head=d_head, n_heads=2, d_vocab=V,
                                  attn_only=True, normalization_type=None, positional_embedding_type="standard",
                                  use_attn_scale=False, seed=0)
    model = HookedTransformer(cfg)
    tok, prev, copy, pos = 0, V, 2 * V, 3 * V
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.W_E[torch.arange(V), tok + torch.arange(V)] = 1.0
        model.pos_embed.W_pos[torch.arange(T), pos + torch.arange(T)] = 1.0
        a0, a1 = model.blocks[0].attn, model.blocks[1].attn
        for i in range(T):
            a0.W_Q[0, pos + i, i] = SHARP  # 0:0 query "I am at i" meets key "I am at i-1"
            if i + 1 < T:
                a0.W_K[0, pos + i, i + 1] = 1.0
            a0.W_Q[1, pos + i, i] = SHARP  # 0:1: current position
            a0.W_K[1, pos + i, i] = 1.0
        for v in range(V):
            a0.W_V[0, tok + v, v] = 1.0
            a0.W_O[0, v, prev + v] = 1.0
            a1.W_Q[0, tok + v, v] = SHARP  # 1:0 query "my token is v" meets key "my previous token is v"
            a1.W_K[0, prev + v, v] = 1.0
            a1.W_V[0, tok + v, v] = 1.0
            a1.W_O[0, v, copy + v] = 1.0
            model.unembed.W_U[copy + v, v] = 10.0
        a1.b_Q[1, 0] = SHARP  # 1:1: every query meets the key of position 0
        a1.W_K[1, pos + 0, 0] = 1.0
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return hand_built_model()


def random_tokens(n=16, seed=0):
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


def test_scores_are_one_where_set_and_zero_elsewhere(model):
    tokens = random_tokens()
    prev, cur = previous_token_scores(model, tokens), current_token_scores(model, tokens)
    ind = induction_scores(model, length=T // 2, num=16)
    # repeated spans of distinct tokens: 1:0 attends only to the token after the earlier copy (except at the
    # second copy's first token, which also matches position 0, whose "previous token" is itself)
    g = torch.Generator().manual_seed(1)
    span = torch.stack([torch.randperm(V, generator=g)[: T // 2] for _ in range(16)])
    prefix = prefix_matching_scores(model, torch.cat([span, span], 1))
    assert prev[0, 0] > 0.99 and cur[0, 1] > 0.99
    assert prefix[1, 0] > 0.95
    assert ind[1, 0] > 0.7  # random spans repeat some tokens, which splits the attention
    assert prev[0, 1] < 0.01 and cur[0, 0] < 0.05  # 0:0 can only attend to itself at position 0
    for l, h in [(0, 0), (0, 1), (1, 1)]:
        assert ind[l, h] < 0.1 and prefix[l, h] < 0.1
    assert prev[1, 1] < 0.1 and cur[1, 1] < 0.1  # the first-token head only hits these by chance
    labels = classify_heads(score_heads(model, tokens, length=T // 2, num=16))
    assert labels == {"0:0": "previous-token", "0:1": "current-token", "1:0": "induction", "1:1": "multigram"}
    # thresholds are arguments: with an impossible induction threshold 1:0 is not an induction head
    assert classify_heads(score_heads(model, tokens, length=T // 2, num=16), induction=1.0)["1:0"] == "multigram"


def test_classify_heads_rejects_bad_thresholds_and_missing_scores(model):
    scores = score_heads(model, random_tokens(), length=8, num=4)
    with pytest.raises(ValueError, match="previous_token=1.5"):
        classify_heads(scores, previous_token=1.5)
    with pytest.raises(ValueError, match="lack"):
        classify_heads({"previous_token": scores["previous_token"]})


def test_composition_scores_match_the_dense_definition():
    model = attn_only(seed=3, n_layers=3, d_model=24, n_heads=3, d_head=8, n_ctx=16, d_vocab=30)
    scores = composition_scores(model)
    for kind in ("Q", "K", "V"):
        s = scores[kind]
        assert s.shape == (3, 3, 3, 3)
        for l1 in range(3):
            for l2 in range(3):
                for h1 in range(3):
                    for h2 in range(3):
                        if l1 >= l2:
                            assert torch.isnan(s[l1, h1, l2, h2])
                        else:
                            dense = dense_composition_score(model, kind, f"{l1}:{h1}", f"{l2}:{h2}")
                            assert s[l1, h1, l2, h2].item() == pytest.approx(dense, rel=1e-5)


def test_composition_of_the_induction_circuit_is_k_composition(model):
    s = composition_scores(model)
    # 1:0's key reads what 0:0 writes (previous token); its query and value read the token block, which 0:0 leaves
    assert s["K"][0, 0, 1, 0] > 0.1
    assert s["Q"][0, 0, 1, 0] == pytest.approx(0.0, abs=1e-6)
    assert s["V"][0, 0, 1, 0] == pytest.approx(0.0, abs=1e-6)


def test_ablating_a_head_that_writes_nothing_changes_nothing(model):
    tokens = repeated_random_tokens(8, T // 2, V)
    for kind in ("zero", "mean", "resample"):
        scores = ablation_scores(model, tokens, ["0:1", "1:1"], kind)
        assert scores["0:1"] == pytest.approx(0.0, abs=1e-6) and scores["1:1"] == pytest.approx(0.0, abs=1e-6)
    # the induction circuit's heads matter, on the repeated copy
    scores = ablation_scores(model, tokens, kind="mean")
    assert scores["0:0"] > 0.2 and scores["1:0"] > 0.2
    together = ablation_scores(model, tokens, ["0:1", "1:1"], "mean", together=True)
    assert list(together) == ["0:1+1:1"] and together["0:1+1:1"] == pytest.approx(0.0, abs=1e-6)


def test_mean_ablation_of_a_constant_head_changes_nothing():
    # a head whose value weights are zero writes the same vector (its biases) everywhere: its mean is itself
    model = attn_only(seed=1, n_layers=2, d_model=16, n_heads=2, d_head=8, n_ctx=16, d_vocab=30)
    with torch.no_grad():
        model.blocks[0].attn.W_V[1].zero_()
        model.blocks[0].attn.b_V[1].normal_()
    tokens = torch.randint(0, 30, (8, 16), generator=torch.Generator().manual_seed(0))
    assert ablation_scores(model, tokens, ["0:1"], "mean")["0:1"] == pytest.approx(0.0, abs=1e-5)
    assert abs(ablation_scores(model, tokens, ["0:1"], "zero")["0:1"]) > 1e-4  # zero ablation does change it


def test_path_patching_isolates_the_path_through_the_receiver(model):
    tokens = repeated_random_tokens(8, T // 2, V)
    full = ablation_scores(model, tokens, ["0:0"], "mean")["0:0"]
    via_induction = path_patch(model, tokens, ["0:0"], "1:0", "mean")
    via_first_token = path_patch(model, tokens, ["0:0"], "1:1", "mean")
    assert via_induction == pytest.approx(full, rel=1e-4)  # 0:0 matters only through 1:0
    assert via_first_token == pytest.approx(0.0, abs=1e-6)
    # zero-ablating 0:0 on spans of distinct tokens: 1:0 finds no match anywhere, as on a first copy, so the
    # loss rises on the second copy only
    g = torch.Generator().manual_seed(2)
    span = torch.stack([torch.randperm(V, generator=g)[: T // 2] for _ in range(8)])
    per_token = path_patch(model, torch.cat([span, span], 1), ["0:0"], "1:0", "zero", per_token=True)
    assert per_token.shape == (8, T - 1)
    assert per_token[:, T // 2:].min() > 1.0
    assert per_token[:, 1: T // 2 - 1].abs().max() < 1e-5
    with pytest.raises(ValueError, match="earlier layer"):
        path_patch(model, tokens, ["1:1"], "1:0")


def test_icl_score_drops_with_induction_and_vanishes_when_a_circuit_head_is_ablated(model):
    tokens = repeated_random_tokens(16, T // 2, V)
    clean = icl_score(model, tokens, early=4, late=T - 4)
    assert clean < -2.0  # the second copy is predicted far better than the first
    per_head = per_head_icl_scores(model, tokens, early=4, late=T - 4)
    assert per_head["none"] == pytest.approx(clean)
    assert per_head["0:1"] == pytest.approx(clean, abs=1e-5) and per_head["1:1"] == pytest.approx(clean, abs=1e-5)
    assert per_head["0:0"] > clean + 2.0 and per_head["1:0"] > clean + 2.0
    with pytest.raises(ValueError, match="early < late"):
        icl_score(model, tokens, early=10, late=5)


def test_bad_head_names_are_refused_with_the_range(model):
    tokens = random_tokens(4)
    with pytest.raises(ValueError, match=r"head 2:0 is out of range.*layers 0..1"):
        ablation_scores(model, tokens, ["2:0"])
    with pytest.raises(ValueError, match=r"heads 0..1"):
        per_token_loss_increase(model, tokens, [(0, 5)])
    with pytest.raises(ValueError, match="layer:head"):
        ablation_scores(model, tokens, ["zero"])
    with pytest.raises(ValueError, match="choose from"):
        ablation_scores(model, tokens, ["0:0"], kind="half")


BRACKETS = {0: 1, 2: 3}


def _label(row, t, a, **kw):
    tokens = torch.tensor([row])
    (item,) = classify_tokens_in_context(tokens, [(0, t)], [a], brackets=BRACKETS, **kw)
    return item


def test_token_classifier_labels_each_pattern():
    # induction: [A][B] ... [A] -> [B], attending to the first [B], to the second [A], or (in-context trigram)
    # to the token before the second [A]
    assert _label([5, 6, 9, 5, 6], t=3, a=1).label == "induction"
    assert _label([5, 6, 9, 5, 6], t=3, a=3).label == "induction"
    assert _label([4, 5, 6, 4, 5, 6], t=4, a=3).label == "induction"
    assert _label([5, 6, 9, 5, 6], t=3, a=2).label != "induction"  # attends elsewhere
    # Dyck: the next token closes an earlier bracket and the span between is validly nested
    item = _label([9, 0, 2, 9, 3, 9, 1], t=5, a=1)
    assert item.label == "dyck" and item.pattern == (0, 1)
    assert _label([9, 0, 2, 0, 1, 3, 9, 1], t=6, a=0).label == "dyck"
    # skip n-gram from the given list: [11] ... [12] -> [13]
    item = _label([11, 9, 8, 12, 13], t=3, a=0, skip_ngrams=[(11, 12, 13)])
    assert item.label == "skip-ngram" and item.pattern == (11, 12, 13)
    assert _label([9, 9, 8, 12, 13], t=3, a=0, skip_ngrams=[(11, 12, 13)]).label != "skip-ngram"
    # induction is tried before Dyck
    assert _label([9, 0, 5, 1, 9, 0, 5, 1], t=6, a=3).label == "induction"


def test_token_classifier_accepts_nested_brackets_only_when_nesting_is_valid():
    assert _label([9, 0, 2, 9, 9, 1], t=4, a=0).label != "dyck"  # 2 is still open inside (0 ... 1)
    assert _label([0, 2, 1, 9, 3], t=3, a=0).label != "dyck"  # crossed: ( [ ) ]
    assert _label([9, 9, 9, 1], t=2, a=0).label != "dyck"  # closes a bracket never opened
    assert _label([0, 2, 3, 9, 1], t=3, a=0).label == "dyck"


def test_ngrams_need_two_occurrences_and_are_counted_once():
    tokens = torch.tensor([[20, 21, 22, 30, 31], [40, 20, 21, 22, 33], [50, 51, 52, 53, 54]])
    positions, attention = [(0, 1), (1, 2), (2, 3)], [0, 1, 2]
    items = classify_tokens_in_context(tokens, positions, attention)
    assert [i.label for i in items] == ["ngram", "ngram", "unexplained"]
    assert items[0].pattern == (20, 21, 22)
    summary = pattern_summary(items)
    assert summary["percent"]["ngram"] == pytest.approx(200 / 3) and summary["unique_multigrams"] == 1
    with pytest.raises(ValueError, match="max_attention"):
        classify_tokens_in_context(tokens, [(0, 1)], [3])


def _planted(seed=0, scale_offset=False):
    """12 curves in 3 shape groups (rise, fall, bump) over 30 checkpoints, with noise."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, 30)
    shapes = [1 / (1 + np.exp(-12 * (x - 0.5))), np.exp(-4 * x), np.exp(-((x - 0.4) ** 2) / 0.02)]
    curves, truth = {}, {}
    for i in range(12):
        g = i % 3
        y = shapes[g] + rng.normal(0, 0.03, x.size)
        if scale_offset:
            y = rng.uniform(0.5, 5) * y + rng.uniform(-3, 3)
        curves[f"{i // 6}:{i % 6}"] = y
        truth[f"{i // 6}:{i % 6}"] = g
    return curves, truth


def _same_partition(a: dict, b: dict) -> bool:
    from sklearn.metrics import adjusted_rand_score

    names = sorted(a)
    return adjusted_rand_score([a[n] for n in names], [b[n] for n in names]) == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["kmeans", "dtw", "ward", "sbd"])
def test_clustering_recovers_planted_groups_and_labels_another_run(method):
    curves, truth = _planted(0)
    fit = cluster_curves(curves, 3, method, seed=0)
    assert _same_partition(fit.labels, truth), fit.labels
    assert set(fit.scores) == {"silhouette", "calinski_harabasz", "davies_bouldin"}
    assert fit.scores["silhouette"] > 0.5
    other, other_truth = _planted(1)
    assert _same_partition(fit.predict(other), other_truth)
    colours = fit.colours()
    assert set(colours) == set(curves) and len(set(colours.values())) == len(curves)


def test_shape_based_distance_ignores_scale_and_offset():
    x = np.sin(np.linspace(0, 3, 25))
    assert sbd(x, 3.0 * x + 5.0) == pytest.approx(0.0, abs=1e-9)
    assert sbd(x, -x) > 0.5
    curves, truth = _planted(2, scale_offset=True)
    assert _same_partition(cluster_curves(curves, 3, "sbd").labels, truth)


def test_clustering_concatenates_curve_sets_and_refuses_bad_input():
    a, truth = _planted(0)
    b = {h: -y for h, y in a.items()}
    fit = cluster_curves([a, b], 3, "kmeans")
    assert fit.lengths == [30, 30] and _same_partition(fit.labels, truth)
    with pytest.raises(ValueError, match="n_clusters=13 but only 12 heads"):
        cluster_curves(a, 13)
    uneven = dict(a)
    uneven["0:0"] = uneven["0:0"][:20]
    with pytest.raises(ValueError, match="unequal length.*resample"):
        cluster_curves(uneven, 3)
    assert len(cluster_curves(uneven, 3, resample=True).labels) == 12
    broken = dict(a)
    broken["1:2"] = np.full(30, np.nan)
    with pytest.raises(ValueError, match="1:2 holds NaN"):
        cluster_curves(broken, 3)
    with pytest.raises(ValueError, match="choose from"):
        cluster_curves(a, 3, "spectral")

"""The synthetic sources have the structure they claim; head scores read the right attention entries."""
import torch

from rllc_fast.analysis import head_scores
from rllc_fast.data.synthetic import BRACKETS, SOURCES, WORDS, synthetic_mixture, synthetic_source
from rllc_fast.models import attn_only


def test_sources_are_deterministic_and_in_vocabulary():
    for name in SOURCES:
        a = synthetic_source(name, 16, 48, seed=3)
        assert a.shape == (16, 48) and a.dtype == torch.long
        assert torch.equal(a, synthetic_source(name, 16, 48, seed=3))
        assert not torch.equal(a, synthetic_source(name, 16, 48, seed=4))
        assert 0 <= a.min() and a.max() < 128
    mix = synthetic_mixture(100, 32, seed=0)
    assert mix.shape == (100, 32) and torch.equal(mix, synthetic_mixture(100, 32, seed=0))


def test_dyck_closing_brackets_match_the_innermost_open_one():
    for row in synthetic_source("dyck", 32, 64, seed=0).tolist():
        stack = []
        for tok in row:
            if tok < 2 * BRACKETS and tok % 2 == 0:
                stack.append(tok)
            elif tok < 2 * BRACKETS:
                assert stack and stack.pop() == tok - 1


def test_induction_rows_repeat_their_spans():
    rows = synthetic_source("induction", 32, 64, seed=0)
    assert rows.min() >= WORDS[0]
    # a token that follows a repeated token is, most of the time, the token that followed it before
    hits = total = 0
    for row in rows.tolist():
        seen = {}
        for t in range(len(row) - 1):
            if row[t] in seen:
                total += 1
                hits += row[t + 1] == seen[row[t]]
            seen[row[t]] = row[t + 1]
    assert hits / total > 0.6  # chance level is about 1/104


def test_scores_read_previous_token_and_induction_positions(monkeypatch):
    model = attn_only(n_layers=2, d_model=16, n_heads=2, d_head=8, n_ctx=32, d_vocab=50)
    L = 8

    def fake_patterns(_model, tokens):
        n, T = tokens.shape
        p = torch.zeros(2, n, 2, T, T)
        p[..., 0, 0] = 1.0
        for i in range(1, T):
            p[0, :, 1, i, i - 1] = 1.0  # layer 0 head 1: previous token
            p[1, :, 0, i, 0] = 1.0  # layer 1 head 0: first token
            p[1, :, 1, i, i - L + 1 if i >= L else 0] = 1.0  # layer 1 head 1: induction
        return p

    monkeypatch.setattr(head_scores, "attention_patterns", fake_patterns)
    prev = head_scores.previous_token_scores(model, torch.zeros(3, 2 * L, dtype=torch.long))
    torch.testing.assert_close(prev[0, 1], torch.tensor(1.0))
    assert prev[1, 1] < 0.2 and prev[1, 0] < 0.2
    ind = head_scores.induction_scores(model, length=L, num=4)
    torch.testing.assert_close(ind[1, 1], torch.tensor(1.0))
    assert ind[0, 1] == 0 and ind[1, 0] == 0
    monkeypatch.undo()
    real = head_scores.induction_scores(model, length=L, num=4)
    assert real.shape == (2, 2) and ((0 <= real) & (real <= 1)).all()


def test_code_rows_reuse_identifiers_and_repeat_lines():
    rows = synthetic_source("code", 64, 48, seed=0)
    assert ((rows < 2) | (rows >= WORDS[0])).all()  # only the ( ) bracket pair and words
    # the token after a word that was seen before is, most of the time, the token that followed it then
    hits = total = 0
    for row in rows.tolist():
        seen = {}
        for t in range(len(row) - 1):
            if row[t] >= WORDS[0] and row[t] in seen:
                total += 1
                hits += row[t + 1] == seen[row[t]]
            seen[row[t]] = row[t + 1]
    assert hits / total > 0.7


def test_repeated_token_losses_split_the_two_copies():
    model = attn_only(n_layers=1, d_model=16, n_heads=2, d_head=8, n_ctx=32, d_vocab=50)
    first, repeat = head_scores.repeated_token_losses(model, length=8, num=4, seed=1)
    tokens = head_scores.repeated_random_tokens(4, 8, 50, seed=1)
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(tokens)[:, :-1].reshape(-1, 50), tokens[:, 1:].reshape(-1),
                                                reduction="none").view(4, 15)
    assert abs(first - nll[:, :7].mean().item()) < 1e-5
    assert abs(repeat - nll[:, 8:].mean().item()) < 1e-5

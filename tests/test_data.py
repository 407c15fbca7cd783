"""Offline corpora, the BPE tokenizer, token files, and data that does not fit the model."""
import numpy as np
import pytest
import torch

from rllc_fast import SGLDConfig, estimate_llc
from rllc_fast.data import (
    corpus_tokens,
    data_from_spec,
    load_tokens,
    stdlib_code,
    stdlib_prose,
    train_tokenizer,
    windows,
)
from rllc_fast.models import attn_only


@pytest.fixture(scope="module")
def texts():
    return stdlib_code(max_bytes=400_000), stdlib_prose(max_bytes=150_000)


def test_corpora_build_offline_and_differ(texts):
    code, prose = texts
    assert len(code) > 5 and sum(map(len, code)) > 200_000
    assert len(prose) > 20 and sum(map(len, prose)) > 100_000
    code_text, prose_text = "\n".join(code), "\n".join(prose)
    assert code_text.count("def ") > 100 and code_text.count("import ") > 20
    # prose is docstrings and comments: English words, almost no Python syntax
    assert prose_text.count(" the ") > 500
    assert prose_text.count("def ") < code_text.count("def ") / 20
    assert stdlib_code(max_bytes=400_000) == code  # deterministic


def test_tokenizer_round_trips_text(texts):
    code, prose = texts
    tok = train_tokenizer(code[:20] + prose[:200], vocab_size=600)
    assert tok.get_vocab_size() == 600
    for text in ["def f(x):\n    return x ** 2  # squared\n", "Return the naïve “quoted” value ☃.", prose[3], "\t\r\n  "]:
        ids = tok.encode(text).ids
        assert max(ids) < 600
        assert tok.decode(ids) == text
    # merges were learnt: code compresses below one token per byte
    assert len(tok.encode(code[0]).ids) < 0.6 * len(code[0].encode())
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["x"], vocab_size=100)


def test_token_files_all_formats(tmp_path, texts):
    stream = np.arange(1000, dtype=np.int64) % 300
    np.save(tmp_path / "s.npy", stream)
    torch.save(torch.from_numpy(stream.reshape(10, 100)), tmp_path / "rows.pt")
    stream.astype(np.uint16).tofile(tmp_path / "s.bin")
    a = load_tokens(tmp_path / "s.npy", 50)
    b = load_tokens(tmp_path / "s.bin", 50)
    assert a.shape == (20, 50) and a.dtype == torch.long
    assert torch.equal(a, b) and torch.equal(a.reshape(-1), torch.from_numpy(stream))
    rows = load_tokens(tmp_path / "rows.pt", 64, num_contexts=4, seed=1)
    assert rows.shape == (4, 64) and torch.equal(rows[:, 1] - rows[:, 0], torch.ones(4, dtype=torch.long))
    picked = load_tokens(tmp_path / "s.npy", 50, num_contexts=7, seed=3)
    assert picked.shape == (7, 50) and torch.equal(picked, load_tokens(tmp_path / "s.npy", 50, num_contexts=7, seed=3))
    (tmp_path / "t.txt").write_text(texts[1][0] * 5)
    tok = train_tokenizer(texts[1][:50], vocab_size=400)
    assert load_tokens(tmp_path / "t.txt", 16, tokenizer=tok).max() < 400
    with pytest.raises(ValueError, match="needs a tokenizer"):
        load_tokens(tmp_path / "t.txt", 16)
    with pytest.raises(ValueError, match="fewer than context_length"):
        load_tokens(tmp_path / "rows.pt", 101)
    np.save(tmp_path / "f.npy", stream.astype(np.float32))
    with pytest.raises(ValueError, match="integers"):
        load_tokens(tmp_path / "f.npy", 10)
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_tokens(tmp_path / "missing.npy", 10)
    with pytest.raises(FileNotFoundError, match="neither a built-in corpus"):
        data_from_spec("stdlib_kode", 10, 4)


def test_corpus_tokens_bytes_or_bpe(texts):
    as_bytes = corpus_tokens("stdlib_code", 32, 16, max_bytes=100_000)
    assert as_bytes.shape == (16, 32) and as_bytes.max() < 256
    assert bytes(as_bytes[0].tolist()).decode("utf-8", "ignore")  # real text
    tok = train_tokenizer(texts[1][:100], vocab_size=500)
    bpe = corpus_tokens("stdlib_prose", 32, 16, tokenizer=tok, max_bytes=100_000)
    assert bpe.shape == (16, 32) and bpe.max() < 500
    with pytest.raises(ValueError, match="fewer than one context"):
        windows(torch.arange(5), 8)


def test_token_beyond_vocabulary_and_long_context_are_named():
    model = attn_only(n_layers=1, d_model=16, n_heads=2, n_ctx=8, d_vocab=20)
    config = SGLDConfig(num_draws=2, batch_size=2)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 20\).*found .*25"):
        estimate_llc(model, torch.full((4, 8), 25), config)
    with pytest.raises(ValueError, match="contexts have 12 tokens but the model's n_ctx is 8"):
        estimate_llc(model, torch.zeros(4, 12, dtype=torch.long), config)


def test_raw_token_files_take_a_dtype_and_refuse_a_wrong_size(tmp_path):
    stream = (np.arange(4000, dtype=np.int64) * 37) % 70_000  # ids beyond uint16
    for dtype in ("int32", "uint32", "int64"):
        stream.astype(dtype).tofile(tmp_path / f"{dtype}.bin")
        assert torch.equal(load_tokens(tmp_path / f"{dtype}.bin", 50, dtype=dtype).reshape(-1), torch.from_numpy(stream))
    small = stream % 60_000
    small.astype(np.int32).tofile(tmp_path / "small32.bin")
    with pytest.warns(UserWarning, match=r"small32\.bin.*--dtype int32"):
        as_uint16 = load_tokens(tmp_path / "small32.bin", 50)  # every other id 0: read as the default uint16
    assert torch.equal(as_uint16.reshape(-1)[::2], torch.from_numpy(small))
    small.astype(np.int64).tofile(tmp_path / "small64.bin")
    with pytest.warns(UserWarning, match="--dtype int64"):
        load_tokens(tmp_path / "small64.bin", 50)
    with pytest.warns(UserWarning, match="--dtype int64"):
        load_tokens(tmp_path / "small64.bin", 50, dtype="int32")
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00" * 51)  # 102 bytes: uint16 fine, int32 not
    assert load_tokens(tmp_path / "odd.bin", 10).shape == (5, 10)
    with pytest.raises(ValueError, match=r"odd\.bin: 102 bytes is not a multiple of the 4-byte int32 .*--dtype"):
        load_tokens(tmp_path / "odd.bin", 10, dtype="int32")
    with pytest.raises(ValueError, match=r"dtype \(--dtype\) 'float32'"):
        data_from_spec(str(tmp_path / "odd.bin"), 10, None, dtype="float32")


@pytest.mark.parametrize("spec", ["synthetic:mixture", "stdlib_code", "FILE"])
@pytest.mark.parametrize("num_contexts", [0, -3])
def test_num_contexts_below_one_is_refused(tmp_path, spec, num_contexts):
    if spec == "FILE":
        spec = str(tmp_path / "s.npy")
        np.save(spec, np.arange(100))
    with pytest.raises(ValueError, match=r"--num-contexts.*>= 1, got " + str(num_contexts)):
        data_from_spec(spec, 8, num_contexts)
    assert data_from_spec(spec, 8, None).shape[1] == 8


def test_dtype_and_num_contexts_flags_reach_the_token_loader(tmp_path, capsys):
    from rllc_fast.cli import main
    from rllc_fast.models import save_checkpoint

    save_checkpoint(attn_only(n_layers=1, d_model=16, n_heads=2, n_ctx=8, d_vocab=20), tmp_path / "ck" / "step1.pt", 1)
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00" * 51)
    common = ["--checkpoints", str(tmp_path / "ck"), "--data", str(tmp_path / "odd.bin"), "--store",
              str(tmp_path / "s.sqlite"), "--context", "8"]
    for argv in (["sweep", *common, "--dtype", "int32", "--quiet"], ["analyze", "scores", *common, "--dtype", "int32"]):
        with pytest.raises(SystemExit, match=r"odd\.bin: 102 bytes .* int32 .*--dtype"):
            main(argv)
    with pytest.raises(SystemExit):  # argparse: usage error on stderr, exit status 2
        main(["sweep", *common, "--num-contexts", "0", "--quiet"])
    assert "--num-contexts: expected an integer >= 1, got 0" in capsys.readouterr().err


def test_a_list_of_token_batches_is_taken_in_order():
    from rllc_fast.data import BatchSchedule

    tokens = torch.randint(0, 20, (12, 8), generator=torch.Generator().manual_seed(0))
    batches = list(tokens.split(4))  # equal shapes: once misread as three columns of one row set
    schedule = BatchSchedule(batches, None, 5, seed=0)
    assert all(torch.equal(schedule[t], batches[t % 3]) for t in range(5))
    model = attn_only(n_layers=1, d_model=16, n_heads=2, n_ctx=8, d_vocab=20)
    config = SGLDConfig(num_chains=1, num_draws=3, num_burnin=0, step_size=1e-4)
    assert estimate_llc(model, batches, config).estimates["whole"].llc_per_chain.shape == (1,)
    x, y = torch.randn(6, 3), torch.randn(6)
    with pytest.raises(ValueError, match="read as a list of batches.*as a tuple"):
        BatchSchedule([x, y], 2, 3, seed=0)
    with pytest.raises(ValueError, match="empty list"):
        BatchSchedule([], 2, 3, seed=0)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_unsigned_npy_and_pt_token_files_are_read(tmp_path, dtype):
    from rllc_fast.data import load_tokens

    ids = np.arange(40, dtype=dtype).reshape(4, 10)
    np.save(tmp_path / "t.npy", ids)
    torch.save(torch.from_numpy(ids), tmp_path / "t.pt")
    for name in ("t.npy", "t.pt"):
        tokens = load_tokens(tmp_path / name, 8)
        assert tokens.dtype == torch.int64 and tokens.tolist() == ids[:, :8].astype(np.int64).tolist()

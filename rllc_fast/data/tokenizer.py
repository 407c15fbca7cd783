"""Byte-level BPE tokenizers (Hugging Face ``tokenizers``), trained offline, e.g. the paper's 5k vocabulary."""
from __future__ import annotations

import os
from typing import Iterable, List

import torch


def train_tokenizer(texts: Iterable[str], vocab_size: int = 5000, min_frequency: int = 2):
    """A byte-level BPE ``tokenizers.Tokenizer`` with ``vocab_size`` ids, trained on ``texts``.

    Every byte is in the vocabulary, so any text encodes and ``decode(encode(text)) == text``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | os.PathLike):
    """A ``tokenizers.Tokenizer`` from its JSON file (``tokenizer.json``); clear error when missing."""
    from tokenizers import Tokenizer

    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file {path} does not exist (argument: tokenizer); pass a tokenizers JSON file")
    return Tokenizer.from_file(str(path))


def encode_stream(tokenizer, texts: Iterable[str], separator: str = "\n") -> torch.Tensor:
    """All ``texts`` encoded and joined into one 1-D int64 token stream."""
    ids: List[int] = []
    sep = tokenizer.encode(separator).ids if separator else []
    for enc in tokenizer.encode_batch(list(texts)):
        ids.extend(enc.ids)
        ids.extend(sep)
    return torch.tensor(ids, dtype=torch.long)

"""Data for LLC estimation: token datasets from files, built-in offline corpora, tokenizers, minibatch
schedules and model-as-distribution data."""
from .corpora import CORPORA, stdlib_code, stdlib_prose
from .model_distribution import ModelDistribution
from .schedule import BatchSchedule
from .tokenizer import encode_stream, load_tokenizer, train_tokenizer
from .tokens import RAW_DTYPES, corpus_tokens, data_from_spec, load_tokens, read_raw_tokens, windows

__all__ = [
    "CORPORA",
    "BatchSchedule",
    "ModelDistribution",
    "RAW_DTYPES",
    "corpus_tokens",
    "data_from_spec",
    "encode_stream",
    "load_tokenizer",
    "load_tokens",
    "read_raw_tokens",
    "stdlib_code",
    "stdlib_prose",
    "train_tokenizer",
    "windows",
]

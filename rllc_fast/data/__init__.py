"""Data for LLC estimation: token datasets from files, built-in offline corpora, tokenizers, the
classification of data arguments (``normalise_data``), minibatch schedules and model-as-distribution data."""
from .corpora import CORPORA, stdlib_code, stdlib_prose
from .model_distribution import ModelDistribution
from .normalise import NormalisedData, normalise_data, row_data
from .schedule import BatchSchedule, batch_to
from .tokenizer import encode_stream, load_tokenizer, train_tokenizer
from .tokens import RAW_DTYPES, corpus_tokens, data_from_spec, load_tokens, read_raw_tokens, windows

__all__ = [
    "CORPORA",
    "BatchSchedule",
    "batch_to",
    "ModelDistribution",
    "NormalisedData",
    "RAW_DTYPES",
    "corpus_tokens",
    "data_from_spec",
    "encode_stream",
    "load_tokenizer",
    "load_tokens",
    "normalise_data",
    "read_raw_tokens",
    "row_data",
    "stdlib_code",
    "stdlib_prose",
    "train_tokenizer",
    "windows",
]

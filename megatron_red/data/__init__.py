"""Datasets and tokenizers: OpenR1-Math-style prompt/trace/answer files, the built-in synthetic task, and the
`Tokenizer` interface shared by training, rollout and evaluation."""
from megatron_red.data.builtin import BuiltinProblem, BuiltinTask, BuiltinTaskConfig, grade
from megatron_red.data.openr1 import LoadStats, RedExample, load_openr1, read_rows, write_openr1
from megatron_red.data.stream import PromptStream
from megatron_red.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_sentencepiece,
)

__all__ = [
    "BuiltinProblem", "BuiltinTask", "BuiltinTaskConfig", "grade",
    "LoadStats", "RedExample", "load_openr1", "read_rows", "write_openr1",
    "PromptStream",
    "HFTokenizer", "SentencePieceTokenizer", "Tokenizer", "load_tokenizer", "train_sentencepiece",
]

"""Tokenizers behind one small interface used by the trainer, the rollout engines and evaluation.

`Tokenizer` is what the rest of the system may call: `encode` (never adds special tokens: the data layer
appends EOS itself where a trace ends), `decode`, the special ids, `vocab_size`, `render_prompt` (the prompt
template, so a prompt looks the same at training, rollout and evaluation time), `save` and `fingerprint` (what the
tokenised-data cache is keyed by).

Two implementations:
- `HFTokenizer` wraps a transformers tokenizer (real students such as Qwen2.5-Math) and uses its chat template.
- `SentencePieceTokenizer` is trained locally (`train_sentencepiece`) for the tiny built-in task: BPE with digits
  split into single tokens (so a small model does arithmetic digit by digit) and byte fallback.
`load_tokenizer(dir)` reloads either from what `save(dir)` wrote.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from abc import ABC, abstractmethod
from typing import Iterable, Sequence

# Written by `save` next to the tokenizer files so that `load_tokenizer` knows which class to rebuild.
META_FILE = "megatron_red_tokenizer.json"
SPM_MODEL_FILE = "spm.model"

Messages = list[dict[str, str]]
TEMPLATES = ("chat-think", "chat", "plain")


def plain_prompt(messages: Messages) -> str:
    """The template-free prompt: system text (if any), a blank line, then "Question: ...\\nAnswer:"."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    user = "\n\n".join(m["content"] for m in messages if m["role"] == "user")
    body = f"Question: {user}\nAnswer:"
    return f"{system}\n\n{body}" if system else body


def as_messages(problem: str | Messages, system_prompt: str | None) -> Messages:
    """A bare problem becomes [system?, user]; a message list is used as given (its own system prompt wins)."""
    if isinstance(problem, str):
        messages = [{"role": "user", "content": problem}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return messages
    if not isinstance(problem, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in problem
    ):
        raise ValueError("render_prompt expects a string or a list of {'role': str, 'content': str} messages")
    return problem


class Tokenizer(ABC):
    """The tokenizer interface of megatron_red."""

    eos_token_id: int
    pad_token_id: int
    bos_token_id: int | None

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (a model's embedding table must be at least this big)."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS or any other special token added."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over many texts; implementations override it where a batched call is faster."""
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens (pad/eos/bos) are dropped unless skip_special_tokens=False."""

    @abstractmethod
    def render_prompt(self, problem: str | Messages) -> str:
        """The prompt text the policy continues: a problem string or a list of chat messages, templated."""

    @abstractmethod
    def save(self, directory: str) -> None:
        """Write the tokenizer so that `load_tokenizer(directory)` rebuilds an identical one."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A hash that changes whenever `encode`, `render_prompt` or the special ids could give something else."""


def _sha256(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


class HFTokenizer(Tokenizer):
    """A transformers tokenizer with megatron_red's prompt templates.

    template:
      "chat-think": the tokenizer's chat template with add_generation_prompt=True, followed by "<think>\\n" when
                    the template does not already end with it (a 1.5B student needs the nudge to start reasoning);
      "chat":       the chat template alone;
      "plain":      `plain_prompt` ("Question: ...\\nAnswer:"), also the fallback when the tokenizer has no chat
                    template.
    system_prompt: used when `render_prompt` gets a bare problem string; a message list keeps its own.
    vocab_size is len(tokenizer) (base vocabulary plus added tokens); model embedding tables are often padded
    beyond it.
    """

    def __init__(self, path_or_tokenizer, system_prompt: str | None = None, template: str = "chat-think"):
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
        if isinstance(path_or_tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            path_or_tokenizer = AutoTokenizer.from_pretrained(str(path_or_tokenizer))
        self.hf = path_or_tokenizer
        self.system_prompt = system_prompt
        self.template = template
        if self.hf.eos_token_id is None:
            raise ValueError("the Hugging Face tokenizer has no eos_token_id; RED needs one to end responses")
        self.eos_token_id = int(self.hf.eos_token_id)
        # Padding is masked out everywhere, so EOS serves when the tokenizer defines no pad token.
        self.pad_token_id = int(self.hf.pad_token_id) if self.hf.pad_token_id is not None else self.eos_token_id
        self.bos_token_id = int(self.hf.bos_token_id) if self.hf.bos_token_id is not None else None

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(ids) for ids in self.hf(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_prompt(self, problem: str | Messages) -> str:
        messages = as_messages(problem, self.system_prompt)
        if self.template == "plain" or not getattr(self.hf, "chat_template", None):
            return plain_prompt(messages)
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if self.template == "chat-think" and not text.rstrip().endswith("<think>"):
            text += "<think>\n"
        return text

    def fingerprint(self) -> str:
        backend = getattr(self.hf, "backend_tokenizer", None)  # a fast tokenizer serialises its whole pipeline
        vocab = backend.to_str() if backend is not None else json.dumps(sorted(self.hf.get_vocab().items()))
        return _sha256("hf", type(self.hf).__name__, vocab, str(getattr(self.hf, "chat_template", None)),
                       self.template, str(self.system_prompt),
                       json.dumps([self.eos_token_id, self.pad_token_id, self.bos_token_id]))

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.hf.save_pretrained(directory)
        with open(os.path.join(directory, META_FILE), "w", encoding="utf-8") as f:
            json.dump({"kind": "hf", "system_prompt": self.system_prompt, "template": self.template}, f, indent=2)


class SentencePieceTokenizer(Tokenizer):
    """A local SentencePiece model with fixed special ids: pad=0, eos=1, bos=2, unk=3.

    The prompt template is `plain_prompt` with an optional default system prompt.
    """

    PAD, EOS, BOS, UNK = 0, 1, 2, 3

    def __init__(self, model_proto: bytes, system_prompt: str | None = None):
        import sentencepiece as spm

        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        if (self.sp.pad_id(), self.sp.eos_id(), self.sp.bos_id(), self.sp.unk_id()) != (
            self.PAD, self.EOS, self.BOS, self.UNK
        ):
            raise ValueError("SentencePiece model must use pad=0, eos=1, bos=2, unk=3 (train it with train_sentencepiece)")
        self.system_prompt = system_prompt
        self.pad_token_id, self.eos_token_id, self.bos_token_id = self.PAD, self.EOS, self.BOS
        self._special = {self.PAD, self.EOS, self.BOS}

    @classmethod
    def load(cls, directory: str) -> "SentencePieceTokenizer":
        with open(os.path.join(directory, SPM_MODEL_FILE), "rb") as f:
            proto = f.read()
        system_prompt = None
        meta_path = os.path.join(directory, META_FILE)
        if os.path.exists(meta_path):
            with open(meta_path, encoding="utf-8") as f:
                system_prompt = json.load(f).get("system_prompt")
        return cls(proto, system_prompt=system_prompt)

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self.sp.encode(list(texts))]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if not skip_special_tokens:
            # SentencePiece decodes control ids to "", so spell them out explicitly.
            pieces, run = [], []
            for i in ids:
                if i in self._special:
                    pieces.append(self.sp.decode(run))
                    pieces.append(self.sp.id_to_piece(i))
                    run = []
                else:
                    run.append(i)
            pieces.append(self.sp.decode(run))
            return "".join(pieces)
        return self.sp.decode([i for i in ids if i not in self._special])

    def render_prompt(self, problem: str | Messages) -> str:
        return plain_prompt(as_messages(problem, self.system_prompt))

    def fingerprint(self) -> str:
        return _sha256("sentencepiece", self.model_proto, str(self.system_prompt))

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, SPM_MODEL_FILE), "wb") as f:
            f.write(self.model_proto)
        with open(os.path.join(directory, META_FILE), "w", encoding="utf-8") as f:
            json.dump({"kind": "sentencepiece", "system_prompt": self.system_prompt}, f, indent=2)


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | None = None,
    user_defined_symbols: Sequence[str] = (),
    byte_fallback: bool = True,
    system_prompt: str | None = None,
) -> SentencePieceTokenizer:
    """Train a BPE SentencePiece model on `texts` and return it (also saved to `out_dir` when given).

    Deterministic: one thread, no sentence sampling or shuffling, so the same texts give the same model file.
    Digits are split into single-digit tokens; with byte_fallback unknown characters become byte tokens (256 ids
    of the vocabulary) instead of <unk>. `vocab_size` is a ceiling: a small corpus may yield fewer pieces.
    """
    import sentencepiece as spm

    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_sentencepiece needs at least one non-empty text")
    reserved = 4 + len(user_defined_symbols) + (256 if byte_fallback else 0)
    if vocab_size <= reserved:
        raise ValueError(f"vocab_size={vocab_size} leaves no room beyond {reserved} special/byte pieces")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        split_digits=True,
        byte_fallback=byte_fallback,
        user_defined_symbols=list(user_defined_symbols),
        pad_id=SentencePieceTokenizer.PAD,
        eos_id=SentencePieceTokenizer.EOS,
        bos_id=SentencePieceTokenizer.BOS,
        unk_id=SentencePieceTokenizer.UNK,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        # Newlines are part of prompts ("...\nAnswer:"); keep them instead of normalising them to spaces.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        max_sentence_length=1 << 16,
        minloglevel=2,
    )
    tokenizer = SentencePieceTokenizer(model.getvalue(), system_prompt=system_prompt)
    if out_dir is not None:
        tokenizer.save(out_dir)
    return tokenizer


def load_tokenizer(directory: str) -> Tokenizer:
    """Rebuild a tokenizer written by `Tokenizer.save` (a plain Hugging Face directory loads as HFTokenizer)."""
    meta_path = os.path.join(directory, META_FILE)
    meta = {}
    if os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    if meta.get("kind") == "sentencepiece":
        return SentencePieceTokenizer.load(directory)
    return HFTokenizer(directory, system_prompt=meta.get("system_prompt"), template=meta.get("template", "chat-think"))

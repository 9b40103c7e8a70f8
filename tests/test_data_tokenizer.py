"""Tokenizers: SentencePiece determinism, digit splitting, round trips, save/load; HFTokenizer templates.

The Hugging Face tokenizer is a tiny byte-level BPE trained here (no hub downloads) with a Qwen-style chat template.
"""
import time

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from megatron_red.data import BuiltinTask, HFTokenizer, SentencePieceTokenizer, load_tokenizer, train_sentencepiece

TEXTS = [
    "Question: Ann has 12 pens. She gets 7 more.\nAnswer: 12+7=19. The answer is 19.",
    "Let me verify: 340 - 17 = 323, so the total is 323 coins.",
    "The area of the square is $x^2 = 144$, hence $x = 12$.",
] * 20

QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_hf_tokenizer(chat_template=QWEN_TEMPLATE):
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = chat_template
    return hf


def test_sentencepiece_deterministic_and_round_trip(tmp_path):
    a = train_sentencepiece(TEXTS, 320, out_dir=str(tmp_path / "a"))
    b = train_sentencepiece(TEXTS, 320, out_dir=str(tmp_path / "b"))
    assert (tmp_path / "a" / "spm.model").read_bytes() == (tmp_path / "b" / "spm.model").read_bytes()
    for text in TEXTS[:3] + ["unseen ünïcødé ✓ 98765"]:
        assert a.encode(text) == b.encode(text)
        assert a.decode(a.encode(text)) == text  # newline, $ and unseen characters survive (byte fallback)
    loaded = load_tokenizer(str(tmp_path / "a"))
    assert isinstance(loaded, SentencePieceTokenizer)
    assert loaded.encode(TEXTS[1]) == a.encode(TEXTS[1]) and loaded.vocab_size == a.vocab_size


def test_sentencepiece_digits_specials_and_prompt():
    tok = train_sentencepiece(TEXTS, 320, system_prompt="Be brief.")
    ids = tok.encode("340 - 17 = 323")
    digit_pieces = [tok.sp.id_to_piece(i) for i in ids if any(c.isdigit() for c in tok.sp.id_to_piece(i))]
    assert digit_pieces == list("34017323")  # each digit its own token
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    assert all(i not in (0, 1, 2) for i in tok.encode(TEXTS[0]))  # encode adds no special tokens
    ids = tok.encode("The answer is 19.")
    assert tok.decode([tok.bos_token_id] + ids + [tok.eos_token_id, tok.pad_token_id]) == "The answer is 19."
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=False) == "The answer is 19.</s>"
    assert tok.render_prompt("What is 2+2?") == "Be brief.\n\nQuestion: What is 2+2?\nAnswer:"
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert tok.render_prompt(messages) == "S\n\nQuestion: U\nAnswer:"
    with pytest.raises(ValueError, match="vocab_size"):
        train_sentencepiece(TEXTS, 100)  # byte fallback alone needs 256 ids


def test_sentencepiece_builtin_corpus_is_fast():
    start = time.perf_counter()
    task = BuiltinTask()
    assert time.perf_counter() - start < 5.0
    assert task.tokenizer.vocab_size <= task.config.vocab_size


def test_hf_tokenizer_chat_think_chat_plain(tmp_path):
    hf = tiny_hf_tokenizer()
    sys_prompt, problem = "Think first.", "What is 3+4?"
    expected_chat = (f"<|im_start|>system\n{sys_prompt}<|im_end|>\n<|im_start|>user\n{problem}<|im_end|>\n"
                     "<|im_start|>assistant\n")
    think = HFTokenizer(hf, system_prompt=sys_prompt, template="chat-think")
    assert think.render_prompt(problem) == expected_chat + "<think>\n"
    assert HFTokenizer(hf, system_prompt=sys_prompt, template="chat").render_prompt(problem) == expected_chat
    assert (HFTokenizer(hf, system_prompt=sys_prompt, template="plain").render_prompt(problem)
            == f"{sys_prompt}\n\nQuestion: {problem}\nAnswer:")
    # A message list keeps its own system prompt.
    messages = [{"role": "system", "content": "Row prompt."}, {"role": "user", "content": problem}]
    assert think.render_prompt(messages).startswith("<|im_start|>system\nRow prompt.<|im_end|>")

    assert think.eos_token_id == hf.convert_tokens_to_ids("<|im_end|>")
    assert think.pad_token_id == hf.convert_tokens_to_ids("<|endoftext|>")
    assert think.vocab_size == len(hf)
    ids = think.encode(TEXTS[0])
    assert think.encode_batch([TEXTS[0], TEXTS[1]]) == [ids, think.encode(TEXTS[1])]
    assert think.decode(ids + [think.eos_token_id]) == TEXTS[0]

    think.save(str(tmp_path / "hf"))
    loaded = load_tokenizer(str(tmp_path / "hf"))
    assert isinstance(loaded, HFTokenizer) and loaded.template == "chat-think"
    assert loaded.render_prompt(problem) == think.render_prompt(problem)
    assert loaded.encode(TEXTS[2]) == think.encode(TEXTS[2])


def test_hf_tokenizer_template_edge_cases():
    # A template that already opens <think> must not get a second one.
    ends_with_think = tiny_hf_tokenizer(QWEN_TEMPLATE.replace("assistant\\n", "assistant\\n<think>\\n"))
    assert HFTokenizer(ends_with_think).render_prompt("Q").endswith("assistant\n<think>\n")
    assert not HFTokenizer(ends_with_think).render_prompt("Q").endswith("<think>\n<think>\n")
    # No chat template: plain fallback.
    assert HFTokenizer(tiny_hf_tokenizer(chat_template=None)).render_prompt("Q") == "Question: Q\nAnswer:"
    with pytest.raises(ValueError, match="template"):
        HFTokenizer(tiny_hf_tokenizer(), template="fancy")
    with pytest.raises(ValueError, match="messages"):
        HFTokenizer(tiny_hf_tokenizer()).render_prompt([{"role": "user"}])

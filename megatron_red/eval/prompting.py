"""Prompts for evaluation: chat template with the `<think>` system prompt, chat template alone, or plain text."""
from __future__ import annotations

import os
import warnings
from typing import Literal

from megatron_red.errors import ConfigError

PromptStyle = Literal["chat-think", "chat", "plain"]
PROMPT_STYLES: tuple[str, ...] = ("chat-think", "chat", "plain")
SYSTEM_PROMPT_FILE = "luffy_system_prompt.txt"
# For models without a chat template (base models): ask for a boxed final answer, which the grader looks for.
PLAIN_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def load_system_prompt(path: str) -> str:
    """The `<think>` system prompt (OpenR1-Math-46k-8192's, shipped with the data as luffy_system_prompt.txt)."""
    if os.path.isdir(path):
        path = os.path.join(path, SYSTEM_PROMPT_FILE)
    if not os.path.exists(path):
        raise ConfigError(f"system prompt file {path} not found (needed by --prompt-style chat-think)")
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def format_prompt(tokenizer, problem: str, style: PromptStyle, system_prompt: str | None = None) -> str:
    """The prompt text for one problem. Chat styles fall back to plain when the tokenizer has no chat template."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; known: {PROMPT_STYLES}")
    if style == "chat-think" and not system_prompt:
        raise ValueError("prompt style 'chat-think' needs the system prompt text")
    if style != "plain" and not getattr(tokenizer, "chat_template", None):
        warnings.warn(f"tokenizer has no chat template; prompt style {style!r} falls back to 'plain'", stacklevel=2)
        style = "plain"
    if style == "plain":
        return f"{problem}\n{PLAIN_INSTRUCTION}\n"
    messages = [{"role": "user", "content": problem}]
    if style == "chat-think":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prompt_ids(tokenizer, problem: str, style: PromptStyle, system_prompt: str | None = None) -> list[int]:
    """Token ids of the prompt (the template already carries any special tokens it wants)."""
    text = format_prompt(tokenizer, problem, style, system_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])

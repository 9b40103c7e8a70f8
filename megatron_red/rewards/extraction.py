"""Answer extraction for math rewards: the final-answer text that math-verify is asked to parse.

Rules (see `answer_text`):
  * a response with `</think>` is graded on what follows the last `</think>` (the reasoning is not the answer);
  * the last `\\boxed{...}` (or `\\fbox{...}`) wins: math-verify would read several boxes as one set, which fails
    against a single gold, and a model that corrects itself puts the final answer last;
  * without a complete box, the whole remaining text goes to math-verify's own extraction;
  * a box, or a gold (`gold_text`), holding just a Python-style number (`6e13`) is read as that number
    (`scientific_as_latex`).
"""
from __future__ import annotations

import re

THINK_END = "</think>"
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b")
# A number written as a Python float with an exponent (`6e13`, `2.55e-10`, `4.5E+33`), as Minerva copies write golds.
_SCIENTIFIC_RE = re.compile(r"([+-]?(?:\d+(?:\.\d+)?|\.\d+))[eE]([+-]?\d+)")


def clean_text(response: str | bytes) -> str | None:
    """The response as text, or None when it is not valid text (bytes that are not UTF-8, lone surrogates, NUL)."""
    if isinstance(response, bytes):
        try:
            response = response.decode("utf-8")
        except UnicodeDecodeError:
            return None
    elif not isinstance(response, str):
        raise ValueError(f"a response must be str or bytes, got {type(response).__name__}")
    if "\x00" in response:
        return None
    try:
        response.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. from a detokeniser that split a code point
        return None
    return response


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` / `\\fbox{...}` (or `\\boxed x` without braces), else None."""
    for match in reversed(list(_BOX_RE.finditer(text))):
        rest = text[match.end():]
        stripped = rest.lstrip()
        if stripped.startswith("{"):
            start = len(rest) - len(stripped) + 1
            depth = 1
            for i in range(start, len(rest)):
                if rest[i] == "{":
                    depth += 1
                elif rest[i] == "}":
                    depth -= 1
                    if depth == 0:
                        return rest[start:i]
            continue  # unbalanced (truncated) box: try an earlier one
        if rest[:1] == " ":  # `\boxed 5`: one token, up to whitespace or `$`
            token = re.match(r"[^\s$]+", stripped)
            if token:
                return token.group(0)
    return None


def scientific_as_latex(text: str) -> str:
    """`6e13` -> `6 \\times 10^{13}`; any text that is not one such number is returned unchanged.

    math-verify reads the bare form as an expression in Euler's e (`6e13` = 6 * e * 13, `2.55e-10` = 2.55e - 10),
    so a correct `6 \\times 10^{13}` would be graded wrong against it. Only the whole text, without spaces, is
    rewritten: `2e + 1` stays an expression, while a bare `2e+1` meant as one would read as 20 (no MATH train or
    MATH500 answer has that form).
    """
    match = _SCIENTIFIC_RE.fullmatch(text.strip())
    if match is None:
        return text
    mantissa, exponent = match.groups()
    return f"{mantissa} \\times 10^{{{int(exponent)}}}"


def answer_text(response: str) -> str | None:
    """The text to hand to math-verify's parser, or None when the response holds no answer at all."""
    if THINK_END in response:
        response = response.rpartition(THINK_END)[2]
    if not response.strip():
        return None
    boxed = last_boxed(response)
    if boxed is not None:
        return "\\boxed{" + scientific_as_latex(boxed) + "}" if boxed.strip() else None
    return response


def gold_text(gold: str) -> str:
    """A gold answer wrapped for math-verify's LaTeX extraction (`$...$`), unless already delimited or boxed;
    a Python-style number (`6e13`) is read as that number."""
    stripped = gold.strip()
    if _BOX_RE.search(stripped) or (len(stripped) >= 2 and stripped.startswith("$") and stripped.endswith("$")):
        return stripped
    return f"${scientific_as_latex(stripped)}$"

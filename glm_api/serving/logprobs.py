"""Engine log-probabilities (:class:`~glm_api.engines.base.TokenLogprob`) in OpenAI's shapes.

Chat: ``choices[i].logprobs.content``, per token ``{token, logprob, bytes, top_logprobs}``.
Completions: ``tokens``, ``token_logprobs``, ``top_logprobs`` (token text -> logprob, the token
itself included, as vLLM and OpenAI's legacy API do) and ``text_offset``, the echoed prompt's
tokens first (the very first has no log-probability).

A token's text is its id decoded alone (special tokens by their name, which decoding leaves
out); its bytes are that text's UTF-8, except for a token that holds part of a character
(byte-fallback ``<0xNN>`` pieces, byte-level BPE pieces), whose own bytes are given.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from glm_api.engines.base import Tokenizing, TokenLogprob
from glm_api.protocol.openai import ChatTokenLogprob, ChoiceLogprobs, CompletionLogprobs, TopLogprob

#: JSON has no -Infinity: a token the model rules out entirely is reported at this (vLLM's floor).
LOGPROB_FLOOR = -9999.0

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_LEVEL = _byte_level_alphabet()  # constant, built once


class TokenTexts:
    """Text and bytes of a model's token ids, remembered (a vocabulary is finite; decoding one
    id at a time is what costs)."""

    def __init__(self, tokenizer: Tokenizing) -> None:
        self._tokenizer = tokenizer
        self._known: dict[int, tuple[str, list[int]]] = {}

    def text(self, token_id: int) -> str:
        return self._entry(token_id)[0]

    def bytes(self, token_id: int) -> list[int]:
        return self._entry(token_id)[1]

    def _entry(self, token_id: int) -> tuple[str, list[int]]:
        entry = self._known.get(token_id)
        if entry is None:
            entry = self._known[token_id] = self._describe(token_id)
        return entry

    def _describe(self, token_id: int) -> tuple[str, list[int]]:
        piece = self._tokenizer.convert_ids_to_tokens([token_id])[0] or ""
        text = self._tokenizer.decode([token_id]) or piece  # a special token decodes to nothing
        if piece.startswith("\u2581") and not text.startswith(" "):
            text = " " + text  # sentencepiece drops the space that begins a decoded text
        if (match := _BYTE_PIECE.fullmatch(piece)) is not None:
            return text, [int(match.group(1), 16)]
        if "\ufffd" in text and piece and all(c in _BYTE_LEVEL for c in piece):
            return text, [_BYTE_LEVEL[c] for c in piece]
        return text, list(text.encode("utf-8"))


def _finite(logprob: float) -> float:
    return logprob if logprob >= LOGPROB_FLOOR else LOGPROB_FLOOR  # also NaN -> the floor


def chat_logprobs(texts: TokenTexts, logprobs: Sequence[TokenLogprob], top: int) -> ChoiceLogprobs:
    """``choices[i].logprobs`` of a chat response or chunk for these tokens."""
    return ChoiceLogprobs(
        content=[
            ChatTokenLogprob(
                token=texts.text(lp.token_id),
                logprob=_finite(lp.logprob),
                bytes=texts.bytes(lp.token_id),
                top_logprobs=[
                    TopLogprob(token=texts.text(i), logprob=_finite(v), bytes=texts.bytes(i)) for i, v in lp.top[:top]
                ],
            )
            for lp in logprobs
        ]
    )


def completion_logprobs(
    texts: TokenTexts, logprobs: Sequence[TokenLogprob | None], first_token: int | None = None, text_offset: int = 0
) -> CompletionLogprobs:
    """``choices[i].logprobs`` of a completion for these tokens; a None entry (the first prompt
    token, whose id is ``first_token``) has no log-probability. Offsets count from ``text_offset``."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    offset = text_offset
    for lp in logprobs:
        token_id = lp.token_id if lp is not None else first_token
        text = texts.text(token_id) if token_id is not None else ""
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if lp is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_finite(lp.logprob))
        top = {texts.text(i): _finite(v) for i, v in lp.top}
        top.setdefault(text, _finite(lp.logprob))
        out.top_logprobs.append(top)
    return out


def extend(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=a.tokens + b.tokens,
        token_logprobs=a.token_logprobs + b.token_logprobs,
        top_logprobs=a.top_logprobs + b.top_logprobs,
        text_offset=a.text_offset + b.text_offset,
    )

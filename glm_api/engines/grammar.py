"""Constrained decoding: grammars that mask each step's logits so the output cannot break them.

JSON Schema (``response_format``, forced tool calls), any JSON object, a regex, a choice among
strings or a Lark grammar is compiled by llguidance (the library vLLM, SGLang and llama.cpp use
as a structured-output backend) against the model's own vocabulary; each constrained row of the
running batch then carries a matcher, and one step fills a bitmask for those rows only and
masks their logits before sampling. Rows without a grammar are untouched.

Why llguidance and not xgrammar: both fill 32 rows' masks in about a millisecond here, but
xgrammar's wheel requires triton (~1 GB installed, on CPU hosts too) where llguidance is a 8 MB
wheel with no dependencies, and llguidance refuses JSON Schema keywords it cannot enforce
(``uniqueItems``, ``not``, ``if``, ...) where xgrammar compiled them and ignored them: a
refusal we can turn into a 400 naming the keyword, never a silently unconstrained answer.

Vocabularies: a transformers fast tokenizer is read by llguidance itself; ChatGLM3's
sentencepiece model is described piece by piece (``▁`` is a space, ``<0xNN>`` pieces are single
bytes, and its control tokens, ``[gMASK]`` ... ``<|observation|>``, are special: never allowed
inside the grammar's text); a tokenizer that gives each id's bytes (``token_bytes``: GLM-4-9B-chat's
tiktoken one) is described by them, its special tokens likewise special.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import torch

from glm_api.engines.base import Constraint
from glm_api.errors import BadRequestError

#: Compiled grammars kept per engine (by constraint): a deployment reuses a few schemas.
GRAMMAR_CACHE_SIZE = 256


@dataclass(frozen=True)
class CompiledGrammar:
    """A grammar checked against the vocabulary; each constrained request gets a matcher of it."""

    tokenizer: Any  # llguidance.LLTokenizer
    grammar: str

    def matcher(self) -> llguidance.LLMatcher:
        return llguidance.LLMatcher(self.tokenizer, self.grammar)


def _grammar_text(constraint: Constraint) -> str:
    body = _answer_grammar(constraint)
    return _after_reasoning(body, constraint.reasoning_end) if constraint.reasoning_end else body


def _after_reasoning(body: str, end: str) -> str:
    """Free reasoning, its closing marker and blank lines, then ``body``: one grammar whose
    first part is a Lark rule that hands over to the answer's grammar (``@answer``)."""
    if body.lstrip().startswith("{"):  # llguidance's JSON form: a list of grammars, the first the start
        grammars = json.loads(body)["grammars"]
    else:  # Lark text
        grammars = [{"lark_grammar": body}]
    first = {**grammars[0], "name": "answer"}
    if end.startswith("<["):  # a token: no text can run into it
        prefix = f"start: /(?s:.*)/ {end} /\\n*/ @answer"
    else:  # text: the shortest reasoning that ends with it
        marker = re.escape(json.loads(end)).replace("/", "\\/")  # "/" ends a Lark regex
        prefix = f"start: reasoning /\\n*/ @answer\nreasoning[lazy]: /(?s:.*){marker}/"
    return json.dumps({"grammars": [{"lark_grammar": prefix}, first, *grammars[1:]]})


def _answer_grammar(constraint: Constraint) -> str:
    # Compact JSON: a weak model given free whitespace can wander in it for ever.
    defaults = {"whitespace_flexible": False}
    if constraint.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema(constraint.spec or {"type": "object"}, defaults=defaults)
    if constraint.kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(constraint.spec, defaults=defaults)
    if constraint.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(constraint.spec)
    if constraint.kind == "choice":
        choices = json.loads(constraint.spec)
        return llguidance.LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in choices))
    return llguidance.LLMatcher.grammar_from_lark(constraint.spec)


class GrammarCompiler:
    """One per chat engine: the model's vocabulary for llguidance (built on first use, off the
    event loop by the caller) and a bounded cache of compiled grammars."""

    def __init__(self, template: Any, vocab_size: int) -> None:
        self._template, self._vocab_size = template, vocab_size
        self._tokenizer: Any = None
        self._lock = threading.Lock()
        self.compile = functools.lru_cache(maxsize=GRAMMAR_CACHE_SIZE)(self._compile)

    @property
    def tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = _llg_tokenizer(self._template, self._vocab_size)
            return self._tokenizer

    def _compile(self, constraint: Constraint) -> CompiledGrammar:
        """The grammar for ``constraint``, or a 400 saying what cannot be enforced. Blocking."""
        try:
            grammar = _grammar_text(constraint)
        except (ValueError, TypeError) as exc:
            raise BadRequestError(f"{constraint.param}: {exc}", param=constraint.param) from None
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if failed:
            detail = "; ".join(messages) or "the grammar does not compile"
            detail = detail.replace("Unimplemented keys", "JSON Schema keywords this server cannot enforce")
            raise BadRequestError(f"{constraint.param}: {detail}", param=constraint.param, code="invalid_schema")
        return CompiledGrammar(self.tokenizer, grammar)


def mask_logits(logits: torch.Tensor, rows: list[int], matchers: list[llguidance.LLMatcher]) -> None:
    """Set to -inf, in place, every token the matchers do not allow next in their ``rows`` of
    ``logits`` ``[B, V]``: one bitmask for all of them, one masked_fill per step."""
    vocab = logits.shape[-1]
    # What llguidance.torch's allocate/fill functions do, without importing that module: it
    # compiles a kernel with torch.compile at import, ~2 s of every process's start-up.
    bitmask = torch.full((len(rows), (vocab + 31) // 32), -1, dtype=torch.int32)
    for i, matcher in enumerate(matchers):
        row = bitmask[i]
        matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
    bits = torch.arange(32, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).bool().view(len(rows), -1)[:, :vocab]
    index = torch.tensor(rows, device=logits.device)
    masked = logits.index_select(0, index).masked_fill_(~allowed.to(logits.device), float("-inf"))
    logits.index_copy_(0, index, masked)


def _llg_tokenizer(template: Any, vocab_size: int) -> Any:
    tokenizer = getattr(template, "tokenizer", None)
    if hasattr(tokenizer, "sp"):  # ChatGLM3's own sentencepiece tokenizer
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_SentencePieceVocab(tokenizer, vocab_size)))
    if hasattr(tokenizer, "token_bytes"):  # GLM-4-9B-chat's own tiktoken tokenizer
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenBytesVocab(tokenizer, vocab_size)))
    try:
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
    except ValueError as exc:  # not a fast tokenizer
        raise BadRequestError(f"structured outputs are not available for this model's tokenizer: {exc}") from None


class _SentencePieceVocab:
    """ChatGLM3's vocabulary as llguidance's TokenizerWrapper reads it: bytes per id."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        sp = tokenizer.sp
        self.eos_token_id = sp.eos_id()
        self.bos_token_id = None
        tokens: list[bytes] = []
        special: list[int] = []
        for i in range(vocab_size):
            if i >= sp.get_piece_size():  # ChatGLM3's own special tokens, then padding ids
                special.append(i)
                tokens.append(b"")
            elif sp.is_byte(i):
                tokens.append(bytes([int(sp.id_to_piece(i)[3:5], 16)]))
            elif sp.is_control(i) or sp.is_unknown(i):
                special.append(i)
                tokens.append(b"")
            else:
                tokens.append(sp.id_to_piece(i).replace("\u2581", " ").encode())
        self.tokens = tokens
        self.special_token_ids = special
        self._sp = sp

    def __call__(self, text: str) -> list[int]:
        # Plain sentencepiece adds a dummy-prefix space; llguidance wants the text's own tokens.
        ids = self._sp.encode("\n" + text)
        newline = self._sp.encode("\n")
        return ids[len(newline) :] if ids[: len(newline)] == newline else ids


class _TokenBytesVocab:
    """A vocabulary given as each id's bytes (None for special ids and padding rows), as
    llguidance's TokenizerWrapper reads it."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = None
        raw = [tokenizer.token_bytes(i) for i in range(vocab_size)]
        self.tokens = [b"" if r is None else r for r in raw]
        self.special_token_ids = [i for i, r in enumerate(raw) if r is None]
        self._encode = tokenizer.encode

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("text, not bytes")  # TokenizerWrapper then passes str
        return self._encode(text)

"""What a completions prompt or an embeddings input may be: a string, a list of strings, a token
array or a list of token arrays (never a mix), as the spec states it and as validation checks it."""

from __future__ import annotations

from typing import Annotated, Any

from glm_api.protocol.common import TOKEN_ID_SCHEMA, JsonInt, stated

#: Token ids are never negative; the upper bound is the model's vocabulary, checked in serving.
TokenIds = list[Annotated[JsonInt, stated(**TOKEN_ID_SCHEMA)]]


def texts_or_token_arrays(min_text_length: int = 0) -> Any:
    """The type of a prompt or input, with the shape rules of ``check_texts_or_token_arrays`` stated
    for the spec: no empty list, no empty token array, no negative id (and, for completions,
    no empty text: it leaves nothing to continue)."""
    text = Annotated[str, stated(minLength=min_text_length)] if min_text_length else str
    ids = Annotated[TokenIds, stated(minItems=1)]
    return text | Annotated[list[text], stated(minItems=1)] | ids | Annotated[list[ids], stated(minItems=1)]


def _is_id(value: Any) -> bool:
    # A JSON integer: 7 or 7.0 (JSON Schema counts both, as the spec's clients do), never true.
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(_is_id(i) for i in value)


def check_texts_or_token_arrays(value: Any, name: str) -> Any:
    """A string, a list of strings, a token array or a list of token arrays (not a mix)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        raise ValueError(f"{name} must be a string, a list of strings, a token array or a list of token arrays")
    arrays = [value] if _is_ids(value) else value
    if all(isinstance(v, str) for v in value):
        return value
    if not all(_is_ids(a) and a for a in arrays):
        raise ValueError(f"{name} must be a string, a list of strings, a token array or a list of token arrays")
    if any(i < 0 for a in arrays for i in a):
        raise ValueError("token ids must not be negative")
    return value

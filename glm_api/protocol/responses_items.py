"""The OpenAI Responses API's input items: what ``input`` of ``POST /v1/responses`` holds.

A message (a string or text parts), a function call an earlier response made, the client's
output of running it, and a reasoning item sent back; ``input`` itself is a string or a list
of them. Each item is validated as the model its ``type`` names (a message may omit it), so
a 400's ``param`` is the item's own field, not pydantic's union branch. That validation
(:func:`model_by_type`, :func:`raise_if_errors`) serves the request's tool choice and text
format too (:mod:`glm_api.protocol.responses_request`, the request that holds these items
and re-exports them).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from glm_api.protocol.common import JsonWireModel, stated

ItemStatus = Literal["in_progress", "completed", "incomplete"]


def _text_part(*kinds: str) -> dict[str, Any]:
    """The spec's content part of the given types: the text ones, the only parts read here."""
    return {
        "type": "object",
        "required": ["type", "text"],
        "properties": {"type": {"enum": list(kinds)}, "text": {"type": "string"}},
    }


def _text_content(*kinds: str) -> dict[str, Any]:
    return {"anyOf": [{"type": "string"}, {"type": "array", "items": _text_part(*kinds)}]}


#: What an assistant message takes (what an earlier response returned), and what the others take.
ASSISTANT_PARTS, INPUT_PARTS = ("output_text",), ("input_text",)
OUTPUT_PARTS = ("input_text", "output_text")  # function_call_output.output


def _text_of_parts(value: Any, allowed: tuple[str, ...], where: str, context: str = "") -> Any:
    """A string, or a list of text parts of the ``allowed`` types (images and files refused)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a string or a list of content parts")
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind not in allowed or not isinstance(part.get("text"), str):
            only = f"only {' or '.join(allowed)} parts with a string text"
            raise ValueError(f"{where}[{i}]: a part of type {kind!r} is not supported{context}; {only}")
    return value


def join_text(content: str | list[dict[str, Any]]) -> str:
    return content if isinstance(content, str) else "\n".join(part["text"] for part in content)


def _parts_by_role(schema: dict[str, Any]) -> None:
    """The spec states ``_text_parts``: an assistant message's parts are ``output_text``, the
    others' ``input_text`` (as OpenAI takes them)."""
    schema["anyOf"] = [
        {"properties": {"role": {"const": "assistant"}, "content": _text_content(*ASSISTANT_PARTS)}},
        {"properties": {"role": {"enum": ["user", "system", "developer"]}, "content": _text_content(*INPUT_PARTS)}},
    ]


class MessageItem(JsonWireModel):
    """A message: ``content`` a string or ``input_text`` parts (``output_text`` for an
    assistant message an earlier response returned)."""

    model_config = ConfigDict(json_schema_extra=_parts_by_role)

    type: Literal["message"] = "message"
    id: str | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: Annotated[str | list[dict[str, Any]], stated(**_text_content(*OUTPUT_PARTS))]
    status: ItemStatus | None = None

    @field_validator("content", mode="before")  # before the union, whose errors name its branches
    @classmethod
    def _text_parts(cls, value: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")  # absent when the role itself was refused
        allowed = ASSISTANT_PARTS if role == "assistant" else INPUT_PARTS
        return _text_of_parts(value, allowed, "content", f" in a message of role {role!r}")


class FunctionCallItem(JsonWireModel):
    """A call the model made (as a previous response returned it)."""

    type: Literal["function_call"]  # required, so the spec tells the items apart (a message may omit it)
    id: str | None = None
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    status: ItemStatus | None = None


class FunctionCallOutputItem(JsonWireModel):
    """The client's result of running a call: ``output`` a string or text parts."""

    type: Literal["function_call_output"]  # required, so the spec tells the items apart (a message may omit it)
    id: str | None = None
    call_id: str = Field(min_length=1)
    output: Annotated[str | list[dict[str, Any]], stated(**_text_content(*OUTPUT_PARTS))]
    status: ItemStatus | None = None

    @field_validator("output", mode="before")  # before the union, whose errors name its branches
    @classmethod
    def _text_output(cls, value: Any) -> Any:
        return _text_of_parts(value, OUTPUT_PARTS, "output")


class ReasoningText(BaseModel):
    model_config = ConfigDict(strict=True)  # a request's part too: JSON types as they are

    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class SummaryText(BaseModel):
    model_config = ConfigDict(strict=True)  # a request's part too: JSON types as they are

    type: Literal["summary_text"] = "summary_text"
    text: str


class ReasoningItemIn(JsonWireModel):
    """A reasoning item sent back (LangChain and agents replay the whole output). Earlier turns'
    thinking is not shown to the model again, as thinking chat templates do."""

    type: Literal["reasoning"]  # required, so the spec tells the items apart (a message may omit it)
    id: str | None = None
    summary: list[SummaryText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None


InputItem = Annotated[
    MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItemIn, Field(discriminator="type")
]
INPUT_ITEM_MODELS: dict[str, type[JsonWireModel]] = {
    "message": MessageItem, "function_call": FunctionCallItem, "function_call_output": FunctionCallOutputItem,
    "reasoning": ReasoningItemIn,
}


def _as_model(model: type[BaseModel], value: Any, loc: tuple[int | str, ...]) -> tuple[Any, list[InitErrorDetails]]:
    """``value`` validated as ``model``, or its errors located under ``loc``."""
    try:
        return model.model_validate(value), []
    except ValidationError as exc:
        return None, [
            InitErrorDetails(type=PydanticCustomError(e["type"], e["msg"]), loc=(*loc, *e["loc"]), input=e["input"])
            for e in exc.errors()
        ]


def model_by_type(value: Any, models: dict[str, type[BaseModel]], what: str, loc: tuple[int | str, ...] = (),
                  untyped: str | None = None) -> tuple[Any, list[InitErrorDetails]]:
    """An object validated as the model its ``type`` names (``untyped`` when it has none), so
    an error's ``loc``, and the 400's ``param``, is the field's own (``text.format.strict``),
    not pydantic's union branch (``text.format.json_schema.strict``)."""
    kind = value.get("type", untyped) if isinstance(value, dict) else None
    if isinstance(kind, str) and kind in models:  # (a type may be any JSON: {} is not hashable)
        return _as_model(models[kind], value, loc)
    if not isinstance(value, dict):
        problem = f"{what} must be objects"
    elif kind is None:
        problem = f"{what} need a type"
    else:
        problem = f"{what} of type {kind!r} are not supported"
    problem += f"; one of {', '.join(models)}"
    return None, [InitErrorDetails(type=PydanticCustomError("value_error", problem), loc=loc, input=value)]


def raise_if_errors(errors: list[InitErrorDetails], title: str) -> None:
    """One ValidationError with all of ``errors``, each at its own ``loc``; none, nothing."""
    if errors:
        raise ValidationError.from_exception_data(title, errors)


def validate_input_items(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """``input``: a string (one user message) or a list of items; a message may omit ``type``
    (an object with a ``role`` and no ``type`` is a message)."""
    if isinstance(value, str):
        return handler(value)
    if not isinstance(value, list):
        raise ValueError("input must be a string or a list of input items")
    items: list[Any] = []
    errors: list[InitErrorDetails] = []
    for i, item in enumerate(value):
        untyped = "message" if isinstance(item, dict) and "role" in item else None
        model, wrong = model_by_type(item, INPUT_ITEM_MODELS, "input items", (i,), untyped)
        items.append(model)
        errors += wrong
    raise_if_errors(errors, "input")
    return items

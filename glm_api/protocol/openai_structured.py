"""Structured outputs on the wire: OpenAI's ``response_format`` and vLLM's ``structured_outputs``
(their grammars are built in :mod:`glm_api.serving.structured`)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from glm_api.protocol.common import JsonWireModel, stated


class JsonSchemaFormat(JsonWireModel):
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(default_factory=dict, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, populate_by_name=True)


def _json_schema_given(schema: dict[str, Any]) -> None:
    """The spec states ``_schema_given``, and ``structured._schema_text``: a schema that is an
    object (or true)."""
    schema["anyOf"] = [
        {"properties": {"type": {"enum": ["text", "json_object"]}}},
        {
            "required": ["json_schema"],
            "properties": {
                "json_schema": {
                    "type": "object",
                    "properties": {"schema": {"anyOf": [{"type": "object"}, {"const": True}]}},
                },
            },
        },
    ]


class ResponseFormat(JsonWireModel):
    model_config = ConfigDict(json_schema_extra=_json_schema_given)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a "json_schema": {"name", "schema"} object')
        return self


def _exactly_one_kind(schema: dict[str, Any]) -> None:
    """The spec states ``_exactly_one``."""
    kinds = ("json", "regex", "choice", "grammar")
    schema["oneOf"] = [
        {
            "required": [kind],
            "properties": {kind: {"not": {"type": "null"}}, **{k: {"type": "null"} for k in kinds if k != kind}},
        }
        for kind in kinds
    ]


class StructuredOutputs(JsonWireModel):
    """vLLM's structured-output extras: one of them, as the output's grammar."""

    #: A JSON schema, or its JSON text.
    json_: dict[str, Any] | Annotated[str, stated(contentMediaType="application/json")] | None = Field(
        None, alias="json"
    )
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None

    model_config = ConfigDict(
        extra="allow", allow_inf_nan=False, populate_by_name=True, json_schema_extra=_exactly_one_kind
    )

    @field_validator("json_")
    @classmethod
    def _json_text_parses(cls, value: dict[str, Any] | str | None) -> dict[str, Any] | str | None:
        if isinstance(value, str):
            try:
                json.loads(value)
            except ValueError:
                raise ValueError("the JSON schema text is not valid JSON") from None
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> "StructuredOutputs":
        given = [k for k in ("json_", "regex", "choice", "grammar") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar")
        return self


#: Serving's rule (``structured.output_constraint``): one grammar per request.
_ONE_GRAMMAR = {"anyOf": [
    {"properties": {"response_format": {"anyOf": [{"type": "null"}, {"properties": {"type": {"const": "text"}}}]}}},
    {"properties": {"structured_outputs": {"type": "null"}}},
]}


def one_grammar(schema: dict[str, Any]) -> None:
    schema.setdefault("allOf", []).append(_ONE_GRAMMAR)

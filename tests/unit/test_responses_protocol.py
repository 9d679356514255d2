"""/v1/responses requests take JSON's types as they are, in every nested item, and the spec
(``/openapi.json``) accepts exactly what the request model accepts: the shapes OpenAI's
Responses API gives for ``input``, and nothing of another JSON type (no ``"8"`` for 8, no ``0``
for false, no ``1`` for ``"1"``)."""

from __future__ import annotations

import types
import typing

import jsonschema
import pytest
from pydantic import BaseModel, ValidationError

from glm_api.app import create_app
from glm_api.config import Settings
from glm_api.protocol.responses_request import ResponseCreateRequest

TOOL = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "name": "a", "schema": {}}

#: Each input item shape the spec states, as a client sends it (the SDK, LangChain replaying a
#: whole earlier output, an agent sending a call's result).
ITEM_SHAPES = {
    "message without type": {"role": "user", "content": "Hi"},
    "user message of input_text parts": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}],
    },
    "system message": {"role": "system", "content": [{"type": "input_text", "text": "Be brief."}]},
    "developer message": {"type": "message", "role": "developer", "content": "Be brief.", "status": None},
    "assistant message as returned": {
        "type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
        "content": [{"type": "output_text", "text": "Hello", "annotations": [], "logprobs": []}],
    },
    "assistant message, string content": {"role": "assistant", "content": "Hello"},
    "function call": {
        "type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
        "arguments": '{"city": "Paris"}', "status": "completed",
    },
    "function call output, string": {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    "function call output, text parts": {
        "type": "function_call_output", "call_id": "call_1",
        "output": [{"type": "input_text", "text": "sunny"}, {"type": "output_text", "text": "22 C"}],
    },
    "reasoning as returned": {
        "type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "s"}],
        "content": [{"type": "reasoning_text", "text": "thinking"}], "encrypted_content": None, "status": "completed",
    },
    "reasoning, bare": {"type": "reasoning", "summary": []},
}

#: Wrong JSON types (and shapes) in nested items: refused by the model, naming the field.
WRONG = [
    ({"input": "x", "text": {"format": {**JSON_SCHEMA_FORMAT, "strict": 0}}}, "text.format.strict"),
    ({"input": "x", "text": {"format": {**JSON_SCHEMA_FORMAT, "strict": "true"}}}, "text.format.strict"),
    ({"input": "x", "text": {"format": {**JSON_SCHEMA_FORMAT, "strict": 1}}}, "text.format.strict"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": 1, "schema": {}}}}, "text.format.name"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a", "schema": "{}"}}}, "text.format.schema"),
    ({"input": "x", "text": {"format": {"type": {}}}}, "text.format"),
    ({"input": "x", "text": {"verbosity": 1}}, "text.verbosity"),
    ({"input": "x", "tools": [{**TOOL, "strict": 1}]}, "tools.0.strict"),
    ({"input": "x", "tools": [{**TOOL, "name": 7}]}, "tools.0.name"),
    ({"input": "x", "tools": [{"name": "f"}]}, "tools.0.type"),
    ({"input": "x", "tools": [TOOL], "tool_choice": {"type": "function", "name": 1}}, "tool_choice.name"),
    ({"input": "x", "reasoning": {"effort": 1}}, "reasoning.effort"),
    ({"input": "x", "max_output_tokens": "8"}, "max_output_tokens"),
    ({"input": "x", "temperature": "0.5"}, "temperature"),
    ({"input": "x", "seed": "1"}, "seed"),
    ({"input": "x", "top_k": True}, "top_k"),
    ({"input": "x", "store": 0}, "store"),
    ({"input": "x", "parallel_tool_calls": "false"}, "parallel_tool_calls"),
    ({"input": "x", "metadata": {"k": 1}}, "metadata.k"),
    ({"input": [{"role": "user", "content": "x", "id": 1}]}, "input.0.id"),
    ({"input": [{"role": "user", "content": 1}]}, "input.0.content"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": 1}]}]}, "input.0.content"),
    ({"input": [{"role": 1, "content": "x"}]}, "input.0.role"),
    ({"input": [{"role": "user", "content": "x", "status": 1}]}, "input.0.status"),
    ({"input": [{**ITEM_SHAPES["function call"], "call_id": 1}]}, "input.0.call_id"),
    ({"input": [{**ITEM_SHAPES["function call"], "arguments": {"city": "Paris"}}]}, "input.0.arguments"),
    ({"input": [{**ITEM_SHAPES["function call output, string"], "output": 22}]}, "input.0.output"),
    ({"input": [{"type": "reasoning", "summary": [{"type": "summary_text", "text": 1}]}]}, "input.0.summary.0.text"),
    ({"input": [{"type": "reasoning", "summary": [], "content": [{"text": False}]}]}, "input.0.content.0.text"),
    ({"input": [{"role": "user", "content": "x"}, {"type": "reasoning", "summary": "s"}]}, "input.1.summary"),
]

#: Shapes OpenAI refuses too (or this server does not serve): refused by the model and the spec.
REFUSED_SHAPES = [
    ({"input": [{"role": "assistant", "content": [{"type": "input_text", "text": "x"}]}]}, "input.0.content"),
    ({"input": [{"role": "user", "content": [{"type": "output_text", "text": "x"}]}]}, "input.0.content"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0.content"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": [{"type": "input_file"}]}]}, "input.0.output"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0"),
    ({"input": [{"content": "no role, no type"}]}, "input.0"),
    ({"input": [{"type": None, "role": "user", "content": "x"}]}, "input.0"),
    ({"input": ["Hi"]}, "input.0"),
    ({"input": [{"type": "function_call", "call_id": "", "name": "f", "arguments": "{}"}]}, "input.0.call_id"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input.0.call_id"),
    ({"input": {"role": "user", "content": "x"}}, "input"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": "x", "text": {"format": {"name": "a", "schema": {}}}}, "text.format"),
    ({"input": "x", "metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"input": "x", "metadata": {"k": "v" * 513}}, "metadata"),
]


def _spec() -> dict:
    return create_app(Settings(_env_file=None, disable_chat=True)).openapi()


@pytest.fixture(scope="module")
def request_schema() -> jsonschema.Draft202012Validator:
    spec = _spec()
    return jsonschema.Draft202012Validator(
        {**spec["components"]["schemas"]["ResponseCreateRequest"], "components": spec["components"]}
    )


def _nested_models(annotation: typing.Any, seen: set[type[BaseModel]]) -> set[type[BaseModel]]:
    """Every model a request of this type may hold, however deep."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if annotation not in seen:
            seen.add(annotation)
            for field in annotation.model_fields.values():
                _nested_models(field.annotation, seen)
        return seen
    for arg in typing.get_args(annotation):
        if not isinstance(arg, (str, int, bool, types.NoneType)):
            _nested_models(arg, seen)
    return seen


def test_every_model_of_the_request_is_strict():
    models = _nested_models(ResponseCreateRequest, set())
    assert {m.__name__ for m in models} >= {
        "MessageItem", "FunctionCallItem", "FunctionCallOutputItem", "ReasoningItemIn", "SummaryText",
        "ReasoningText", "FunctionTool", "FunctionToolChoice", "TextConfig", "TextFormatJsonSchema", "ReasoningConfig",
    }
    lax = sorted(m.__name__ for m in models if not m.model_config.get("strict"))
    assert not lax, f"these models take pydantic's coercions: {lax}"


@pytest.mark.parametrize("shape", list(ITEM_SHAPES))
def test_each_input_item_shape_is_accepted_by_the_spec_and_the_model(shape, request_schema):
    body = {"input": [{"role": "user", "content": "Hi"}, ITEM_SHAPES[shape]]}
    assert request_schema.is_valid(body), list(request_schema.iter_errors(body))[:1]
    item = ResponseCreateRequest.model_validate(body).input[1]
    assert item.type == ITEM_SHAPES[shape].get("type", "message")


def test_the_whole_round_trip_is_one_valid_input(request_schema):
    body = {"input": list(ITEM_SHAPES.values()), "instructions": "Be brief.", "tools": [TOOL]}
    assert request_schema.is_valid(body)
    assert [i.type for i in ResponseCreateRequest.model_validate(body).input] == [
        item.get("type", "message") for item in ITEM_SHAPES.values()
    ]


@pytest.mark.parametrize(("body", "param"), WRONG + REFUSED_SHAPES)
def test_wrong_types_and_shapes_are_refused_by_the_spec_and_the_model_naming_the_field(body, param, request_schema):
    assert not request_schema.is_valid(body), body
    with pytest.raises(ValidationError) as refused:
        ResponseCreateRequest.model_validate(body)
    assert ".".join(str(p) for p in refused.value.errors()[0]["loc"]) == param


@pytest.mark.parametrize(
    "body",
    [
        # Serving's rules across fields, stated in the spec: nothing to answer...
        {"input": []},
        {"input": [ITEM_SHAPES["reasoning, bare"]]},
        {"input": [], "instructions": ""},
        # ...and a forced call is the output's grammar, so no text format asks for another.
        {"input": "x", "tools": [TOOL], "tool_choice": "required", "text": {"format": {"type": "json_object"}}},
        {"input": "x", "tools": [TOOL], "tool_choice": {"type": "function", "name": "get_weather"},
         "text": {"format": {"type": "json_schema", "name": "a", "schema": {}}}},
    ],
)
def test_the_spec_states_serving_s_rules(body, request_schema):
    assert not request_schema.is_valid(body)
    ResponseCreateRequest.model_validate(body)  # serving refuses it (tests/api/test_responses_api.py)


@pytest.mark.parametrize(
    "body",
    [
        {"input": [], "previous_response_id": "resp_1"},
        {"input": [], "instructions": "Say hi."},
        {"input": [ITEM_SHAPES["reasoning, bare"]], "instructions": "Say hi."},
        {"input": "x", "tools": [TOOL], "tool_choice": "auto", "text": {"format": {"type": "json_object"}}},
        {"input": "x", "tools": [TOOL], "tool_choice": "required", "text": {"format": {"type": "text"}}},
        {"input": "", "text": {"format": {"type": "json_schema", "name": "a", "schema": {}, "strict": True}}},
        {"input": "x", "temperature": 1, "top_p": 1, "max_output_tokens": 8.0, "metadata": {"k": "v" * 512}},
    ],
)
def test_what_serving_takes_the_spec_takes(body, request_schema):
    assert request_schema.is_valid(body), list(request_schema.iter_errors(body))[:1]
    ResponseCreateRequest.model_validate(body)

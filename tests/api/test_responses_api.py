"""/v1/responses on real models through the ASGI app: every body checked against the ``openai``
package's own types, every answer against /v1/chat/completions on the same conversation (the
Responses API is a translation onto the same engine call, so greedy answers are equal).

Generation is kept short (a few tokens, greedy) because the CPU is shared.
"""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient
from openai.types.responses import Response, ResponseItemList, ResponseStreamEvent
from pydantic import TypeAdapter

from glm_api.app import create_app
from glm_api.families.transformers_lm import load_transformers_lm
from glm_api.registry import PACKAGED_EMBEDDING_NAME
from tests.api.test_seed_api import assert_error
from tests.conftest import make_registry, make_settings
from tests.fixtures.tool_calling_lm import (
    CALL_ARGUMENTS,
    FINAL_ANSWER,
    QUESTION as WEATHER_QUESTION,
    TOOL_RESULT,
    WEATHER_TOOL,
)
from tests.unit.test_responses_protocol import ITEM_SHAPES

KEY_A, KEY_B = "key-a", "key-b"
GREEDY = {"temperature": 0, "max_output_tokens": 8}
EVENTS = TypeAdapter(ResponseStreamEvent)
#: The Responses API's function tool: the chat tool's function, flattened.
WEATHER_FUNCTION = {"type": "function", **WEATHER_TOOL["function"]}


def response_of(http) -> Response:
    assert http.status_code == 200, http.text
    body = http.json()
    assert body["object"] == "response" and body["id"].startswith("resp_")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    return Response.model_validate(body)


def chat_text(client, messages: list[dict], max_tokens: int = 8, **extra) -> tuple[str, dict]:
    body = client.post("/v1/chat/completions", json={
        "messages": messages, "temperature": 0, "max_tokens": max_tokens, **extra,
    }).json()
    return body["choices"][0]["message"]["content"], body["usage"]


def stream_events(http) -> list:
    """Typed events of a streamed response: each SSE ``event`` name equals its payload's type."""
    assert http.status_code == 200, http.text
    assert http.headers["content-type"].startswith("text/event-stream")
    names, events = [], []
    for line in http.text.splitlines():
        if line.startswith("event:"):
            names.append(line[len("event:"):].strip())
        elif line.startswith("data:"):
            events.append(EVENTS.validate_python(json.loads(line[len("data:"):].strip())))
    assert names == [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events


@pytest.fixture(scope="module")
def app_settings(tmp_path_factory):
    return make_settings(data_dir=tmp_path_factory.mktemp("responses-data"))


@pytest.fixture(scope="module")
def rclient(smollm2, minilm, app_settings):
    registry = make_registry(smollm2, {PACKAGED_EMBEDDING_NAME: minilm}, app_settings)
    with TestClient(create_app(app_settings, registry)) as client:
        yield client


# ---------------------------------------------------------------------------------------------
# Create, retrieve, delete


def test_a_string_input_answers_as_chat_does_and_is_kept_until_deleted(rclient):
    created = response_of(rclient.post("/v1/responses", json={"input": "What is the capital of France?", **GREEDY}))
    expected, usage = chat_text(rclient, [{"role": "user", "content": "What is the capital of France?"}])
    assert created.output_text == expected
    (message,) = created.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert created.usage.input_tokens == usage["prompt_tokens"] and created.usage.output_tokens == usage["completion_tokens"]
    assert created.store is True and created.temperature == 0 and created.max_output_tokens == 8
    assert created.status in {"completed", "incomplete"}
    if created.status == "incomplete":
        assert created.incomplete_details.reason == "max_output_tokens"

    fetched = response_of(rclient.get(f"/v1/responses/{created.id}"))
    assert fetched.model_dump() == created.model_dump()
    items = ResponseItemList.model_validate(rclient.get(f"/v1/responses/{created.id}/input_items").json())
    (item,) = items.data
    assert item.type == "message" and item.role == "user" and item.content[0].text == "What is the capital of France?"
    assert items.first_id == items.last_id == item.id and not items.has_more

    deleted = rclient.delete(f"/v1/responses/{created.id}")
    assert deleted.status_code == 200 and deleted.json() == {"id": created.id, "object": "response", "deleted": True}
    assert_error(rclient.get(f"/v1/responses/{created.id}"), 404)
    assert_error(rclient.get(f"/v1/responses/{created.id}/input_items"), 404)
    assert_error(rclient.delete(f"/v1/responses/{created.id}"), 404)


def test_instructions_and_items_become_the_chat_messages(rclient):
    body = {
        "instructions": "Answer in one word.",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Name a colour."}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Blue."}]},
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "Another one?"},
        ],
        "metadata": {"run": "7"},
        **GREEDY,
    }
    created = response_of(rclient.post("/v1/responses", json=body))
    expected, _ = chat_text(rclient, [
        {"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."}, {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Another one?"},
    ])
    assert created.output_text == expected
    assert created.instructions == "Answer in one word." and created.metadata == {"run": "7"}
    items = rclient.get(f"/v1/responses/{created.id}/input_items", params={"order": "asc"}).json()["data"]
    assert [(i["type"], i["role"]) for i in items] == [
        ("message", "user"), ("message", "assistant"), ("message", "developer"), ("message", "user"),
    ]


def test_previous_response_id_continues_the_conversation(rclient):
    first = response_of(rclient.post("/v1/responses", json={
        "input": "Name a colour.", "instructions": "Answer in one word.", **GREEDY,
    }))
    second = response_of(rclient.post("/v1/responses", json={
        "input": "And another?", "previous_response_id": first.id, **GREEDY,
    }))
    # OpenAI's rule: instructions are not carried over to the next response.
    expected, usage = chat_text(rclient, [
        {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And another?"},
    ])
    assert second.output_text == expected and second.previous_response_id == first.id
    assert second.usage.input_tokens == usage["prompt_tokens"]
    listed = rclient.get(f"/v1/responses/{second.id}/input_items").json()  # newest first
    assert [(i["type"], i["role"]) for i in listed["data"]] == [
        ("message", "user"), ("message", "assistant"), ("message", "user"),
    ]
    assert listed["data"][1]["id"] == first.output[0].id
    page = rclient.get(f"/v1/responses/{second.id}/input_items", params={"limit": 1, "after": listed["first_id"]}).json()
    assert [i["id"] for i in page["data"]] == [listed["data"][1]["id"]] and page["has_more"]


def test_store_false_keeps_nothing(rclient):
    created = response_of(rclient.post("/v1/responses", json={"input": "Hi", "store": False, **GREEDY}))
    assert created.store is False
    assert_error(rclient.get(f"/v1/responses/{created.id}"), 404)
    assert_error(
        rclient.post("/v1/responses", json={"input": "Hi", "previous_response_id": created.id, **GREEDY}),
        400, "previous_response_id", "previous_response_not_found",
    )


def test_structured_output_follows_the_json_schema(rclient):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
              "additionalProperties": False}
    created = response_of(rclient.post("/v1/responses", json={
        "input": "Which city is the capital of France?", "temperature": 0, "max_output_tokens": 40,
        "text": {"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}},
    }))
    assert created.status == "completed" and created.text.format.type == "json_schema"
    assert set(json.loads(created.output_text)) == {"city"}
    plain = response_of(rclient.post("/v1/responses", json={
        "input": "Give the name and capital of France as JSON with keys name and capital.",
        "temperature": 0, "max_output_tokens": 40,
        "text": {"format": {"type": "json_object"}},
    }))
    assert isinstance(json.loads(plain.output_text), dict)


def test_a_forced_call_comes_back_as_a_function_call_item(rclient):
    created = response_of(rclient.post("/v1/responses", json={
        "input": "Weather in Paris?", "tools": [WEATHER_FUNCTION], "tool_choice": "required",
        "temperature": 0, "max_output_tokens": 40,
    }))
    (call,) = created.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert set(json.loads(call.arguments)) == {"city"}
    assert created.tools[0].name == "get_weather" and created.tool_choice == "required"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input"),
        ({"input": "x", "background": True}, "background"),
        ({"input": "x", "top_logprobs": 3}, "top_logprobs"),
        ({"input": "x", "include": ["file_search_call.results"]}, "include"),
        ({"input": "x", "metadata": {"k" * 65: "v"}}, "metadata"),
        ({"input": "x", "conversation": "conv_1"}, "conversation"),
        ({"input": []}, None),
        ({"input": "x", "tool_choice": {"type": "function", "name": "nope"}, "tools": [WEATHER_FUNCTION]}, "tool_choice"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "nonsense"}}}}, None),
        ({"input": "x", "previous_response_id": "resp_missing"}, "previous_response_id"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": [{"type": "input_image"}]}]}, "input"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "model": "no-such-model"}, None),
    ],
)
def test_what_cannot_be_served_is_a_400_naming_it(rclient, body, param):
    response = rclient.post("/v1/responses", json=body)
    assert response.status_code in (400, 404), response.text
    error = assert_error(response, response.status_code)
    if param is not None:
        assert (error["param"] or "").startswith(param), error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        # JSON's types as they are, in nested items too (a schemathesis run found strict: 0 served).
        ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a", "schema": {}, "strict": 0}}},
         "text.format.strict"),
        ({"input": "x", "tools": [{**WEATHER_FUNCTION, "strict": "true"}]}, "tools.0.strict"),
        ({"input": [{"type": "function_call_output", "call_id": 1, "output": "sunny"}]}, "input.0.call_id"),
        ({"input": [{"type": "reasoning", "summary": [{"type": "summary_text", "text": 2}]}]}, "input.0.summary.0.text"),
        ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "x"}], "status": True}]}, "input.0.status"),
        ({"input": "x", "max_output_tokens": "8"}, "max_output_tokens"),
        # Serving's rules across fields (the spec states them).
        ({"input": []}, "input"),
        ({"input": [{"type": "reasoning", "summary": []}], "instructions": ""}, "input"),
        ({"input": "x", "tools": [WEATHER_FUNCTION], "tool_choice": "required", "text": {"format": {"type": "json_object"}}},
         "tool_choice"),
    ],
)
def test_wrong_json_types_and_empty_conversations_are_a_400_naming_the_field(rclient, body, param):
    assert_error(rclient.post("/v1/responses", json=body), 400, param)


def test_every_input_item_shape_the_spec_states_is_served(rclient):
    """One conversation of every shape (tests/unit/test_responses_protocol.py checks each against
    the spec): served, and listed back in the shapes ``input_items`` gives."""
    items = list(ITEM_SHAPES.values())
    created = response_of(rclient.post("/v1/responses", json={
        "input": items, "instructions": "Be brief.", "temperature": 0, "max_output_tokens": 1,
    }))
    listed = ResponseItemList.model_validate(
        rclient.get(f"/v1/responses/{created.id}/input_items", params={"order": "asc", "limit": 100}).json()
    )
    assert [i.type for i in listed.data] == [item.get("type", "message") for item in items]
    # A reasoning item alone is nothing to answer; with instructions, the model answers those.
    response_of(rclient.post("/v1/responses", json={
        "input": [ITEM_SHAPES["reasoning, bare"]], "instructions": "Say hi.", "temperature": 0, "max_output_tokens": 1,
    }))


def test_retrieving_a_stored_response_as_a_stream_is_refused(rclient):
    created = response_of(rclient.post("/v1/responses", json={"input": "Hi", **GREEDY}))
    assert_error(rclient.get(f"/v1/responses/{created.id}", params={"stream": "true"}), 400, "stream")
    # An unknown cursor names nothing there: a 404, as for an unknown response.
    assert_error(rclient.get(f"/v1/responses/{created.id}/input_items", params={"after": "nope"}), 404, "after")


# ---------------------------------------------------------------------------------------------
# Kept across a restart, and per API key


def test_a_stored_response_survives_a_restart(smollm2, minilm, tmp_path):
    settings = make_settings(data_dir=tmp_path, responses_db=tmp_path / "kept" / "r.sqlite3")
    with TestClient(create_app(settings, make_registry(smollm2, {PACKAGED_EMBEDDING_NAME: minilm}, settings))) as c:
        created = response_of(c.post("/v1/responses", json={"input": "Name a colour.", **GREEDY}))
    assert (tmp_path / "kept" / "r.sqlite3").exists()
    with TestClient(create_app(settings, make_registry(smollm2, {PACKAGED_EMBEDDING_NAME: minilm}, settings))) as c:
        assert response_of(c.get(f"/v1/responses/{created.id}")).model_dump() == created.model_dump()
        follow = response_of(c.post("/v1/responses", json={
            "input": "Another?", "previous_response_id": created.id, **GREEDY,
        }))
        assert len(c.get(f"/v1/responses/{follow.id}/input_items").json()["data"]) == 3


def test_a_response_belongs_to_the_key_that_created_it(smollm2, minilm, tmp_path):
    settings = make_settings(data_dir=tmp_path, api_keys=[KEY_A, KEY_B])
    a, b = ({"Authorization": f"Bearer {key}"} for key in (KEY_A, KEY_B))
    with TestClient(create_app(settings, make_registry(smollm2, {PACKAGED_EMBEDDING_NAME: minilm}, settings))) as c:
        created = response_of(c.post("/v1/responses", json={"input": "Hi", **GREEDY}, headers=a))
        assert response_of(c.get(f"/v1/responses/{created.id}", headers=a)).id == created.id
        assert_error(c.get(f"/v1/responses/{created.id}", headers=b), 404)
        assert_error(c.get(f"/v1/responses/{created.id}/input_items", headers=b), 404)
        assert_error(c.delete(f"/v1/responses/{created.id}", headers=b), 404)
        assert_error(c.post("/v1/responses", json={"input": "Hi", "previous_response_id": created.id, **GREEDY},
                            headers=b), 400, "previous_response_id")
        assert_error(c.get(f"/v1/responses/{created.id}"), 401)
        assert c.delete(f"/v1/responses/{created.id}", headers=a).status_code == 200


# ---------------------------------------------------------------------------------------------
# Streaming


def test_a_stream_sends_the_typed_events_in_order_and_the_same_text(rclient):
    plain = response_of(rclient.post("/v1/responses", json={"input": "Say hello.", **GREEDY}))
    events = stream_events(rclient.post("/v1/responses", json={"input": "Say hello.", "stream": True, **GREEDY}))
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert kinds == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * len(deltas), "response.output_text.done", "response.content_part.done",
        "response.output_item.done", f"response.{plain.status}",
    ]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert len(deltas) > 1 and "".join(d.delta for d in deltas) == plain.output_text
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == plain.output_text and done.item_id == deltas[0].item_id == events[2].item.id
    final = events[-1].response
    assert final.output_text == plain.output_text and final.output[0].id == events[2].item.id
    assert final.usage.output_tokens == plain.usage.output_tokens
    # Kept as it was streamed.
    assert response_of(rclient.get(f"/v1/responses/{final.id}")).model_dump() == final.model_dump()


def test_a_failure_after_the_200_is_an_error_event_then_response_failed(smollm2, minilm, tmp_path):
    settings = make_settings(data_dir=tmp_path)
    registry = make_registry(smollm2, {PACKAGED_EMBEDDING_NAME: minilm}, settings)
    with TestClient(create_app(settings, registry)) as c:
        with c.stream("POST", "/v1/responses", json={"input": "Count to fifty.", "stream": True,
                                                    "temperature": 0, "max_output_tokens": 200}) as http:
            lines = http.iter_lines()
            seen = []
            for line in lines:
                if line.startswith("data:"):
                    seen.append(json.loads(line[5:]))
                    if seen[-1]["type"] == "response.output_text.delta":
                        registry.chat_engine(None).stop()  # the engine dies mid-stream
                        break
            seen += [json.loads(line[5:]) for line in lines if line.startswith("data:")]
    kinds = [e["type"] for e in seen]
    assert kinds[-2:] == ["error", "response.failed"], kinds
    failed = EVENTS.validate_python(seen[-1])
    assert failed.response.status == "failed" and failed.response.error.message
    assert [e["sequence_number"] for e in seen] == list(range(len(seen)))


# ---------------------------------------------------------------------------------------------
# Function tools, with a tiny model trained to call one (tests/fixtures/tool_calling_lm.py)


@pytest.fixture(scope="module")
def tool_client(tool_calling_lm_dir, tmp_path_factory, minilm):
    loaded = load_transformers_lm(tool_calling_lm_dir, torch.device("cpu"), torch.float32)
    settings = make_settings(chat_model_name="tool-lm", data_dir=tmp_path_factory.mktemp("tool-data"))
    with TestClient(create_app(settings, make_registry(loaded, {PACKAGED_EMBEDDING_NAME: minilm}, settings))) as c:
        yield c


def test_a_function_call_round_trip(tool_client):
    first = response_of(tool_client.post("/v1/responses", json={
        "input": WEATHER_QUESTION, "tools": [WEATHER_FUNCTION], "temperature": 0,
    }))
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert json.loads(call.arguments) == CALL_ARGUMENTS and call.call_id.startswith("call_") and call.id.startswith("fc_")
    # The client runs the tool and sends its output, continuing from the stored response...
    second = response_of(tool_client.post("/v1/responses", json={
        "previous_response_id": first.id, "tools": [WEATHER_FUNCTION], "temperature": 0,
        "input": [{"type": "function_call_output", "call_id": call.call_id, "output": TOOL_RESULT}],
    }))
    assert second.output_text == FINAL_ANSWER and second.status == "completed"
    # ...or sends the whole conversation back itself (store: false, as stateless clients do).
    whole = response_of(tool_client.post("/v1/responses", json={
        "store": False, "tools": [WEATHER_FUNCTION], "temperature": 0,
        "input": [
            {"role": "user", "content": WEATHER_QUESTION}, call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": TOOL_RESULT},
        ],
    }))
    assert whole.output_text == FINAL_ANSWER


def test_a_function_call_streams_its_arguments(tool_client):
    events = stream_events(tool_client.post("/v1/responses", json={
        "input": WEATHER_QUESTION, "tools": [WEATHER_FUNCTION], "temperature": 0, "stream": True,
    }))
    kinds = [e.type for e in events]
    assert kinds == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed",
    ]
    added, delta, done, item_done = events[2:6]
    assert added.item.type == "function_call" and added.item.arguments == "" and added.item.status == "in_progress"
    assert json.loads(delta.delta) == CALL_ARGUMENTS and done.arguments == delta.delta and done.item_id == added.item.id
    assert item_done.item.arguments == delta.delta and item_done.item.call_id == added.item.call_id
    assert events[-1].response.output[0].call_id == added.item.call_id

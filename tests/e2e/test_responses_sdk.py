"""The official openai SDK's ``client.responses`` against real uvicorn on 127.0.0.1, changing
only the base URL: create, stream, parse, retrieve, delete, input items, a two-turn
conversation through ``previous_response_id``, a function call round trip, a stored response
kept across a server restart, and another API key that cannot see it.
"""

from __future__ import annotations

import json

import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

from glm_api.registry import PACKAGED_CHAT_NAME
from tests.e2e.conftest import NO_KERNEL_TIMING, RESPONSES_KEYS, start_server, stop_server
from tests.fixtures.tool_calling_lm import (
    CALL_ARGUMENTS,
    FINAL_ANSWER,
    TOOL_RESULT,
    WEATHER_TOOL,
)
from tests.fixtures.tool_calling_lm import QUESTION as WEATHER_QUESTION

pytestmark = pytest.mark.e2e

GREEDY = {"temperature": 0, "max_output_tokens": 16}
WEATHER_FUNCTION = {"type": "function", **WEATHER_TOOL["function"]}


def sdk_for(url: str, key: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def sdk(responses_server):
    with sdk_for(responses_server.url, RESPONSES_KEYS[0]) as client:
        yield client


@pytest.fixture(scope="module")
def other_key(responses_server):
    with sdk_for(responses_server.url, RESPONSES_KEYS[1]) as client:
        yield client


def test_create_retrieve_list_and_delete(sdk):
    created = sdk.responses.create(model=PACKAGED_CHAT_NAME, input="What is the capital of France?", **GREEDY)
    assert created.model == PACKAGED_CHAT_NAME and created.output_text
    assert created.usage.output_tokens > 0 and created.usage.input_tokens > 0
    chat = sdk.chat.completions.create(
        model=PACKAGED_CHAT_NAME, messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=16,
    )
    assert created.output_text == chat.choices[0].message.content
    assert sdk.responses.retrieve(created.id).output_text == created.output_text
    (item,) = sdk.responses.input_items.list(created.id).data
    assert item.type == "message" and item.content[0].text == "What is the capital of France?"
    sdk.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(created.id)


def test_stream_yields_the_text_as_it_is_generated(sdk):
    # Long enough to finish: a response cut by max_output_tokens ends with response.incomplete,
    # as OpenAI's do, and the SDK's get_final_response() wants response.completed.
    ask = {"model": PACKAGED_CHAT_NAME, "input": "What is the capital of France?", "temperature": 0,
           "max_output_tokens": 48}
    created = sdk.responses.create(**ask)
    assert created.status == "completed"
    with sdk.responses.stream(**ask) as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == final.output_text == created.output_text
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert sdk.responses.retrieve(final.id).output_text == final.output_text


def test_parse_fills_a_pydantic_model(sdk):
    class Capital(BaseModel):
        city: str = Field(max_length=12)

    parsed = sdk.responses.parse(
        model=PACKAGED_CHAT_NAME, input="Which city is the capital of France?", text_format=Capital,
        temperature=0, max_output_tokens=40,
    )
    assert isinstance(parsed.output_parsed, Capital) and parsed.output_parsed.city


def test_a_two_turn_conversation_through_previous_response_id(sdk):
    first = sdk.responses.create(model=PACKAGED_CHAT_NAME, input="Name a colour.",
                                 instructions="Answer in one word.", **GREEDY)
    second = sdk.responses.create(model=PACKAGED_CHAT_NAME, input="And another one?",
                                  previous_response_id=first.id, **GREEDY)
    chat = sdk.chat.completions.create(model=PACKAGED_CHAT_NAME, temperature=0, max_tokens=16, messages=[
        {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And another one?"},
    ])
    assert second.output_text == chat.choices[0].message.content
    assert second.previous_response_id == first.id
    assert len(sdk.responses.input_items.list(second.id).data) == 3


def test_another_api_key_cannot_see_a_stored_response(sdk, other_key):
    created = sdk.responses.create(model=PACKAGED_CHAT_NAME, input="Hi", **GREEDY)
    with pytest.raises(openai.NotFoundError):
        other_key.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        other_key.responses.delete(created.id)
    with pytest.raises(openai.BadRequestError):
        other_key.responses.create(model=PACKAGED_CHAT_NAME, input="Hi", previous_response_id=created.id, **GREEDY)
    assert sdk.responses.retrieve(created.id).id == created.id


def test_unsupported_fields_are_400s(sdk):
    with pytest.raises(openai.BadRequestError, match="web_search"):
        sdk.responses.create(model=PACKAGED_CHAT_NAME, input="Hi", tools=[{"type": "web_search"}])
    with pytest.raises(openai.BadRequestError, match="background"):
        sdk.responses.create(model=PACKAGED_CHAT_NAME, input="Hi", background=True)


def test_a_stored_conversation_survives_a_server_restart(tiny_llama_dir, tmp_path):
    """Persistence, not the model: a tiny Llama (SmolLM2's tokenizer and template) starts and
    answers 2-3 s sooner than SmolLM2 each time, and its 16 tokens of random text are as checkable."""
    args = ["--chat-model", str(tiny_llama_dir), "--chat-model-name", "tiny", "--cache-dir", str(tmp_path / "cache"),
            "--data-dir", str(tmp_path / "data"), *NO_KERNEL_TIMING]
    server = start_server(args, tmp_path / "first.log")
    try:
        with sdk_for(server.url, "x") as client:
            first = client.responses.create(model="tiny", input="Name a colour.", **GREEDY)
    finally:
        stop_server(server)  # a clean stop or, past its grace, a kill: committed rows survive either
    assert first.output_text, first  # something to compare after the restart
    server = start_server(args, tmp_path / "second.log")
    try:
        with sdk_for(server.url, "x") as client:
            assert client.responses.retrieve(first.id).output_text == first.output_text
            second = client.responses.create(model="tiny", input="Another?",
                                             previous_response_id=first.id, **GREEDY)
            assert [i.type for i in client.responses.input_items.list(second.id, order="asc").data] == [
                "message", "message", "message"
            ]
    finally:
        stop_server(server)


def test_a_function_call_round_trip(tool_lm_server):
    with sdk_for(tool_lm_server.url, "x") as client:
        first = client.responses.create(model="tool-lm", input=WEATHER_QUESTION, tools=[WEATHER_FUNCTION],
                                        temperature=0)
        (call,) = first.output
        assert call.type == "function_call" and call.name == "get_weather"
        assert json.loads(call.arguments) == CALL_ARGUMENTS
        second = client.responses.create(
            model="tool-lm", previous_response_id=first.id, tools=[WEATHER_FUNCTION], temperature=0,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": TOOL_RESULT}],
        )
        assert second.output_text == FINAL_ANSWER
        with client.responses.stream(model="tool-lm", input=WEATHER_QUESTION, tools=[WEATHER_FUNCTION],
                                     temperature=0) as stream:
            kinds = [e.type for e in stream]
            streamed = stream.get_final_response()
        assert "response.function_call_arguments.delta" in kinds
        (streamed_call,) = streamed.output
        assert streamed_call.name == "get_weather" and json.loads(streamed_call.arguments) == CALL_ARGUMENTS

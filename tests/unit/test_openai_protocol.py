"""OpenAI wire models and the serving layer's translation, without a model.

The chat runs here are scripted: they replay ChatEvents as the engine and an output parser
would produce them, so that the wire shapes (including failures after the first byte) can be
checked exactly; real generation is covered in tests/api and tests/e2e.
"""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import ValidationError

from glm_api.errors import BadRequestError
from glm_api.families.base import ToolCall, ToolCallPart
from glm_api.protocol.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from glm_api.protocol.tokenizer import TokenizeRequest
from glm_api.serving.chat import ChatEvent, ChatRun
from glm_api.serving.structured import tool_call_constraint, with_json_instruction
from glm_api.serving.openai_chat import ChatPlan, chat_response, chat_stream
from glm_api.serving.openai_chat_call import _offered_tools, call_with, openai_messages
from glm_api.serving.openai_completions import _prompts
from glm_api.serving.openai_embeddings import base64_floats, shorten
from glm_api.serving.sse import _framed

USER = [{"role": "user", "content": "hi"}]


def chat_request(**body) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": USER, **body})


class ScriptedRun(ChatRun):
    """A ChatRun that replays events instead of running an engine."""

    def __init__(self, events: list[ChatEvent], n: int = 1) -> None:
        self.model = "m"
        self.prompt_tokens = 7
        self.cached_tokens = 3
        self._streams = [None] * n
        self._events = events

    def abort(self) -> None:
        pass

    async def events(self):
        for event in self._events:
            await asyncio.sleep(0)
            yield event


def plan(events: list[ChatEvent], n: int = 1, **kw) -> ChatPlan:
    return ChatPlan(
        run=ScriptedRun(events, n), n=n, id="chatcmpl-x", created=1, fingerprint="fp_1", include_usage=True, **kw
    )


async def drain(stream) -> list[dict]:
    return [json.loads(e["data"]) if e["data"] != "[DONE]" else "[DONE]" async for e in _framed(stream, "req-1")]


# ---------------------------------------------------------------------------------------------
# Requests


def test_unknown_fields_and_nulls_are_accepted():
    req = chat_request(temperature=None, top_p=None, n=None, stop=None, seed=None, store=True, metadata={"a": 1})
    call = call_with(req, openai_messages(req.messages), None)
    assert (call.temperature, call.top_p, call.n, call.stop, call.repetition_penalty) == (1.0, 1.0, 1, [], 1.0)


def test_max_completion_tokens_wins_over_max_tokens():
    req = chat_request(max_tokens=50, max_completion_tokens=5, presence_penalty=0.5, frequency_penalty=-0.5, top_k=3)
    call = call_with(req, [], None)
    assert (call.max_tokens, call.presence_penalty, call.frequency_penalty, call.top_k) == (5, 0.5, -0.5, 3)


@pytest.mark.parametrize(
    "body",
    [
        {"temperature": 2.01},
        {"top_p": 0},
        {"n": 0},
        {"max_tokens": 0},
        {"presence_penalty": -2.5},
        {"top_logprobs": 3},
        {"logprobs": True, "top_logprobs": 21},
        {"logprobs": True, "top_logprobs": -1},
        {"logit_bias": {"1": 1}},
        {"response_format": {"type": "json_schema", "json_schema": {}}},
        {"tool_choice": "sometimes"},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": []},
    ],
)
def test_invalid_chat_requests(body):
    with pytest.raises(ValidationError):
        chat_request(**body)


def test_messages_become_internal_dicts():
    req = chat_request(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "ann"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        ]
    )
    system, user, assistant, tool = openai_messages(req.messages)
    assert system == {"role": "system", "content": "Be brief."}
    assert user == {"role": "user", "content": "a\nb"}
    assert assistant["tool_calls"] == [ToolCall("f", '{"x": 1}', "call_1")] and assistant["content"] == ""
    assert tool == {"role": "tool", "content": "42", "name": "f", "tool_call_id": "call_1"}


@pytest.mark.parametrize(
    "message",
    [
        {"role": "user"},
        {"role": "system", "content": None},
        {"role": "developer"},
        {"role": "tool", "tool_call_id": "call_1"},
        {"role": "assistant", "content": None},
        {"role": "assistant", "tool_calls": []},
    ],
)
def test_a_message_without_content_is_refused_naming_its_index(message):
    req = chat_request(messages=[*USER, message])  # valid on the wire: the contract is checked in serving
    with pytest.raises(BadRequestError) as caught:
        openai_messages(req.messages)
    assert (caught.value.param, caught.value.code) == ("messages[1].content", "missing_required_parameter")
    assert "required" in caught.value.message


def test_content_may_be_left_out_where_openai_allows_it():
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    req = chat_request(messages=[*USER, {"role": "assistant", "tool_calls": [call]}, {"role": "function", "name": "f"}])
    assert [m["content"] for m in openai_messages(req.messages)] == ["hi", "", ""]


def test_json_instruction_joins_the_system_message_or_leads():
    assert with_json_instruction([{"role": "user", "content": "x"}])[0]["role"] == "system"
    merged = with_json_instruction([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}])
    assert len(merged) == 2 and merged[0]["content"].startswith("Be brief.") and "JSON" in merged[0]["content"]


def test_tool_choice_selects_the_offered_tools():
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("a", "b")]
    assert [t["function"]["name"] for t in _offered_tools(chat_request(tools=tools))] == ["a", "b"]
    assert _offered_tools(chat_request(tools=tools, tool_choice="none")) is None
    named = chat_request(tools=tools, tool_choice={"type": "function", "function": {"name": "b"}})
    assert [t["function"]["name"] for t in _offered_tools(named)] == ["b"]


def test_completion_and_embedding_inputs():
    assert _prompts(CompletionRequest(prompt="x")) == ["x"]
    assert _prompts(CompletionRequest(prompt=[1, 2])) == [[1, 2]]
    assert _prompts(CompletionRequest(prompt=[[1], [2]])) == [[1], [2]]
    assert _prompts(CompletionRequest(prompt=["a", "b"])) == ["a", "b"]
    for bad in ([], [[]], ["a", [1]], [-1], 3, [True]):
        with pytest.raises(ValidationError):
            EmbeddingRequest(input=bad)
    with pytest.raises(ValidationError):
        CompletionRequest(prompt="x", best_of=2)
    assert EmbeddingRequest(input="x").encoding_format == "float"


def test_tokenize_takes_prompt_or_messages():
    assert TokenizeRequest(prompt="x").prompt == "x"
    tool = {"type": "function", "function": {"name": "f"}}
    for bad in ({}, {"prompt": "x", "messages": USER}, {"prompt": "x", "tools": [tool]}):
        with pytest.raises(ValidationError):
            TokenizeRequest.model_validate(bad)


# ---------------------------------------------------------------------------------------------
# Responses and chunks


def test_tool_call_response_shape():
    call = ToolCall("get_weather", '{"city": "Paris"}')
    events = [ChatEvent(0, "", "tool_calls", [call], 7, 12)]
    body = asyncio.run(chat_response(plan(events))).model_dump()
    parsed = ChatCompletion.model_validate(body)
    message = parsed.choices[0].message
    assert message.content is None and parsed.choices[0].finish_reason == "tool_calls"
    assert message.tool_calls[0].id.startswith("call_") and message.tool_calls[0].function.arguments == call.arguments
    assert body["usage"] == {
        "prompt_tokens": 7, "completion_tokens": 12, "total_tokens": 19, "prompt_tokens_details": {"cached_tokens": 3},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def test_stream_shape_with_two_choices_tool_calls_and_usage():
    events = [
        ChatEvent(0, "Hel", None, [], 7, 1),
        ChatEvent(1, "", "tool_calls", [ToolCall("f", "{}"), ToolCall("g", '{"a": 1}')], 7, 5,
                  tool_parts=[ToolCallPart(0, "f", "{}"), ToolCallPart(1, "g", '{"a": 1}')]),
        ChatEvent(0, "lo", "stop", [], 7, 2),
    ]
    out = asyncio.run(drain(chat_stream(plan(events, n=2))))
    assert out[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(e) for e in out[:-1]]
    assert {c.id for c in chunks} == {"chatcmpl-x"}
    assert [(c.choices[0].index, c.choices[0].delta.role) for c in chunks[:2]] == [(0, "assistant"), (1, "assistant")]
    calls = [tc for c in chunks for ch in c.choices if ch.index == 1 for tc in (ch.delta.tool_calls or [])]
    assert [(tc.index, tc.function.name, tc.type) for tc in calls] == [(0, "f", "function"), (1, "g", "function")]
    finish = {ch.index: ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason}
    assert finish == {0: "stop", 1: "tool_calls"}
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices if ch.index == 0)
    assert text == "Hello"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert out[1]["choices"][0]["delta"] == {"role": "assistant", "content": ""}  # only the keys it carries


def test_a_forced_tool_calls_json_comes_back_as_tool_calls():
    events = [ChatEvent(0, '{"name": "f", "arguments": {"a": 1}}', "stop", [], 7, 9)]
    body = asyncio.run(chat_response(plan(events, forced_tool=True)))
    choice = body.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [("f", {"a": 1})]
    out = asyncio.run(drain(chat_stream(plan(events, forced_tool=True))))
    deltas = [e["choices"][0]["delta"] for e in out[:-1] if e["choices"]]
    assert not any(d.get("content") for d in deltas)
    assert [d["tool_calls"][0]["function"]["name"] for d in deltas if "tool_calls" in d] == ["f"]
    # Cut by max_tokens before it closed: what was written, as content, with "length".
    cut = [ChatEvent(0, '{"name": "f", "argu', "length", [], 7, 3)]
    body = asyncio.run(chat_response(plan(cut, forced_tool=True)))
    assert body.choices[0].finish_reason == "length" and body.choices[0].message.content == '{"name": "f", "argu'


def test_the_forced_tool_schema_is_one_call_of_an_offered_tool():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
             {"type": "function", "function": {"name": "g"}}]
    schema = json.loads(tool_call_constraint(tools).spec)
    assert [s["properties"]["name"]["const"] for s in schema["anyOf"]] == ["f", "g"]
    assert all(s["required"] == ["name", "arguments"] for s in schema["anyOf"])
    single = json.loads(tool_call_constraint(tools[:1]).spec)
    # Arguments name only what the tool names: an object without properties takes {} (strict rule).
    assert single["properties"]["arguments"] == {"type": "object", "additionalProperties": False}


def test_base64_is_what_the_sdk_decodes():
    vector = np.array([0.5, -1.25, 3.0e-8, 7.0], dtype=np.float32)
    encoded = base64_floats(vector)
    # openai-python: np.frombuffer(base64.b64decode(data), dtype="float32")
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(encoded), dtype="float32"), vector)


def test_shorten_truncates_and_renormalises():
    vectors = np.array([[3.0, 4.0, 12.0], [1.0, 0.0, 5.0]], dtype=np.float32)
    short = shorten(vectors, 2)
    np.testing.assert_allclose(short, [[0.6, 0.8], [1.0, 0.0]], atol=1e-6)

"""LangChain's ``ChatOpenAI(use_responses_api=True)`` against the real server, changing only the
base URL: invoke, stream, a conversation with history, usage, structured output (JSON schema,
JSON mode, function calling), forced tool calls, and an agent's tool round trip on a tiny model
trained to call a tool."""

from __future__ import annotations

import json

import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from glm_api.registry import PACKAGED_CHAT_NAME
from tests.e2e.conftest import RESPONSES_KEYS
from tests.fixtures.tool_calling_lm import CALL_ARGUMENTS, FINAL_ANSWER, TOOL_RESULT, WEATHER_TOOL
from tests.fixtures.tool_calling_lm import QUESTION as WEATHER_QUESTION

pytestmark = pytest.mark.e2e

QUESTION = "What is the capital of France?"


def responses_llm(url: str, model: str = PACKAGED_CHAT_NAME, key: str = RESPONSES_KEYS[0], **extra) -> ChatOpenAI:
    return ChatOpenAI(model=model, base_url=f"{url}/v1", api_key=key, use_responses_api=True, temperature=0,
                      max_retries=0, **{"max_tokens": 32, **extra})


class Capital(BaseModel):
    """The capital city of a country."""

    city: str = Field(description="the city", max_length=12)


def test_invoke_stream_and_a_conversation(responses_server):
    llm = responses_llm(responses_server.url)
    answer = llm.invoke(QUESTION)
    assert answer.text and answer.response_metadata["status"] in ("completed", "incomplete")
    assert answer.response_metadata["id"].startswith("resp_")
    usage = answer.usage_metadata
    assert usage["output_tokens"] > 0 and usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    chunks = list(llm.stream(QUESTION))
    assert len([c for c in chunks if c.text]) > 1
    assert "".join(c.text for c in chunks) == answer.text
    assert sum(c.usage_metadata["output_tokens"] for c in chunks if c.usage_metadata) == usage["output_tokens"]
    # History as LangChain replays it: system, the earlier answer (with its item ids), a new turn.
    follow = llm.invoke([("system", "Be brief."), ("human", QUESTION), answer, ("human", "And of Italy?")])
    assert follow.text
    again = llm.invoke([("system", "Be brief."), ("human", QUESTION), ("ai", answer.text), ("human", "And of Italy?")])
    assert again.text == follow.text


def test_structured_output(responses_server):
    llm = responses_llm(responses_server.url, max_tokens=40)
    for method in ("json_schema", "function_calling"):
        result = llm.with_structured_output(Capital, method=method).invoke(QUESTION)
        assert isinstance(result, Capital) and result.city, method
    streamed = list(llm.with_structured_output(Capital).stream(QUESTION))
    assert isinstance(streamed[-1], Capital)
    raw = llm.with_structured_output(None, method="json_mode").invoke(
        "Give the name and capital of France as JSON with keys name and capital."
    )
    assert isinstance(raw, dict)


def test_forced_tool_calls_and_the_message_history_they_make(responses_server):
    llm = responses_llm(responses_server.url, max_tokens=48)
    for choice in ("any", "get_weather"):
        message = llm.bind_tools([WEATHER_TOOL], tool_choice=choice).invoke("Weather in Paris?")
        (call,) = message.tool_calls
        assert call["name"] == "get_weather" and set(call["args"]) == {"city"} and call["id"].startswith("call_")
    history = [("human", "Weather in Paris?"), message,
               {"role": "tool", "content": TOOL_RESULT, "tool_call_id": message.tool_calls[0]["id"]}]
    # Tools offered with tool_choice auto: SmolLM2's chat format has none, so it answers in text.
    assert llm.bind_tools([WEATHER_TOOL], tool_choice="none").invoke(history).text


def test_an_agent_round_trip_on_a_model_trained_to_call_the_tool(tool_lm_server):
    llm = responses_llm(tool_lm_server.url, model="tool-lm", key="x", max_tokens=48).bind_tools([WEATHER_TOOL])
    asked = [("human", WEATHER_QUESTION)]
    message = llm.invoke(asked)
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and call["args"] == CALL_ARGUMENTS
    answer = llm.invoke([*asked, message, {"role": "tool", "content": TOOL_RESULT, "tool_call_id": call["id"]}])
    assert answer.text == FINAL_ANSWER
    streamed = list(llm.stream(asked))
    calls = [c for chunk in streamed for c in chunk.tool_call_chunks]
    assert calls and json.loads("".join(c["args"] or "" for c in calls)) == CALL_ARGUMENTS


def test_repeated_roles_async_calls_and_batches(responses_server):
    import asyncio

    llm = responses_llm(responses_server.url, max_tokens=8)
    doubled = [("system", "hello"), ("system", "hello"), ("human", "hello"), ("human", "hello"), ("ai", "hello"),
               ("ai", "hello"), ("human", "how are you")]
    assert llm.invoke(doubled).text

    async def run():
        answer = await llm.ainvoke("Hello")
        chunks = [c async for c in llm.astream("Hello")]
        return answer, chunks

    answer, chunks = asyncio.run(run())
    assert answer.text == "".join(c.text for c in chunks)
    assert answer.response_metadata["model_name"] == PACKAGED_CHAT_NAME
    assert [m.text for m in llm.batch(["Hello", "Hey"])][0] == answer.text

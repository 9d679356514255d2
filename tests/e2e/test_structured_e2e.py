"""Structured outputs as clients ask for them, on the default model through the real server:
the SDK's ``parse()``, LangChain's ``with_structured_output`` (both methods) and ``bind_tools``
with a forced tool. SmolLM2's chat format has no tool syntax: forced calls still come back."""

from __future__ import annotations

import json

import pytest
from langchain_openai import ChatOpenAI
from openai import OpenAI
from pydantic import BaseModel, Field

from glm_api.registry import PACKAGED_CHAT_NAME

pytestmark = pytest.mark.e2e


class City(BaseModel):
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)
    population_millions: int = Field(ge=0, le=100)


class GetWeather(BaseModel):
    """Get the current weather in a city."""

    city: str = Field(max_length=30)
    unit: str = Field(pattern="^(celsius|fahrenheit)$")


def test_sdk_parse_returns_the_pydantic_object(live_server):
    sdk = OpenAI(base_url=f"{live_server.url}/v1", api_key="x", max_retries=0)
    completion = sdk.chat.completions.parse(
        model=PACKAGED_CHAT_NAME, messages=[{"role": "user", "content": "Describe Paris."}], response_format=City,
        temperature=0, max_tokens=120,
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, City) and parsed.name


class Capital(BaseModel):
    city: str
    country: str
    population_millions: float


def test_sdk_parse_with_an_unbounded_float_ends(live_server):
    """The issue's call: an unconstrained ``float`` used to run ``111222222222223333...`` into
    LengthFinishReasonError; the grammar now ends a number after 17 digits (10 after the point)."""
    sdk = OpenAI(base_url=f"{live_server.url}/v1", api_key="x", max_retries=0)
    completion = sdk.chat.completions.parse(
        model=PACKAGED_CHAT_NAME, messages=[{"role": "user", "content": "What is the capital of France?"}],
        response_format=Capital, temperature=0, max_tokens=120,
    )
    assert completion.choices[0].finish_reason == "stop"
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Capital) and parsed.city


def test_langchain_json_mode_prompt_ends_as_one_json_object(live_server):
    """LangChain's standard ``test_json_mode`` prompt: greedy, the default model nests
    ``{"setup":{"setup":...`` as deep as it may; the depth bound (16) makes it close."""
    sdk = OpenAI(base_url=f"{live_server.url}/v1", api_key="x", max_retries=0)
    answer = sdk.chat.completions.create(
        model=PACKAGED_CHAT_NAME, temperature=0, max_tokens=256, response_format={"type": "json_object"},
        messages=[{"role": "user",
                   "content": "Tell me a joke about cats. Answer in JSON with 'setup' and 'punchline' keys."}],
    )
    assert answer.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(live_server, method):
    llm = ChatOpenAI(model=PACKAGED_CHAT_NAME, base_url=f"{live_server.url}/v1", api_key="x", temperature=0,
                     max_tokens=120, max_retries=0)
    result = llm.with_structured_output(City, method=method).invoke("Describe Paris.")
    assert isinstance(result, City) and result.name


def test_a_forced_named_tool_on_a_model_without_tool_syntax(live_server):
    llm = ChatOpenAI(model=PACKAGED_CHAT_NAME, base_url=f"{live_server.url}/v1", api_key="x", temperature=0,
                     max_tokens=120, max_retries=0)
    message = llm.bind_tools([GetWeather], tool_choice="GetWeather").invoke("What is the weather in Paris?")
    (call,) = message.tool_calls
    assert call["name"] == "GetWeather"
    GetWeather.model_validate(call["args"])
    # The raw API says the same: tool_calls, finish_reason tool_calls, arguments as JSON text.
    sdk = OpenAI(base_url=f"{live_server.url}/v1", api_key="x", max_retries=0)
    schema = GetWeather.model_json_schema()
    answer = sdk.chat.completions.create(
        model=PACKAGED_CHAT_NAME, messages=[{"role": "user", "content": "Weather in Rome?"}], temperature=0,
        max_tokens=120, tools=[{"type": "function", "function": {"name": "get_weather", "parameters": schema}}],
        tool_choice="required",
    )
    assert answer.choices[0].finish_reason == "tool_calls"
    GetWeather.model_validate(json.loads(answer.choices[0].message.tool_calls[0].function.arguments))

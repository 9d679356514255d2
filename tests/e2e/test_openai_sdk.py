"""The official openai SDK against real uvicorn on 127.0.0.1, changing only the base URL.

``live_server`` serves the packaged SmolLM2 and all-MiniLM-L6-v2. Two small extra servers
are started here, in parallel: one with API keys and a single chat slot (401 and 429), and
one serving a tiny model trained to call a tool (tool-call round trip).
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from glm_api.registry import PACKAGED_CHAT_NAME, PACKAGED_EMBEDDING_NAME
from tests.e2e.conftest import NO_KERNEL_TIMING, start_server, stop_server
from tests.fixtures.tool_calling_lm import (
    CALL_ARGUMENTS,
    FINAL_ANSWER,
    TOOL_RESULT,
    WEATHER_TOOL,
)
from tests.fixtures.tool_calling_lm import (
    QUESTION as WEATHER_QUESTION,
)

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
KEY = "test-key-1"


def sdk_for(url: str, key: str = "x") -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def sdk(live_server):
    with sdk_for(live_server.url) as client:
        yield client


@pytest.fixture(scope="module")
def extra_servers(smollm2_cache_dir, tool_calling_lm_dir, tmp_path_factory):
    """(guarded one-slot SmolLM2 server, tool-calling server), started side by side."""
    logs = tmp_path_factory.mktemp("openai-e2e")
    guarded = [
        "--cache-dir",
        str(smollm2_cache_dir),
        "--max-running",
        "1",
        "--max-waiting",
        "0",
        "--api-key",
        KEY,
        "--shutdown-grace-seconds",
        "0",
        *NO_KERNEL_TIMING,
    ]
    tools = ["--chat-model", str(tool_calling_lm_dir), "--chat-model-name", "tool-lm", *NO_KERNEL_TIMING]
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(start_server, guarded, logs / "guarded.log"),
            pool.submit(start_server, tools, logs / "tools.log"),
        ]
    servers = [f.result() for f in futures if f.exception() is None]
    if len(servers) < 2:
        for server in servers:
            stop_server(server)
        raise next(f.exception() for f in futures if f.exception() is not None)
    yield servers
    for server in servers:
        stop_server(server)


# ---------------------------------------------------------------------------------------------
# Chat


def test_chat_non_streamed_and_streamed(sdk):
    answer = sdk.chat.completions.create(model=PACKAGED_CHAT_NAME, messages=QUESTION, temperature=0, max_tokens=8)
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].message.content
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens

    stream = sdk.chat.completions.create(
        model=PACKAGED_CHAT_NAME,
        messages=QUESTION,
        temperature=0,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


def test_async_client_streams_as_tokens_are_generated(live_server):
    story = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]

    async def scenario() -> list[tuple[float, str]]:
        async with AsyncOpenAI(base_url=f"{live_server.url}/v1", api_key="x", max_retries=0) as client:
            started = time.monotonic()
            stream = await client.chat.completions.create(
                model=PACKAGED_CHAT_NAME, messages=story, temperature=0, max_tokens=12, stream=True
            )
            return [(time.monotonic() - started, c.choices[0].delta.content or "") async for c in stream]

    times = [t for t, text in asyncio.run(scenario()) if text]
    assert len(times) > 3
    assert times[0] < 0.5 * times[-1], times  # streamed as generated, not buffered


def test_n_choices_seed_and_stop(sdk):
    def sampled():
        return sdk.chat.completions.create(
            model=PACKAGED_CHAT_NAME, messages=QUESTION, temperature=1.0, max_tokens=5, n=2, seed=99
        )

    first, again = sampled(), sampled()
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in again.choices] == [c.message.content for c in first.choices]
    stopped = sdk.chat.completions.create(
        model=PACKAGED_CHAT_NAME, messages=QUESTION, temperature=0, max_tokens=10, stop=["Paris"]
    )
    assert stopped.choices[0].finish_reason == "stop" and "Paris" not in stopped.choices[0].message.content


def test_legacy_completion(sdk):
    done = sdk.completions.create(
        model=PACKAGED_CHAT_NAME, prompt="The capital of France is", max_tokens=3, temperature=0
    )
    assert done.object == "text_completion" and done.choices[0].text and done.choices[0].finish_reason == "length"


# ---------------------------------------------------------------------------------------------
# Embeddings and models


def test_embeddings_base64_default_and_float_equal_the_seed_route(sdk, live_server):
    texts = ["The cat sits on the mat.", "A kitten rests on a rug."]
    default = sdk.embeddings.create(model=PACKAGED_EMBEDDING_NAME, input=texts)  # the SDK asks for base64
    floats = sdk.embeddings.create(model=PACKAGED_EMBEDDING_NAME, input=texts, encoding_format="float")
    seed = httpx.post(f"{live_server.url}/embedding", json={"prompt": texts}, timeout=60).json()["data"]
    a = np.array([d.embedding for d in default.data], dtype=np.float32)
    b = np.array([d.embedding for d in floats.data], dtype=np.float32)
    np.testing.assert_array_equal(a, np.array(seed, dtype=np.float32))
    np.testing.assert_array_equal(a, b)
    assert default.usage.prompt_tokens == floats.usage.prompt_tokens > 0


def test_models_listing(sdk):
    ids = {m.id for m in sdk.models.list()}
    assert ids == {PACKAGED_CHAT_NAME, PACKAGED_EMBEDDING_NAME}
    assert sdk.models.retrieve(PACKAGED_CHAT_NAME).id == PACKAGED_CHAT_NAME


# ---------------------------------------------------------------------------------------------
# Errors, as the SDK's exception classes


def test_bad_request_and_not_found(sdk):
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model=PACKAGED_CHAT_NAME, messages=QUESTION, temperature=3)
    assert info.value.status_code == 400 and info.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        sdk.embeddings.create(model=PACKAGED_EMBEDDING_NAME, input="word " * 400)
    assert info.value.param == "input"
    with pytest.raises(openai.NotFoundError) as info:
        sdk.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=1)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("text-embedding-3-small")


def _fail_second_step(runner):
    """Make the model runner's second step raise (a failure after the stream started), whichever
    forward it runs (the general step, transformers' forward or the direct decode forward, which
    calls no module hooks). Returns a function that puts the runner back."""
    execute, calls = runner.execute, [0]

    def failing(scheduled):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("injected failure")
        return execute(scheduled)

    runner.execute = failing
    return lambda: vars(runner).pop("execute", None)


def test_error_after_the_stream_started_raises_in_the_sdk(smollm2):
    """A step that fails after the 200 reaches the client as an error event, which the SDK raises."""
    from fastapi.testclient import TestClient

    from glm_api.app import create_app
    from tests.conftest import make_registry, make_settings

    settings = make_settings()
    registry = make_registry(smollm2, {}, settings)
    restore = _fail_second_step(registry.chat.runner)
    try:
        with TestClient(create_app(settings, registry)) as client:
            sdk = OpenAI(base_url="http://testserver/v1", api_key="x", max_retries=0, http_client=client)
            stream = sdk.chat.completions.create(
                model=registry.chat.model_name, messages=QUESTION, temperature=0, max_tokens=40, stream=True
            )
            received = []
            with pytest.raises(openai.APIError) as info:
                for chunk in stream:
                    received.append(chunk)
    finally:
        restore()
    assert received and received[0].choices[0].delta.role == "assistant"  # the stream had started
    assert "generation failed" in info.value.message


def test_authentication_and_rate_limit(extra_servers):
    guarded, _ = extra_servers
    with sdk_for(guarded.url, "wrong-key") as stranger, pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    with sdk_for(guarded.url, KEY) as client:
        story = [{"role": "user", "content": "Write a long story about a dragon."}]
        holder = client.chat.completions.create(
            model=PACKAGED_CHAT_NAME, messages=story, max_tokens=300, temperature=0, stream=True
        )
        try:
            # Wait for a token, not just the first chunk: the engine may be prefilling it still.
            next(c for c in holder if c.choices and c.choices[0].delta.content)
            with pytest.raises(openai.RateLimitError) as info:
                client.chat.completions.create(model=PACKAGED_CHAT_NAME, messages=QUESTION, max_tokens=1)
            assert info.value.response.headers.get("retry-after")
        finally:
            holder.close()


# ---------------------------------------------------------------------------------------------
# Tool calling round trip


def get_weather(city: str) -> str:
    """The client-side tool: it runs here, never on the server."""
    assert city == "Paris"
    return TOOL_RESULT


def test_tool_call_round_trip(extra_servers):
    _, tool_server = extra_servers
    messages: list = [{"role": "user", "content": WEATHER_QUESTION}]
    with sdk_for(tool_server.url) as client:
        first = client.chat.completions.create(model="tool-lm", messages=messages, tools=[WEATHER_TOOL], temperature=0)
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == CALL_ARGUMENTS
        messages.append(choice.message.model_dump(exclude_none=True))
        messages.append(
            {"role": "tool", "tool_call_id": call.id, "content": get_weather(**json.loads(call.function.arguments))}
        )
        final = client.chat.completions.create(model="tool-lm", messages=messages, tools=[WEATHER_TOOL], temperature=0)
        assert final.choices[0].message.content == FINAL_ANSWER and final.choices[0].finish_reason == "stop"

        streamed = client.chat.completions.create(
            model="tool-lm", messages=messages[:1], tools=[WEATHER_TOOL], temperature=0, stream=True
        )
        deltas = [tc for c in streamed for tc in (c.choices[0].delta.tool_calls or [])]
        assert [(d.index, d.type, d.function.name) for d in deltas] == [(0, "function", "get_weather")]
        assert json.loads(deltas[0].function.arguments) == CALL_ARGUMENTS and deltas[0].id.startswith("call_")

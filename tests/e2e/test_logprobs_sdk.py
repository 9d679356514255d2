"""Log-probabilities through the official openai SDK against real uvicorn (the packaged SmolLM2):
the SDK's own types and stream helpers read them."""

from __future__ import annotations

import pytest
from openai import OpenAI
from openai.types.chat.chat_completion_token_logprob import ChatCompletionTokenLogprob

from glm_api.registry import PACKAGED_CHAT_NAME
from tests.e2e.test_openai_sdk import QUESTION, sdk_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def sdk(live_server):
    with sdk_for(live_server.url) as client:
        yield client


def test_chat_logprobs_parse_in_the_sdk(sdk: OpenAI):
    response = sdk.chat.completions.create(
        model=PACKAGED_CHAT_NAME,
        messages=QUESTION, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3,
    )
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        assert isinstance(entry, ChatCompletionTokenLogprob)
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy: the most likely token
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert bytes(entry.bytes).decode() == entry.token

    # Streamed: the SDK's chunk types, then its stream helper that gathers them.
    chunks = list(sdk.chat.completions.create(
        model=response.model, messages=QUESTION, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3, stream=True,
    ))
    streamed = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    # The stream helper parses the final message, which it refuses for a length-cut answer:
    # let this one end on its stop token (SmolLM2 answers in about 8 tokens).
    whole = sdk.chat.completions.create(
        model=response.model, messages=QUESTION, max_tokens=64, temperature=0, logprobs=True, top_logprobs=1,
    )
    assert whole.choices[0].finish_reason == "stop"
    with sdk.chat.completions.stream(
        model=response.model, messages=QUESTION, max_tokens=64, temperature=0, logprobs=True, top_logprobs=1,
    ) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_completion()
    assert "logprobs.content.delta" in events and "logprobs.content.done" in events
    gathered = final.choices[0].logprobs.content
    assert [e.token for e in gathered] == [e.token for e in whole.choices[0].logprobs.content]
    assert gathered[-1].token == "<|im_end|>"  # the stop token is reported, not shown
    assert final.choices[0].message.content == whole.choices[0].message.content


def test_completions_score_a_prompt_through_the_sdk(sdk: OpenAI):
    model = PACKAGED_CHAT_NAME
    prompt = "The capital of France is Paris."
    out = sdk.completions.create(model=model, prompt=prompt, echo=True, max_tokens=0, logprobs=1)
    choice = out.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert "".join(choice.logprobs.tokens) == prompt
    assert choice.logprobs.token_logprobs[0] is None
    assert all(v <= 0 for v in choice.logprobs.token_logprobs[1:])
    assert choice.logprobs.text_offset[0] == 0 and out.usage.completion_tokens == 0

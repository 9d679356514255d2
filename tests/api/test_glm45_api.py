"""GLM-4.5-style models through the API: thinking, template options, native forced tool calls.

Tiny random ``glm4_moe`` (GLM-4.5 call style) and ``glm4`` (GLM-4.7 call style) checkpoints with
the GLM-4.5-style template (tests/fixtures/glm45_tiny.py), loaded by the real start-up path.
What a reply should be is computed here from the model itself: the raw greedy continuation of
the same prompt ids (``/v1/completions`` takes them as they are, nothing parsed out).
"""

from __future__ import annotations

import json

import jsonschema
import pytest
from fastapi.testclient import TestClient

from glm_api.app import create_app
from glm_api.registry import build_registry
from tests.api.test_seed_api import sse_events
from tests.conftest import make_settings
from tests.fixtures.glm45_tiny import build_tiny_glm45

QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1,
                                                                             "maximum": 7},
                           "unit": {"enum": ["C", "F"]}},
            "required": ["city", "days", "unit"],
        },
    },
}
OTHER = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module", params=[("glm4_moe", "4.5"), ("glm4", "4.7")], ids=["glm4_moe", "glm4"])
def client(request, tmp_path_factory):
    model_type, style = request.param
    folder = build_tiny_glm45(tmp_path_factory.mktemp(f"{model_type}-think"), model_type, style)
    settings = make_settings(chat_model=str(folder), chat_model_name="glm", device="cpu",
                             cache_dir=tmp_path_factory.mktemp("cache"))
    with TestClient(create_app(settings, build_registry(settings))) as test_client:
        yield test_client


def template(client):
    return client.app.state.glm.services.registry.chat.template


def raw_continuation(client, prompt_ids: list[int], max_tokens: int) -> str:
    out = client.post("/v1/completions", json={"prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0})
    assert out.status_code == 200, out.text
    return out.json()["choices"][0]["text"]


def chat(client, **body):
    response = client.post("/v1/chat/completions", json={"messages": QUESTION, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response


def test_unclosed_thinking_is_reasoning_with_empty_content(client):
    ids = template(client).encode_messages(QUESTION)
    assert template(client).prompt_opens_thinking(ids)
    raw = raw_continuation(client, ids, 16)
    assert "</think>" not in raw  # the random model never closes it (fixed seed)
    body = chat(client, max_tokens=16).json()
    message = body["choices"][0]["message"]
    assert message["content"] == "" and message["tool_calls"] is None
    assert message["reasoning_content"] == message["reasoning"] == raw.strip()
    usage = body["usage"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == usage["completion_tokens"] == 16

    response = chat(client, max_tokens=16, stream=True, stream_options={"include_usage": True})
    events = [e for e in sse_events(response) if e != "[DONE]"]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == raw.strip()
    assert all(d.get("reasoning_content") == d.get("reasoning") for d in deltas)
    assert not any(d.get("content") for d in deltas)
    assert events[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] == 16


@pytest.mark.parametrize("switch", [{"chat_template_kwargs": {"enable_thinking": False}}, {"reasoning_effort": "none"}])
def test_thinking_off_is_content(client, switch):
    ids = template(client).encode_messages(QUESTION, options={"enable_thinking": False})
    assert not template(client).prompt_opens_thinking(ids)
    raw = raw_continuation(client, ids, 12)
    body = chat(client, max_tokens=12, **switch).json()
    message = body["choices"][0]["message"]
    assert body["usage"]["prompt_tokens"] == len(ids)  # the template's own no-thinking prompt
    assert message["reasoning_content"] is None and message["reasoning"] is None
    assert message["content"] == raw.lstrip() and message["content"]
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
    events = [e for e in sse_events(chat(client, max_tokens=12, stream=True, **switch)) if e != "[DONE]"]
    deltas = [e["choices"][0]["delta"] for e in events]
    assert "".join(d.get("content", "") for d in deltas) == message["content"]
    assert not any("reasoning_content" in d for d in deltas)


def test_reasoning_effort_keeps_thinking_on_and_options_reach_the_template(client):
    thinking = template(client).encode_messages(QUESTION)
    assert chat(client, max_tokens=1, reasoning_effort="high").json()["usage"]["prompt_tokens"] == len(thinking)
    # An explicit option wins over reasoning_effort.
    body = chat(client, max_tokens=1, reasoning_effort="high", chat_template_kwargs={"enable_thinking": False}).json()
    assert body["usage"]["prompt_tokens"] == len(template(client).encode_messages(QUESTION,
                                                                                 options={"enable_thinking": False}))


def test_tokenize_counts_what_the_chat_request_costs(client):
    for options in (None, {"enable_thinking": False}):
        counted = client.post("/v1/tokenize", json={"messages": QUESTION, "chat_template_kwargs": options}).json()
        extra = {"chat_template_kwargs": options} if options else {}
        assert counted["count"] == chat(client, max_tokens=1, **extra).json()["usage"]["prompt_tokens"]
        assert counted["tokens"] == template(client).encode_messages(QUESTION, options=options)


def test_reserved_or_broken_template_options_are_400(client):
    for options in ({"add_generation_prompt": False}, {"tools": []}):
        response = client.post("/v1/chat/completions", json={"messages": QUESTION, "chat_template_kwargs": options})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "chat_template_kwargs"
    response = client.post("/v1/chat/completions", json={"messages": QUESTION, "reasoning_effort": "extreme"})
    assert response.status_code == 400


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_forced_tool_is_a_call_valid_for_its_schema(client, stream):
    body = {"max_tokens": 80, "tools": [WEATHER, OTHER], "stream": stream,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    response = chat(client, **body)
    if stream:
        events = [e for e in sse_events(response) if e != "[DONE]"]
        deltas = [e["choices"][0]["delta"] for e in events]
        parts = [tc for d in deltas for tc in d.get("tool_calls") or []]
        assert parts[0]["function"]["name"] == "get_weather" and parts[0]["id"].startswith("call_")
        assert all("name" not in p["function"] and "id" not in p for p in parts[1:])  # name before arguments
        arguments = "".join(p["function"]["arguments"] for p in parts)
        finish = events[-1]["choices"][0]["finish_reason"]
        assert not any(d.get("content") or d.get("reasoning_content") for d in deltas)
    else:
        message = response.json()["choices"][0]["message"]
        assert message["content"] is None and message["reasoning_content"] is None
        (call,) = message["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        arguments, finish = call["function"]["arguments"], response.json()["choices"][0]["finish_reason"]
    assert finish == "tool_calls"
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])


def test_the_forced_call_grammar_takes_the_call_as_the_template_writes_it(client):
    """The constraint is the model's own syntax: a call rendered by the template (in history) is
    a complete match of it, token for token."""
    import llguidance

    from glm_api.engines.base import Constraint
    from glm_api.serving.structured import native_tool_call_constraint

    tpl = template(client)
    arguments = {"city": "Paris", "days": 3, "unit": "C"}
    history = [*QUESTION, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": arguments}}]}]
    text = tpl.tokenizer.apply_chat_template(history, tools=[WEATHER], tokenize=False)
    written = text[text.rindex("<tool_call>get_weather") : text.rindex("</tool_call>") + len("</tool_call>")]
    constraint = native_tool_call_constraint("glm45", [WEATHER], tpl.marker_token_ids, tpl.features.call_separator)
    assert isinstance(constraint, Constraint)
    engine = client.app.state.glm.services.registry.chat
    matcher = engine.compile_constraint(constraint).matcher()
    for token in tpl.tokenizer.encode(written, add_special_tokens=False):
        assert matcher.consume_token(token), matcher.get_error()
    assert matcher.is_accepting()
    wrong = written.replace("Paris", "Paris and London and Rome")  # over maxLength
    compiled = engine.compile_constraint(constraint)
    matcher = llguidance.LLMatcher(compiled.tokenizer, compiled.grammar)
    assert not all(matcher.consume_token(t) for t in tpl.tokenizer.encode(wrong, add_special_tokens=False))


def test_history_with_reasoning_goes_to_the_template(client):
    tpl = template(client)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "days": 1, "unit": "C"}'}}
    turn = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    plain = chat(client, messages=turn, max_tokens=1, tools=[WEATHER]).json()["usage"]["prompt_tokens"]
    expected = tpl.encode_messages(
        [*QUESTION, {"role": "assistant", "content": "", "reasoning_content": "It needs the weather tool.",
                     "tool_calls": [call]}, {"role": "tool", "content": "sunny"}],
        [WEATHER])
    for name in ("reasoning_content", "reasoning"):
        with_reasoning = [turn[0], {**turn[1], name: "It needs the weather tool."}, turn[2]]
        used = chat(client, messages=with_reasoning, max_tokens=1, tools=[WEATHER]).json()["usage"]["prompt_tokens"]
        assert used == len(expected) > plain  # the reasoning of the current turn is rendered
    # An older turn's reasoning is cleared by this template unless clear_thinking is false.
    older = [*QUESTION, {"role": "assistant", "content": "Sunny.", "reasoning_content": "Old thoughts."},
             {"role": "user", "content": "Thanks"}]
    cleared = chat(client, messages=older, max_tokens=1).json()["usage"]["prompt_tokens"]
    kept = chat(client, messages=older, max_tokens=1, chat_template_kwargs={"clear_thinking": False}).json()
    assert kept["usage"]["prompt_tokens"] > cleared
    # A thinking-only assistant turn (content null) is accepted; two different reasonings are not.
    only = [*QUESTION, {"role": "assistant", "content": None, "reasoning": "hmm"}, {"role": "user", "content": "?"}]
    chat(client, messages=only, max_tokens=1)
    bad = [*QUESTION, {"role": "assistant", "content": "x", "reasoning": "a", "reasoning_content": "b"}]
    assert client.post("/v1/chat/completions", json={"messages": bad}).status_code == 400


def test_the_seed_chat_returns_the_answer(client):
    """The seed has no reasoning field: its content is the answer (none yet from a random model
    still thinking), never the reasoning."""
    sampling = {"max_tokens": 8, "temperature": 0, "repetition_penalty": 1.0}
    body = client.post("/chat", json={"messages": QUESTION, **sampling}).json()
    openai = chat(client, **sampling).json()["choices"][0]["message"]
    assert openai["reasoning_content"] and openai["content"] == ""
    assert body["choices"][0]["message"] == {"role": "assistant", "content": openai["content"]}


SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
          "additionalProperties": False}


def test_structured_outputs_constrain_what_comes_after_the_thinking(client):
    """Thinking on: the grammar lets the reasoning run free up to ``</think>``, then holds the
    answer to the schema; thinking off: it holds from the first token."""
    from dataclasses import replace

    from glm_api.engines.base import Constraint
    from glm_api.serving.chat import _reasoning_end

    tpl = template(client)
    engine = client.app.state.glm.services.registry.chat
    constraint = Constraint("json_schema", json.dumps(SCHEMA))
    after = replace(constraint, reasoning_end=_reasoning_end(tpl))

    def accepts(c, text: str) -> bool:
        matcher = engine.compile_constraint(c).matcher()
        ok = all(matcher.consume_token(t) for t in tpl.tokenizer.encode(text, add_special_tokens=False))
        return ok and matcher.is_accepting()

    thought = 'It is {"answer": "no"} maybe, or not.'
    assert accepts(after, thought + '</think>\n{"answer":"yes"}')
    assert not accepts(after, thought + '</think>\nyes')
    assert not accepts(after, thought)  # the answer is still due
    assert accepts(constraint, '{"answer":"yes"}') and not accepts(constraint, thought + '</think>{"answer":"yes"}')
    # Through the API, thinking off: valid JSON content from the first token, no reasoning.
    body = chat(client, max_tokens=20, response_format={"type": "json_schema", "json_schema": {
        "name": "a", "schema": SCHEMA}}, chat_template_kwargs={"enable_thinking": False}).json()
    message = body["choices"][0]["message"]
    assert message["reasoning_content"] is None
    jsonschema.validate(json.loads(message["content"]), SCHEMA)
    # Thinking on: the random model thinks until max_tokens; its reasoning is not held to JSON.
    body = chat(client, max_tokens=10, response_format={"type": "json_schema", "json_schema": {
        "name": "a", "schema": SCHEMA}}).json()
    message = body["choices"][0]["message"]
    assert body["choices"][0]["finish_reason"] == "length" and message["content"] == "" and message["reasoning"]

"""GLM-4-9B-chat as published, through the routes: real loading, real generation, GLM-4's tools.

The model is the tiny glm-4-9b-chat fixture (remote-code layout, tiktoken tokenizer) trained
until greedy decoding answers the weather question with GLM-4's own call syntax
(``get_weather\\n{"city": "北京"}``, then ``<|observation|>``); everything after the weights
(template, engine, detokenizer, parser, OpenAI and seed wire shapes) runs for real.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from fastapi.testclient import TestClient

from glm_api.app import create_app
from glm_api.registry import build_registry
from glm_api.engines.detokenizer import IncrementalDetokenizer
from glm_api.families.base import ToolCall
from tests.api.test_seed_api import sse_events
from tests.conftest import make_registry, make_settings
from tests.families.test_glm_output_parsing import run_stream
from tests.fixtures.chatglm3_tools import EXPECTED_CALL, TOOL_CONVERSATION, TOOL_QUESTION, TOOL_SYSTEM, WEATHER_TOOL

NAME = "glm-4-9b-chat"
OPENAI_TOOLS = [{"type": "function", "function": WEATHER_TOOL}]
# What an OpenAI client sends for the conversation the model learned (tools beside the messages).
OPENAI_MESSAGES = [{"role": "system", "content": TOOL_SYSTEM["content"]}, TOOL_QUESTION]
DAYS_TOOL = {"type": "function", "function": {"name": "get_forecast", "parameters": {
    "type": "object", "properties": {"days": {"type": "integer", "minimum": 1, "maximum": 7},
                                     "unit": {"enum": ["C", "F"]}},
    "required": ["days", "unit"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def glm4(tool_calling_glm4_chat):
    return tool_calling_glm4_chat


@pytest.fixture(scope="module")
def client(glm4):
    settings = make_settings(chat_model_name=NAME)
    with TestClient(create_app(settings, make_registry(glm4, {}, settings))) as test_client:
        yield test_client


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": NAME, "temperature": 0, "max_tokens": 60, **body})


def test_the_learned_call_comes_back_as_an_openai_tool_call(client, glm4):
    prompt = glm4.template.encode_messages(OPENAI_MESSAGES, OPENAI_TOOLS)
    assert prompt == glm4.template.encode_messages(TOOL_CONVERSATION)  # same prompt as the seed's style
    body = chat(client, messages=OPENAI_MESSAGES, tools=OPENAI_TOOLS).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert (call["function"]["name"], call["function"]["arguments"]) == (EXPECTED_CALL.name, EXPECTED_CALL.arguments)
    assert body["usage"]["prompt_tokens"] == len(prompt)
    assert body["model"] == NAME and body["system_fingerprint"]


def test_the_call_streams_name_first_then_its_arguments(client):
    events = sse_events(chat(client, messages=OPENAI_MESSAGES, tools=OPENAI_TOOLS, stream=True))
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
    parts = [tc for d in deltas for tc in d.get("tool_calls") or []]
    assert parts[0]["function"]["name"] == "get_weather" and parts[0]["id"].startswith("call_")
    assert all("name" not in p["function"] and "id" not in p for p in parts[1:])
    assert "".join(p["function"].get("arguments", "") for p in parts) == EXPECTED_CALL.arguments
    assert not any(d.get("content") for d in deltas)
    assert [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]][-1] == "tool_calls"


def test_without_tools_the_reply_is_the_models_greedy_text(client, glm4):
    """No tools offered: the reply is what greedy decoding writes, as text (the metadata line,
    empty or not, is never taken for a call)."""
    body = chat(client, messages=OPENAI_MESSAGES).json()
    prompt = glm4.template.encode_messages(OPENAI_MESSAGES)
    with torch.no_grad():
        out = glm4.model.generate(torch.tensor([prompt]), max_new_tokens=60, do_sample=False,
                                  eos_token_id=sorted(glm4.template.stop_token_ids))
    generated = [t for t in out[0, len(prompt) :].tolist() if t not in glm4.template.stop_token_ids]
    parser = glm4.template.new_output_parser(False)
    parser.feed(glm4.template.decode(generated))
    assert body["choices"][0]["message"]["content"] == parser.finish().content
    assert body["choices"][0]["message"].get("tool_calls") is None
    assert body["usage"]["completion_tokens"] == out.shape[1] - len(prompt)


def test_seed_chat_returns_the_function_call_and_history(client):
    body = client.post("/chat", json={"messages": TOOL_CONVERSATION, "temperature": 0, "max_tokens": 60,
                                      "return_function_call": True}).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "function_call"
    assert json.loads(choice["message"]["content"]) == {"name": "get_weather", "parameters": {"city": "北京"}}
    assert body["history"][-1] == {"role": "assistant", "metadata": "get_weather",
                                   "content": choice["message"]["content"]}
    events = sse_events(client.post("/chat", json={"messages": TOOL_CONVERSATION, "temperature": 0,
                                                   "return_function_call": True, "stream": True}))
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[1:-1])
    assert json.loads(text)["parameters"] == {"city": "北京"}


def test_the_seed_history_and_the_observation_are_fed_back(client, glm4):
    """The seed's history turn ({"name", "parameters"} under metadata) shows the model only the
    arguments it wrote; the tool's result is an <|observation|> turn."""
    call = json.dumps({"name": "get_weather", "parameters": {"city": "北京"}}, ensure_ascii=False)
    seed = [*TOOL_CONVERSATION, {"role": "assistant", "metadata": "get_weather", "content": call},
            {"role": "observation", "content": '{"temperature": 22}'}]
    body = client.post("/chat", json={"messages": seed, "temperature": 0, "max_tokens": 8}).json()
    assert body["choices"][0]["finish_reason"] in {"stop", "length"}
    openai = [*OPENAI_MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"北京"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 22}'}]
    prompt = glm4.template.encode_messages(openai, OPENAI_TOOLS)
    assert body["usage"]["prompt_tokens"] == len(prompt)
    tok = glm4.template.tokenizer
    assert tok.decode(prompt, skip_special_tokens=False).endswith(
        '<|user|>\n今天北京的天气怎么样？<|assistant|>get_weather\n{"city": "北京"}<|observation|>\n{"temperature": 22}'
        "<|assistant|>")
    response = chat(client, messages=openai, tools=OPENAI_TOOLS, max_tokens=8).json()
    assert response["usage"]["prompt_tokens"] == len(prompt)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_forecast"}}])
def test_a_forced_tool_is_a_call_in_glm4_syntax_valid_for_its_schema(client, stream, choice):
    """The model never learned get_forecast: the grammar (over the tiktoken vocabulary) makes it
    write ``get_forecast\\n{json}`` all the same, which the parser reads back as the call."""
    tools = [DAYS_TOOL] if choice == "required" else [*OPENAI_TOOLS, DAYS_TOOL]
    response = chat(client, messages=[{"role": "user", "content": "天气预报"}], tools=tools, tool_choice=choice,
                    stream=stream, max_tokens=120)
    if stream:
        events = [e for e in sse_events(response) if e != "[DONE]" and e["choices"]]
        parts = [tc for e in events for tc in e["choices"][0]["delta"].get("tool_calls") or []]
        name, arguments = parts[0]["function"]["name"], "".join(p["function"].get("arguments", "") for p in parts)
        finish = events[-1]["choices"][0]["finish_reason"]
    else:
        choice_body = response.json()["choices"][0]
        (call,) = choice_body["message"]["tool_calls"]
        name, arguments, finish = call["function"]["name"], call["function"]["arguments"], choice_body["finish_reason"]
    assert name == "get_forecast" and finish == "tool_calls"
    jsonschema.validate(json.loads(arguments), DAYS_TOOL["function"]["parameters"])


def test_logprobs_bytes_spell_the_output_and_json_mode_holds(client):
    """Token strings are byte-level spellings, and their bytes (a character may span tokens)
    join to the raw output; response_format is enforced over the tiktoken vocabulary."""
    body = chat(client, messages=OPENAI_MESSAGES, logprobs=True, top_logprobs=2, max_tokens=12).json()
    choice = body["choices"][0]
    entries = choice["logprobs"]["content"]
    assert len(entries) == body["usage"]["completion_tokens"]
    raw = b"".join(bytes(entry["bytes"]) for entry in entries).decode("utf-8", errors="replace")
    assert choice["message"]["content"] in raw
    assert all(len(entry["top_logprobs"]) == 2 for entry in entries)
    forced = chat(client, messages=[{"role": "user", "content": "Give me JSON"}], max_tokens=80,
                  response_format={"type": "json_schema", "json_schema": {"name": "f", "schema": DAYS_TOOL[
                      "function"]["parameters"]}}).json()
    jsonschema.validate(json.loads(forced["choices"][0]["message"]["content"]), DAYS_TOOL["function"]["parameters"])


def test_tokenize_is_gmask_sop_then_the_text(client, glm4):
    tok = glm4.template.tokenizer
    text = "北京 <|user|> the weather"
    body = client.post("/tokenize", json={"prompt": text}).json()
    assert body["tokenIds"] == [*tok.prefix_ids, *tok.encode(text)]
    assert body["tokens"][:2] == ["[gMASK]", "<sop>"] and tok.special_id("<|user|>") not in body["tokenIds"]
    assert "Ġthe" in body["tokens"] or "Ġweather" in body["tokens"]  # byte-level spellings
    decoded = client.post("/v1/detokenize", json={"model": NAME, "tokens": body["tokenIds"]}).json()
    assert decoded["prompt"] == text


# GLM-4 outputs written in its real format (what follows <|assistant|>), and what they parse to.
WRITTEN = [
    ('get_weather\n{"city": "北京", "days": 3}', True, "", [ToolCall("get_weather", '{"city": "北京", "days": 3}')]),
    ("get_time\n{}", True, "", [ToolCall("get_time", "{}")]),
    ("\n北京今天晴，气温二十二度。", True, "北京今天晴，气温二十二度。", []),
    ("\nHello, how are you today?", False, "Hello, how are you today?", []),
    ('get_weather\n{"city": "北', True, 'get_weather\n{"city": "北', []),  # cut by max_tokens: text
    ('get_weather\n{"city": "北京"}', False, 'get_weather\n{"city": "北京"}', []),  # no tools: text
]


@pytest.mark.parametrize(("text", "tools_enabled", "content", "calls"), WRITTEN)
def test_written_glm4_outputs_parse_alike_whole_and_streamed(glm4, text, tools_enabled, content, calls):
    """Streamed as the engine streams them (ids through the incremental detokenizer, one token
    at a time, and in pieces of 2, 3 and 7 tokens), or whole: the same content and calls."""
    template = glm4.template
    ids = template.tokenizer.encode(text)
    for group in (1, 2, 3, 7, len(ids)):
        detok = IncrementalDetokenizer(template.decode)
        pieces = []
        for start in range(0, len(ids), group):
            for token in ids[start : start + group]:
                detok.push(token)
            pieces.append(detok.take())
        pieces.append(detok.take(final=True))
        assert "".join(pieces) == text
        out = run_stream(template.new_output_parser(tools_enabled, OPENAI_TOOLS, None), pieces)
        assert out == {"content": content, "reasoning": "", "calls": calls}, group


def test_a_glm4_9b_chat_folder_starts_the_server_as_published(tiny_glm4_chat_dir, tmp_path):
    """The real start-up path: detection, native loading (no remote code), both route families."""
    from tests.fixtures.tiny_encoders import build_tiny_bert

    bert = build_tiny_bert(tmp_path / "bert", with_pooling_config=False)
    settings = make_settings(chat_model=str(tiny_glm4_chat_dir), chat_model_name=NAME, cache_dir=tmp_path,
                             device="cpu", embedding_models={"tiny": str(bert)})
    with TestClient(create_app(settings, build_registry(settings))) as client:
        assert client.app.state.glm.services.registry.chat.family == "chatglm4"
        assert NAME in {m["id"] for m in client.get("/v1/models").json()["data"]}
        question = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 6, "temperature": 0}
        seed = client.post("/chat", json=question).json()
        openai = client.post("/v1/chat/completions", json={"model": NAME, **question}).json()
        assert seed["choices"][0]["message"]["content"] == openai["choices"][0]["message"]["content"]
        assert seed["usage"] == {k: openai["usage"][k] for k in seed["usage"]}

"""Structured outputs: whatever random weights want, the output parses and validates.

Tiny random-weight models (a Llama with SmolLM2's tokenizer, and the tiny ChatGLM3 with its own
sentencepiece vocabulary) write garbage when unconstrained; under a grammar every answer must
parse and validate against its schema (checked with the ``jsonschema`` library), greedy and
seeded, streamed or not. Through the real registry, serving and engine.
"""

from __future__ import annotations

import json

import jsonschema
import llguidance
import pytest
from fastapi.testclient import TestClient

from glm_api.app import create_app
from glm_api.engines.grammar import Constraint
from glm_api.registry import build_registry
from glm_api.serving.json_bounds import any_object_schema, bounded_constraint, bounded_schema
from glm_api.serving.structured import native_tool_call_constraint, tool_call_constraint
from tests.api.test_seed_api import assert_error, sse_events
from tests.conftest import make_settings
from tests.fixtures.chatglm3_tiny import build_tiny_chatglm3
from tests.unit.test_json_bounds import TOKENIZER, TOOL, accepts

SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 1000}}, "required": ["a"],
     "additionalProperties": False},
    {  # nested objects, arrays with bounds, enums, ranges, optional fields
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 999},
            "customer": {
                "type": "object",
                "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 12}, "vip": {"type": "boolean"}},
                "required": ["name"],
                "additionalProperties": False,
            },
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
                                   "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                    "required": ["sku", "qty"],
                    "additionalProperties": False,
                },
            },
            "status": {"enum": ["new", "paid", "shipped"]},
            "total": {"type": "integer", "minimum": 0, "maximum": 1000},
        },
        "required": ["id", "customer", "items", "status"],
        "additionalProperties": False,
    },
    {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "array", "items": {"type": "boolean"}, "maxItems": 4}]},
    {"type": "array", "items": {"type": "number", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[a-f0-9]{4}$"},
                                      "ok": {"const": True}}, "required": ["code", "ok"], "additionalProperties": False},
]
#: Every value here is bounded (strings by length, arrays by size, numbers by the server's own
#: bound: 17 digits before the point, 10 after): every answer must finish, none may be cut.
SAMPLINGS = [{"temperature": 0}, {"temperature": 1.0, "seed": 7}, {"temperature": 0.8, "top_p": 0.9, "seed": 3}]


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-chatglm3"])
def client(request, tiny_llama_dir, tmp_path_factory):
    if request.param == "tiny-llama":
        folder = tiny_llama_dir
    else:  # its tiny sentencepiece spells JSON mostly in byte pieces: room for the tool instruction
        folder = build_tiny_chatglm3(tmp_path_factory.mktemp("chatglm3"), seq_length=2048)
    settings = make_settings(chat_model=str(folder), chat_model_name=request.param,
                             cache_dir=tmp_path_factory.mktemp("cache"), device="cpu")
    with TestClient(create_app(settings, build_registry(settings))) as test_client:
        yield test_client


def _ask(client, schema, sampling, stream=False, max_tokens=200):
    body = {"messages": [{"role": "user", "content": "Give me the data."}], "max_tokens": max_tokens, "stream": stream,
            "response_format": {"type": "json_schema", "json_schema": {"name": "data", "schema": schema}}, **sampling}
    return client.post("/v1/chat/completions", json=body)


@pytest.mark.parametrize("index", range(len(SCHEMAS)), ids=[f"schema{i}" for i in range(len(SCHEMAS))])
def test_every_answer_parses_and_validates(client, index):
    schema = SCHEMAS[index]
    for sampling in SAMPLINGS:
        response = _ask(client, schema, sampling, max_tokens=600)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)


def test_streamed_text_is_the_same_answer(client):
    for sampling in SAMPLINGS[:2]:
        whole = _ask(client, SCHEMAS[1], sampling, max_tokens=600).json()["choices"][0]["message"]["content"]
        events = [e for e in sse_events(_ask(client, SCHEMAS[1], sampling, stream=True, max_tokens=600)) if e != "[DONE]"]
        streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
        assert streamed == whole


def test_any_json_object_and_the_other_grammars(client):
    body = {"messages": [{"role": "user", "content": "JSON please"}], "max_tokens": 120, "temperature": 0}
    out = client.post("/v1/chat/completions", json={**body, "response_format": {"type": "json_object"}}).json()
    if out["choices"][0]["finish_reason"] == "stop":  # any object: its strings may run for ever
        assert isinstance(json.loads(out["choices"][0]["message"]["content"]), dict), out
    out = client.post("/v1/chat/completions", json={**body, "structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}}).json()
    assert len(out["choices"][0]["message"]["content"]) == 6 and out["choices"][0]["message"]["content"][3] == "-"
    out = client.post("/v1/chat/completions", json={**body, "structured_outputs": {"choice": ["red", "green"]}}).json()
    assert out["choices"][0]["message"]["content"] in {"red", "green"}
    out = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 60, "temperature": 0,
                                               "response_format": {"type": "json_schema",
                                                                   "json_schema": {"name": "a", "schema": SCHEMAS[0]}}}).json()
    jsonschema.validate(json.loads(out["choices"][0]["text"]), SCHEMAS[0])


def test_a_length_cut_inside_the_json_says_length(client):
    out = _ask(client, SCHEMAS[1], {"temperature": 0}, max_tokens=5).json()["choices"][0]
    assert out["finish_reason"] == "length"


def test_a_forced_tool_call_has_arguments_valid_for_its_tool(client):
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                             "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"],
            "additionalProperties": False}}},
        {"type": "function", "function": {"name": "add", "parameters": {
            "type": "object", "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                                              "b": {"type": "integer", "minimum": -99, "maximum": 99}},
            "required": ["a", "b"], "additionalProperties": False}}},
    ]
    body = {"messages": [{"role": "user", "content": "Do it"}], "max_tokens": 300, "tools": tools}
    for choice, names in [("required", {"get_weather", "add"}), ({"type": "function", "function": {"name": "add"}}, {"add"})]:
        for stream in (False, True):
            response = client.post("/v1/chat/completions", json={**body, "tool_choice": choice, "stream": stream})
            assert response.status_code == 200, response.text
            if stream:
                events = [e for e in sse_events(response) if e != "[DONE]" and e["choices"]]
                calls = [c for e in events for c in e["choices"][0]["delta"].get("tool_calls") or []]
                finish = events[-1]["choices"][0]["finish_reason"]
                assert not any(e["choices"][0]["delta"].get("content") for e in events)
            else:
                message = response.json()["choices"][0]["message"]
                calls, finish = message["tool_calls"], response.json()["choices"][0]["finish_reason"]
                assert message["content"] is None
            assert finish == "tool_calls" and len(calls) == 1
            call = calls[0]["function"]
            assert call["name"] in names
            schema = next(t["function"]["parameters"] for t in tools if t["function"]["name"] == call["name"])
            jsonschema.validate(json.loads(call["arguments"]), schema)


def test_forced_tool_arguments_and_strict_formats_carry_no_invented_properties(client):
    """Tool schemas rarely say ``additionalProperties``; a forced call still names only what the
    tool names (and a strict format only what its schema names), whatever random weights want."""
    loose = {"type": "object", "properties": {"input": {"type": "integer", "minimum": 0, "maximum": 9}},
             "required": ["input"]}
    tools = [{"type": "function", "function": {"name": "f", "parameters": loose}}]
    for sampling in SAMPLINGS:
        body = {"messages": [{"role": "user", "content": "Call f"}], "max_tokens": 200, "tools": tools,
                "tool_choice": "required", **sampling}
        out = client.post("/v1/chat/completions", json=body).json()["choices"][0]
        assert out["finish_reason"] == "tool_calls", out
        assert set(json.loads(out["message"]["tool_calls"][0]["function"]["arguments"])) == {"input"}
        strict = {"type": "json_schema", "json_schema": {"name": "s", "schema": loose, "strict": True}}
        out = client.post("/v1/chat/completions", json={**body, "tools": None, "tool_choice": None,
                                                        "response_format": strict}).json()["choices"][0]
        assert out["finish_reason"] == "stop" and set(json.loads(out["message"]["content"])) == {"input"}, out


def test_json_object_keeps_to_the_depth_setting(tiny_llama_dir, tmp_path_factory):
    """Random weights open a nested object at once (``{"{":{"][ulous...``); with
    ``json_max_depth=1`` the answer, cut or not, never goes below the top level."""
    settings = make_settings(chat_model=str(tiny_llama_dir), chat_model_name="tiny", device="cpu",
                             cache_dir=tmp_path_factory.mktemp("cache"), json_max_depth=1)
    body = {"messages": [{"role": "user", "content": "JSON please"}], "max_tokens": 60,
            "response_format": {"type": "json_object"}}
    with TestClient(create_app(settings, build_registry(settings))) as test_client:
        for sampling in SAMPLINGS:
            answer = test_client.post("/v1/chat/completions", json={**body, **sampling}).json()
            text = answer["choices"][0]["message"]["content"]
            assert text.startswith("{") and _nesting(text) == 1, text


def _nesting(text: str) -> int:
    """Deepest level of arrays/objects in (a prefix of) JSON text, strings skipped."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            escaped, in_string = (not escaped and ch == "\\"), in_string and (escaped or ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def test_the_forced_tool_call_grammar_closes_arguments_but_not_open_tools():
    tools = [{"type": "function", "function": {"name": "f", "parameters": TOOL}},
             {"type": "function", "function": {"name": "g", "parameters": {**TOOL, "additionalProperties": True}}}]
    schema = json.loads(bounded_constraint(tool_call_constraint(tools)).spec)
    assert accepts(schema, '{"name":"f","arguments":{"input":1}}')
    assert not accepts(schema, '{"name":"f","arguments":{"input":1,"type":"integer"}}')
    assert accepts(schema, '{"name":"g","arguments":{"input":1,"type":"integer"}}')
    assert not accepts(schema, '{"name":"f","arguments":{"input":' + "1" * 18 + "}}")


@pytest.mark.parametrize(("syntax", "call"), [
    ("hermes", '<tool_call>\n{{"name": "f", "arguments": {args}}}\n</tool_call>'),
    ("glm4", "f\n{args}"),
])
def test_native_tool_call_grammars_close_and_bound_arguments_too(syntax, call):
    tools = [{"type": "function", "function": {"name": "f", "parameters": TOOL}}]
    lark = native_tool_call_constraint(syntax, tools).spec
    matcher = llguidance.LLMatcher(TOKENIZER, llguidance.LLMatcher.grammar_from_lark(lark), log_level=0)
    assert not matcher.is_error(), matcher.get_error()

    def accepted(args: str) -> bool:
        m = matcher.deep_copy()
        text = call.format(args=args)
        return bool(m.consume_tokens(list(text.encode()))) and not m.is_error() and m.is_accepting()

    assert accepted('{"input": 1}')
    assert not accepted('{"input": 1, "type": "integer"}')
    assert not accepted('{"input": ' + "1" * 18 + "}")


def test_bounded_constraint_touches_json_constraints_only():
    obj = bounded_constraint(Constraint("json_object"), max_depth=2)
    assert obj.kind == "json_object" and json.loads(obj.spec) == any_object_schema(2)
    regex = Constraint("regex", "[0-9]+", param="structured_outputs")
    assert bounded_constraint(regex) is regex
    schema = bounded_constraint(Constraint("json_schema", json.dumps({"type": "number"}), param="structured_outputs"))
    assert schema.param == "structured_outputs" and json.loads(schema.spec) == bounded_schema({"type": "number"})


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "u", "schema": {"type": "array",
                                                                                       "uniqueItems": True}}}},
         "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "nonsense"}}}},
         "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {"$ref": "#/$defs/missing"}}}},
         "response_format"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}],
          "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ],
)
def test_what_cannot_be_enforced_is_a_400_before_the_stream(client, body, param):
    for stream in (False, True):
        response = client.post("/v1/chat/completions",
                               json={"messages": [{"role": "user", "content": "x"}], "stream": stream, **body})
        assert_error(response, 400, param=param)


def test_a_constrained_row_and_free_rows_decoded_together_get_what_they_get_alone(smollm2):
    """The mask touches only the constrained row: in one batch, every row's tokens are its
    tokens alone (greedy), whether its neighbours are constrained or not.

    The schema with a pattern and a const (SCHEMAS[4]): SmolLM2 answers it in 12 tokens, the two
    prompts along different paths ("2023", "1234"), so the batch loses a free row (8 tokens),
    then both constrained rows, then keeps the other free row (24): the mask must follow each
    row as its neighbours leave, in both orders. (SCHEMAS[1]'s 75-80 tokens a row made this test
    ~24 s, ~7 now, without checking more about the mask; every schema's answers are validated
    above.)"""
    import asyncio

    from glm_api.engines.base import SamplingParams
    from glm_api.engines.base import Constraint
    from glm_api.engines.chat_engine import TransformersChatEngine
    from tests.engines.test_chat_batching import QUESTIONS, collect

    engine = TransformersChatEngine(smollm2, "smollm2", max_running=8)
    engine.start()
    try:
        grammar = engine.compile_constraint(Constraint("json_schema", json.dumps(SCHEMAS[4])))
        prompts = [smollm2.template.encode_messages([{"role": "user", "content": q}]) for q in QUESTIONS]
        free = SamplingParams(max_tokens=24, temperature=0.0)
        constrained = SamplingParams(max_tokens=120, temperature=0.0, grammar=grammar)
        jobs = [(prompts[0], constrained), (prompts[1], free), (prompts[2], free), (prompts[1], constrained)]

        async def scenario():
            alone = [await collect(engine, p, params, f"alone-{i}") for i, (p, params) in enumerate(jobs)]
            together = await asyncio.gather(*[collect(engine, p, params, f"batch-{i}") for i, (p, params) in enumerate(jobs)])
            return alone, together

        alone, together = asyncio.run(scenario())
    finally:
        engine.stop()
    assert [o.ids for o in together] == [o.ids for o in alone]
    for out in (alone[0], alone[3]):
        jsonschema.validate(json.loads(out.text), SCHEMAS[4])

"""Reasoning and tool calls parsed out of GLM output, per generation, whole and as it streams.

Each text is written in one generation's real format: GLM-4.5/4.6 (newlines between a call's
parts), GLM-4.7/5 (none), GLM-4 (``name\\n{json}``) and Hermes. Streamed token by token (the
GLM-4.5 fixture tokenizer's own tokens), character by character and in multi-token pieces, the
server's parser stack (the template's parser behind serving's tracker) must give what parsing
the whole text gives: the same content, reasoning and calls, each call's name before any of its
arguments and its argument pieces joining to its final arguments.
"""

from __future__ import annotations

import json

import pytest

from glm_api.families.base import ToolCall
from glm_api.families.hf_template import HFChatTemplate
from glm_api.families.reasoning import ThinkingParser
from glm_api.families.xml_tool_calls import XmlToolParser
from glm_api.serving.chat import _TrackingParser
from tests.fixtures.glm45_tiny import glm45_tokenizer

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "code": {"type": ["string", "null"]},
        "options": {"type": "object"}, "units": {"enum": ["C", "F"]}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]


def glm45_call(name: str, args: list[tuple[str, str]], sep: str) -> str:
    body = "".join(f"{sep}<arg_key>{k}</arg_key>{sep}<arg_value>{v}</arg_value>" for k, v in args)
    return f"<tool_call>{name}{body}{sep}</tool_call>"


def glm45_reply(sep: str) -> str:
    """Reasoning, text before the calls, a call with typed values, a zero-argument call."""
    return (
        f"{sep}<think>The user wants the weather.\nI will call the tool.</think>{sep}Let me check that.{sep}"
        + glm45_call("get_weather", [("city", "Paris"), ("days", "3"), ("code", "007"), ("options", '{"a": [1, 2]}'),
                                     ("units", "C")], sep)
        + sep + glm45_call("get_time", [], sep)
    )


EXPECTED_CALLS = [
    ToolCall("get_weather", json.dumps({"city": "Paris", "days": 3, "code": "007", "options": {"a": [1, 2]},
                                        "units": "C"})),
    ToolCall("get_time", "{}"),
]


@pytest.fixture(scope="module", params=["4.5", "4.7"])
def template(request) -> HFChatTemplate:
    return HFChatTemplate(glm45_tokenizer(request.param))


def run_stream(parser, pieces: list[str]) -> dict:
    """What the server streams for these pieces, and what the last event completes."""
    tracker = _TrackingParser(parser)
    content, reasoning, calls = [], [], {}
    order = []

    def take(parts):
        for part in parts:
            if part.name is not None:
                assert part.index not in calls, "a call's name is sent once, first"
                calls[part.index] = [part.name, ""]
            else:
                assert part.index in calls, "arguments before the call's name"
            calls[part.index][1] += part.arguments
            order.append(part.index)

    for piece in pieces:
        text, more_reasoning, parts = tracker.feed(piece)
        content.append(text)
        reasoning.append(more_reasoning)
        take(parts)
    parsed, rest, more_reasoning, parts = tracker.finish()
    content.append(rest)
    reasoning.append(more_reasoning)
    take(parts)
    assert order == sorted(order), "calls stream one after the other"
    streamed_calls = [ToolCall(*calls[i]) for i in sorted(calls)]
    assert "".join(content) == parsed.content and "".join(reasoning) == parsed.reasoning
    assert streamed_calls == parsed.tool_calls
    return {"content": parsed.content, "reasoning": parsed.reasoning, "calls": parsed.tool_calls}


def splits(tokenizer, text: str) -> list[list[str]]:
    """The text whole, per character, per token and in pieces of 2, 3 and 7 tokens."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    tokens = [tokenizer.decode([i]) for i in ids]
    assert "".join(tokens) == text
    grouped = [["".join(tokens[i : i + n]) for i in range(0, len(tokens), n)] for n in (2, 3, 7)]
    return [[text], list(text), tokens, *grouped]


def test_glm45_reply_with_thinking_text_and_two_calls(template):
    sep = template.features.call_separator
    assert template.tool_call_syntax == "glm45" and template.thinking_markers == ("<think>", "</think>")
    assert sep == ("\n" if "\n<arg_key>" in template.tokenizer.chat_template else "")
    text = glm45_reply(sep)
    for pieces in splits(template.tokenizer, text):
        out = run_stream(template.new_output_parser(True, TOOLS, None), pieces)
        assert out == {"content": "Let me check that.", "reasoning":
                       "The user wants the weather.\nI will call the tool.", "calls": EXPECTED_CALLS}


@pytest.mark.parametrize("sep", ["\n", ""])
def test_either_separator_style_reads_the_same(sep, template):
    """A 4.7-style model served with a 4.5-style template (or the reverse) still parses."""
    out = run_stream(template.new_output_parser(True, TOOLS, None), [glm45_reply(sep)])
    assert out["calls"] == EXPECTED_CALLS


def test_a_prompt_that_opened_thinking_counts_as_inside_it(template):
    prompt = template.encode_messages([{"role": "user", "content": "hi"}])
    assert template.prompt_opens_thinking(prompt)
    closed = template.encode_messages([{"role": "user", "content": "hi"}], options={"enable_thinking": False})
    assert not template.prompt_opens_thinking(closed)
    text = "Thinking about hi" + "</think>" + "Hello!"
    for pieces in splits(template.tokenizer, text):
        assert run_stream(template.new_output_parser(False, None, prompt), pieces) == {
            "content": "Hello!", "reasoning": "Thinking about hi", "calls": []}
    # Never closed (a random model, or max_tokens): all reasoning, no content.
    for pieces in splits(template.tokenizer, "Thinking about hi <tool_call>x</tool_call>\n"):
        assert run_stream(template.new_output_parser(True, TOOLS, prompt), pieces) == {
            "content": "", "reasoning": "Thinking about hi <tool_call>x</tool_call>", "calls": []}


def test_a_reply_that_skipped_thinking_is_content(template):
    closed = template.encode_messages([{"role": "user", "content": "hi"}], options={"enable_thinking": False})
    for text in ["Hello there", "\nHello <think> is a tag", "<thi"]:
        for pieces in splits(template.tokenizer, text):
            out = run_stream(template.new_output_parser(False, None, closed), pieces)
            assert out == {"content": text.lstrip(), "reasoning": "", "calls": []}
    # A model that opens its thinking itself (GLM-4.5's own template leaves that to it).
    out = run_stream(template.new_output_parser(False, None, closed), ["\n<think>hmm</think>\nHi"])
    assert out == {"content": "Hi", "reasoning": "hmm", "calls": []}


def test_a_call_cut_by_max_tokens(template):
    sep = template.features.call_separator
    whole = glm45_call("get_weather", [("city", "Paris"), ("days", "3")], sep)
    cut_in_value = whole[: whole.index("3")]
    for pieces in splits(template.tokenizer, "Sure." + cut_in_value):
        out = run_stream(template.new_output_parser(True, TOOLS, None), pieces)
        assert out == {"content": "Sure.", "reasoning": "", "calls": [ToolCall("get_weather", '{"city": "Paris"}')]}
    cut_in_name = "Sure. <tool_call>get_wea"
    for pieces in splits(template.tokenizer, cut_in_name):
        out = run_stream(template.new_output_parser(True, TOOLS, None), pieces)
        assert out == {"content": cut_in_name, "reasoning": "", "calls": []}


def test_values_are_typed_from_the_schema():
    parser = XmlToolParser(TOOLS)
    parser.feed(glm45_call("get_weather", [("city", "42"), ("days", "7"), ("code", "null"), ("units", "F"),
                                           ("extra", "[1, 2]"), ("note", "not json")], ""))
    call = parser.finish().tool_calls[0]
    # Strings raw (even when they look like JSON), others JSON; unknown keys JSON if they parse.
    assert json.loads(call.arguments) == {"city": "42", "days": 7, "code": "null", "units": "F", "extra": [1, 2],
                                          "note": "not json"}


def test_text_that_is_not_a_call_stays_content():
    for text in ["Use <tool_call> tags like this", "a <tool_call>not a name<arg_key>x</arg_key>"]:
        parser = XmlToolParser(TOOLS)
        shown = parser.feed(text)
        out = parser.finish()
        assert out.tool_calls == [] and out.content == text and out.content.startswith(shown)


def test_reasoning_never_parses_calls():
    parser = ThinkingParser(XmlToolParser(TOOLS), ("<think>", "</think>"), opened=True)
    parser.feed("I could write " + glm45_call("get_time", [], "") + " but no.</think>Fine.")
    out = parser.finish()
    assert out.tool_calls == [] and out.content == "Fine." and "<tool_call>get_time" in out.reasoning


@pytest.mark.parametrize(("style", "text"), [
    ("glm4", 'get_weather\n{"city": "Paris", "days": 3}'),
    ("hermes",
     'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'),
])
def test_glm4_and_hermes_calls_stream_whole_and_equal_the_whole_parse(style, text, tiny_glm4_dir, tiny_llama_dir):
    from transformers import AutoTokenizer

    from tests.fixtures.tool_calling_lm import TOOL_TEMPLATE

    if style == "glm4":
        tokenizer = AutoTokenizer.from_pretrained(tiny_glm4_dir)
    else:
        tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
        tokenizer.chat_template = TOOL_TEMPLATE
    template = HFChatTemplate(tokenizer)
    assert template.tool_call_syntax == style and template.thinking_markers is None
    expected = [ToolCall("get_weather", '{"city": "Paris", "days": 3}')]
    for pieces in splits(tokenizer, text):
        assert run_stream(template.new_output_parser(True, TOOLS, None), pieces)["calls"] == expected


def test_markers_the_tokenizer_calls_special_are_still_decoded():
    template = HFChatTemplate(glm45_tokenizer("4.7", markers_special=True))
    ids = template.tokenizer.encode("<think>a</think>b<|user|>", add_special_tokens=False)
    assert template.decode(ids) == "<think>a</think>b"  # control tokens dropped, markers kept
    assert set(template.marker_token_ids) >= {"<think>", "</think>", "<tool_call>", "<arg_key>"}

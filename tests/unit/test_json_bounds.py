"""JSON Schema rewrites (glm_api/serving/json_bounds.py), checked by what llguidance then accepts.
No torch: the rewrites are pure (the last test checks it).

Each rewritten schema is compiled by llguidance, as the engine compiles it, against a byte-level
vocabulary (one token per byte), so a text is accepted exactly when the grammar allows it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import llguidance
import pytest

from glm_api.serving.json_bounds import any_object_schema, bounded_schema, strict_schema


class _Bytes:
    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([i]) for i in range(256)] + [b""]
    special_token_ids = [256]

    def __call__(self, text):
        return list(text.encode() if isinstance(text, str) else text)


TOKENIZER = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Bytes()))


def accepts(schema, text: str) -> bool:
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    matcher = llguidance.LLMatcher(TOKENIZER, grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    return bool(matcher.consume_tokens(list(text.encode()))) and not matcher.is_error() and matcher.is_accepting()


CAPITAL = {  # pydantic's schema for Capital{city: str, country: str, population_millions: float}
    "properties": {"city": {"title": "City", "type": "string"},
                   "country": {"title": "Country", "type": "string"},
                   "population_millions": {"title": "Population Millions", "type": "number"}},
    "required": ["city", "country", "population_millions"], "title": "Capital", "type": "object",
}


def capital(number: str) -> str:
    return f'{{"city":"Paris","country":"France","population_millions":{number}}}'


def test_an_unbounded_number_runs_on_without_the_bounds():
    assert accepts(CAPITAL, capital("1" * 200))  # what the small model did until max_tokens


@pytest.mark.parametrize("number", ["2.1", "-3", "0", "12345678901234567", "-99999999999999999", "0.1234567890",
                                    "100000000000000000", "1234567.5"])
def test_a_number_a_double_carries_is_accepted(number):
    assert accepts(bounded_schema(CAPITAL), capital(number))


@pytest.mark.parametrize("number", ["123456789012345678", "-123456789012345678", "1" * 200, "0.12345678901",
                                    "2.1000000000000", "1e5"])
def test_more_digits_than_a_double_carries_are_refused(number):
    assert not accepts(bounded_schema(CAPITAL), capital(number))


def test_integers_are_bounded_and_the_schemas_own_bounds_kept():
    assert not accepts(bounded_schema({"type": "integer"}), "123456789012345678")
    assert accepts(bounded_schema({"type": "integer"}), "12345678901234567")
    at_least_ten = bounded_schema({"type": "integer", "minimum": 10})
    assert accepts(at_least_ten, "10") and not accepts(at_least_ten, "9")
    assert not accepts(at_least_ten, "123456789012345678")
    assert not accepts(bounded_schema({"type": "number", "maximum": 5}), "6")


def test_a_schema_that_asks_for_more_gets_more():
    wide = bounded_schema({"type": "number", "minimum": 0, "maximum": 1e18})
    assert accepts(wide, "123456789012345678")
    halves = bounded_schema({"type": "number", "multipleOf": 0.5})
    assert accepts(halves, "2.5") and not accepts(halves, "2.25")
    big = bounded_schema({"type": "integer", "minimum": 2 * 10**17})  # asks for big numbers: no upper bound added
    assert "maximum" not in big and accepts(big, str(10**17 * 3))


def test_numbers_inside_arrays_anyof_defs_and_type_lists_are_bounded():
    schema = {"type": "object", "properties": {
        "xs": {"type": "array", "items": {"type": "number"}},
        "y": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        "z": {"$ref": "#/$defs/Z"},
        "w": {"type": ["number", "string"]},
    }, "$defs": {"Z": {"type": "number"}}, "additionalProperties": False}
    bounded = bounded_schema(schema)
    assert accepts(bounded, '{"xs":[1,2.5],"y":null,"z":3,"w":"a"}')
    long = "1" * 18
    for text in [f'{{"xs":[{long}]}}', f'{{"y":{long}}}', f'{{"z":{long}}}', f'{{"w":{long}}}']:
        assert accepts(schema, text) and not accepts(bounded, text), text


def test_json_object_nests_at_most_max_depth_levels():
    assert accepts({"type": "object"}, '{"a":' * 40 + "1" + "}" * 40)  # without the bound
    three = any_object_schema(3)
    assert accepts(three, '{"a":{"b":[1,"x",null,true]}}')
    assert accepts(three, '{"a":{"b":{"c":1}}}')
    assert not accepts(three, '{"a":{"b":{"c":{"d":1}}}}')
    assert not accepts(three, '{"a":[[[1]]]}')
    assert not accepts(three, '{"a":' + "1" * 18 + "}")
    assert accepts(any_object_schema(1), '{"setup":"x","punchline":"y"}')
    assert not accepts(any_object_schema(1), '{"setup":{}}')
    assert not accepts(three, "[1]")  # still an object


def test_open_values_in_a_schema_are_bounded_the_same_way():
    schema = {"type": "object", "properties": {"meta": {}, "tags": {"type": "array"}}, "additionalProperties": True}
    bounded = bounded_schema(schema, max_depth=2)
    assert accepts(bounded, '{"meta":{"a":[1]},"tags":[[1]],"extra":{"b":2}}')
    assert not accepts(bounded, '{"meta":{"a":[[1]]}}')
    assert accepts(bounded, '{"tags":[[[1]]]}') and not accepts(bounded, '{"tags":[[[[1]]]]}')  # items: 2 levels
    assert not accepts(bounded, '{"extra":{"b":{"c":[1]}}}')
    assert accepts(bounded_schema(True, max_depth=1), '{"a":1}')
    assert not accepts(bounded_schema({}, max_depth=1), '{"a":[]}')


def test_bounding_twice_is_bounding_once_and_the_input_is_not_changed():
    schema = {"type": "object", "properties": {"a": {"type": "number"}, "b": {}}}
    before = json.dumps(schema)
    once = bounded_schema(schema)
    assert bounded_schema(once) == once and json.dumps(schema) == before
    assert strict_schema(strict_schema(schema)) == strict_schema(schema) and json.dumps(schema) == before


TOOL = {"type": "object", "properties": {"input": {"type": "integer"}}, "required": ["input"]}


def test_strict_tool_arguments_cannot_invent_properties():
    invented = '{"input":1,"type":"integer","exclusiveMaximum":1000}'  # what LangChain's tests got
    assert accepts(TOOL, invented)
    assert not accepts(strict_schema(TOOL), invented)
    assert accepts(strict_schema(TOOL), '{"input":1}')
    nested = {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "number"}}},
                                               "items": {"type": "array", "items": {"$ref": "#/$defs/P"}}},
              "$defs": {"P": {"properties": {"q": {"type": "string"}}}}}
    closed = strict_schema(nested)
    assert accepts(closed, '{"point":{"x":1},"items":[{"q":"a"}]}')
    assert not accepts(closed, '{"point":{"x":1,"y":2}}')
    assert not accepts(closed, '{"items":[{"q":"a","r":1}]}')
    assert strict_schema({"type": "object"}) == {"type": "object", "additionalProperties": False}  # no parameters
    undescribed = {"type": "object", "required": ["a"]}  # closing it would make it unsatisfiable
    assert strict_schema(undescribed) == undescribed and accepts(strict_schema(undescribed), '{"a":1}')


def test_schemas_that_allow_extras_keep_them():
    open_tool = {**TOOL, "additionalProperties": True}
    assert accepts(strict_schema(open_tool), '{"input":1,"type":"integer"}')
    typed = {**TOOL, "additionalProperties": {"type": "string"}}
    assert strict_schema(typed)["additionalProperties"] == {"type": "string"}
    assert accepts(strict_schema(typed), '{"input":1,"note":"x"}')
    assert not accepts(strict_schema(typed), '{"input":1,"note":2}')
    merged = {"allOf": [{"properties": {"a": {"type": "string"}}}, {"properties": {"b": {"type": "string"}}}]}
    assert strict_schema(merged) == merged  # closing each part would forbid the other's properties


def test_the_rewrites_need_no_torch():
    code = "import sys, glm_api.serving.json_bounds; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

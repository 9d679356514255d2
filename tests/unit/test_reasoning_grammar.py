"""A constraint after the thinking, where ``</think>`` is text (no token of its own): the
reasoning runs free up to the first ``</think>``, then the answer's grammar holds."""

from __future__ import annotations

import json

import llguidance
import pytest

from glm_api.engines.base import Constraint
from glm_api.engines.grammar import _grammar_text
from tests.unit.test_json_bounds import TOKENIZER

SCHEMA = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
                     "additionalProperties": False})


def accepted(constraint: Constraint, text: str) -> bool:
    matcher = llguidance.LLMatcher(TOKENIZER, _grammar_text(constraint), log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    return bool(matcher.consume_tokens(list(text.encode()))) and not matcher.is_error() and matcher.is_accepting()


@pytest.mark.parametrize(("kind", "spec", "answer"), [
    ("json_schema", SCHEMA, '{"a":1}'),
    ("regex", "[0-9]{3}", "123"),
    ("grammar", 'start: "yes" | "no"', "no"),
])
def test_reasoning_then_the_constrained_answer(kind, spec, answer):
    after = Constraint(kind, spec, reasoning_end=json.dumps("</think>"))
    assert accepted(after, "I think {\"a\": 2}, or 999.</think>\n\n" + answer)
    assert accepted(after, "</think>" + answer)  # no reasoning at all
    assert not accepted(after, answer)  # the answer only comes after the thinking
    assert not accepted(after, "hmm</think>not it")
    assert not accepted(after, "hmm</think>" + answer + "</think>" + answer)  # the first </think> ends it
    assert accepted(Constraint(kind, spec), answer)

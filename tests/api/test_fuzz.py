"""Schema-driven fuzzing of every route (schemathesis over the app's own OpenAPI spec).

Bounded so it fits CI: a tiny real chat model and encoder, a fixed number of examples per
operation, small answers. Checks: no 5xx, every status is one the spec documents, every
body matches the spec's schema for it.

schemathesis' lazy pytest loader (``from_fixture``) breaks on pytest 9 (it sets the removed
``Node._nodeid``), so each operation is driven with its hypothesis strategy directly.
"""

from __future__ import annotations

import datetime
import traceback

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup  # a BaseExceptionGroup: not an Exception
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from glm_api.app import create_app
from glm_api.registry import build_registry
from tests.conftest import make_settings

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]
EXAMPLES = 30
# Random bodies rarely make a valid streamed request, so every streamed route also gets these:
# each of their SSE events is validated against the spec's chunk schema.
_MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
STREAMED_BODIES = {
    "/chat": [
        {"messages": _MESSAGES, "stream": True, "max_tokens": 4},
        {"messages": _MESSAGES, "stream": True, "chunk": False, "max_tokens": 4, "stop": ["x"]},
    ],
    "/v1/chat/completions": [
        {"messages": _MESSAGES, "stream": True, "max_tokens": 4},
        {"messages": _MESSAGES, "stream": True, "max_tokens": 3, "n": 2, "stream_options": {"include_usage": True}},
    ],
    "/v1/responses": [
        {"input": "Say hi", "instructions": "Be brief.", "stream": True, "max_output_tokens": 4},
        {"input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}], "stream": True,
         "max_output_tokens": 3, "store": False, "text": {"format": {"type": "json_object"}}},
    ],
    "/v1/completions": [
        {"prompt": "Hello", "stream": True, "max_tokens": 4},
        {"prompt": ["a", "b"], "stream": True, "max_tokens": 2, "echo": True, "stream_options": {"include_usage": True}},
    ],
}


@pytest.fixture(scope="module")
def fuzz_app(tiny_llama_dir, tiny_bert_dir, tiny_reranker_dir, tmp_path_factory):
    config = make_settings(
        chat_model=str(tiny_llama_dir), embedding_models={"tiny-bert": str(tiny_bert_dir)},
        rerank_models={"tiny-reranker": str(tiny_reranker_dir)},
        cache_dir=tmp_path_factory.mktemp("cache"), device="cpu", default_max_tokens=4, max_tokens_limit=8, max_n=2,
        max_body_bytes=256 * 1024, data_dir=tmp_path_factory.mktemp("data"),
    )
    app = create_app(config, build_registry(config))
    with TestClient(app):  # runs the lifespan: engines start, and stop after the module
        yield app


def operations(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    return [result.ok() for result in schema.get_all_operations()]


def test_every_operation_survives_fuzzing(fuzz_app):
    ops = operations(fuzz_app)
    assert {f"{op.method.upper()} {op.path}" for op in ops} >= {
        "POST /chat", "POST /embedding", "POST /tokenize", "GET /models",
        "POST /v1/chat/completions", "POST /v1/embeddings", "GET /v1/models",
    }
    failures = []
    for op in ops:
        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
        def run(case):
            case.call_and_validate(checks=CHECKS)

        try:
            run()
            for body in STREAMED_BODIES.get(op.path, []) if op.method.upper() == "POST" else []:
                response = op.Case(body=body).call()
                assert response.status_code == 200, response.text
                assert response.headers["content-type"][0].startswith("text/event-stream")
                op.Case(body=body).validate_response(response, checks=CHECKS)
        except (Exception, FailureGroup) as exc:  # collect every operation's failure, not just the first
            detail = "".join(traceback.format_exception(exc))[-3000:]
            failures.append(f"{op.method.upper()} {op.path}: {detail}")
    assert not failures, "\n\n".join(failures)


def _sse(*events: str) -> bytes:
    return "".join(f"data: {event}\r\n\r\n" for event in events).encode()


@pytest.mark.parametrize(
    ("body", "valid"),
    [
        (_sse('{"id":"c1","created":1,"model":"m","choices":[{"delta":{"role":"assistant"}}]}', "[DONE]"), True),
        (_sse('{"error":{"message":"boom","type":"server_error"}}', "[DONE]"), True),
        (_sse('{"created":1,"model":"m","choices":[{"delta":{"content":"hi"}}]}', "[DONE]"), False),  # no id
        (_sse('{"id":"c1","created":1,"model":"m","choices":[]}', "DONE"), False),  # not JSON, not [DONE]
    ],
)
def test_the_fuzz_checks_read_every_streamed_chunk(body, valid):
    """The spec's SSE description is what the fuzz test validates each streamed chunk against:
    a chunk that breaks the chunk schema must fail it, a good stream must pass."""
    app = create_app(make_settings(disable_chat=True))
    op = schemathesis.openapi.from_dict(app.openapi())["/chat"]["POST"]
    case = op.Case(body={"messages": [{"role": "user", "content": "hi"}], "stream": True})
    request = httpx.Request("POST", "http://testserver/chat")
    response = httpx.Response(200, headers={"content-type": "text/event-stream; charset=utf-8"}, content=body,
                              request=request)
    response.read()  # a finished response, as the fuzz test's calls produce
    response.elapsed = datetime.timedelta(0)
    if valid:
        case.validate_response(response, checks=CHECKS)
    else:
        with pytest.raises(FailureGroup) as failure:
            case.validate_response(response, checks=CHECKS)
        assert "SSE event violates schema" in "".join(traceback.format_exception(failure.value))

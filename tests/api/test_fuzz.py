"""Schema-driven fuzzing of every route (schemathesis over the app's own OpenAPI spec).

Bounded so it fits CI: a tiny real chat model and encoder, a fixed number of examples per
operation, small answers. Checks: no 5xx, every status is one the spec documents, every
body matches the spec's schema for it.

schemathesis' lazy pytest loader (``from_fixture``) breaks on pytest 9 (it sets the removed
``Node._nodeid``), so each operation is driven with its hypothesis strategy directly.
"""

from __future__ import annotations

import traceback

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from glm_api.app import create_app
from glm_api.registry import build_registry
from tests.conftest import make_settings

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]
EXAMPLES = 30


@pytest.fixture(scope="module")
def fuzz_app(tiny_llama_dir, tiny_bert_dir, tmp_path_factory):
    config = make_settings(
        chat_model=str(tiny_llama_dir), embedding_models={"tiny-bert": str(tiny_bert_dir)},
        cache_dir=tmp_path_factory.mktemp("cache"), device="cpu", default_max_tokens=4, max_tokens_limit=8, max_n=2,
        max_body_bytes=256 * 1024,
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
        except Exception as exc:  # collect every operation's failure, not just the first
            detail = "".join(traceback.format_exception(exc))[-3000:]
            failures.append(f"{op.method.upper()} {op.path}: {detail}")
    assert not failures, "\n\n".join(failures)

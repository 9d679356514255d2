"""The OpenAPI spec promises the statuses the server really answers with."""

from __future__ import annotations

import jsonschema
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from glm_api.app import create_app
from glm_api.config import Settings
from glm_api.protocol.openai import CONTENT_REQUIRED_ROLES, ChatCompletionRequest, CompletionRequest, StructuredOutputs
from glm_api.protocol.seed import SeedChatRequest, SeedEmbeddingRequest
from glm_api.protocol.tokenizer import DetokenizeRequest, TokenizeRequest
from glm_api.serving.messages import CONTENT_REQUIRED


def test_spec_documents_400_and_never_422():
    spec = create_app(Settings(_env_file=None)).openapi()
    posts = {path: ops["post"] for path, ops in spec["paths"].items() if "post" in ops}
    assert {"/chat", "/embedding", "/tokenize", "/v1/chat/completions", "/v1/embeddings"} <= set(posts)
    for path, operation in posts.items():
        assert "422" not in operation["responses"], path
        assert "400" in operation["responses"], path
        assert "429" in operation["responses"], path
    assert "text/event-stream" in posts["/chat"]["responses"]["200"]["content"]


# ---------------------------------------------------------------------------------------------
# The spec states what the server refuses (issue 21, item 7)

def _spec() -> dict:
    return create_app(Settings(_env_file=None, disable_chat=True, max_n=3, max_tokens_limit=64)).openapi()


def _validator(spec: dict, name: str) -> jsonschema.Draft202012Validator:
    # The component, with the spec's components beside it so that its $refs resolve.
    return jsonschema.Draft202012Validator({**spec["components"]["schemas"][name], "components": spec["components"]})


def test_405_names_the_allowed_methods():
    client = TestClient(create_app(Settings(_env_file=None, disable_chat=True)))
    for method, path, allowed in [
        ("TRACE", "/chat", "POST"), ("GET", "/v1/embeddings", "POST"), ("DELETE", "/v1/models", "GET"),
        # Paths served by two routes take the methods of both.
        ("OPTIONS", "/v1/files", "GET, POST"), ("PUT", "/v1/batches", "GET, POST"), ("POST", "/v1/files/file-1", "DELETE, GET"),
    ]:
        response = client.request(method, path)
        assert response.status_code == 405
        assert response.headers["allow"] == allowed  # RFC 9110: a 405 lists what the route takes
        assert response.json()["error"]["code"] == "405"


def test_metrics_is_documented_as_prometheus_text():
    content = _spec()["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(content) == ["text/plain"]


def test_spec_holds_only_json_schema_keywords():
    """pydantic writes a constraint it cannot place as its own name ("ge"); no validator reads it."""
    def walk(node):
        if isinstance(node, dict):
            assert not {"ge", "le", "gt", "lt"} & set(node), node
            for key, value in node.items():
                if key != "properties":
                    walk(value)
                else:
                    for prop in value.values():
                        walk(prop)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(_spec()["components"])


def test_content_rule_is_serving_s():
    assert set(CONTENT_REQUIRED_ROLES) == CONTENT_REQUIRED


@pytest.mark.parametrize(
    ("name", "body", "model"),
    [
        ("ChatMessageIn", {"role": "tool"}, None),  # serving: missing_required_parameter
        ("ChatMessageIn", {"role": "assistant", "content": None, "tool_calls": []}, None),
        ("SeedMessage", {"role": "observation"}, None),
        ("SeedEmbeddingRequest", {"prompt": []}, SeedEmbeddingRequest),
        ("CompletionRequest", {"prompt": ""}, None),  # serving: the prompt is empty
        ("CompletionRequest", {"prompt": [[]]}, CompletionRequest),
        ("CompletionRequest", {"prompt": "x", "best_of": 2, "n": 1}, CompletionRequest),
        ("CompletionRequest", {"prompt": "x", "n": 4}, None),  # settings.max_n
        ("CompletionRequest", {"prompt": ["x"] * 33}, None),  # serving's MAX_PROMPTS
        ("CompletionRequest", {"prompt": "x", "max_tokens": 65}, None),  # settings.max_tokens_limit
        ("DetokenizeRequest", {"tokens": [-1]}, DetokenizeRequest),
        # A seed past int64 stopped the chat engine for every later request (torch's generator).
        ("SeedChatRequest", {"messages": [{"role": "user", "content": "x"}], "seed": 2**64}, SeedChatRequest),
        ("ChatCompletionRequest", {"messages": [{"role": "user", "content": "x"}], "seed": -(2**63) - 1}, ChatCompletionRequest),
        ("TokenizeRequest", {}, TokenizeRequest),
        ("TokenizeRequest", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, TokenizeRequest),
        ("ChatCompletionRequest", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 0}, ChatCompletionRequest),
        ("ChatCompletionRequest", {"messages": [{"role": "user", "content": "x"}], "stream": 0}, ChatCompletionRequest),
        ("ChatCompletionRequest", {"messages": [{"role": "user", "content": "x"}], "n": "2"}, ChatCompletionRequest),
        ("ChatCompletionRequest", {"messages": [{"role": "user", "content": "x"}], "stop": [""]}, ChatCompletionRequest),
        ("ChatCompletionRequest", {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}}, ChatCompletionRequest),
        ("ChatCompletionRequest", {"messages": [{"role": "user", "content": "x"}], "structured_outputs": {"regex": "a", "choice": ["a"]}}, ChatCompletionRequest),
    ],
)
def test_spec_refuses_what_the_server_refuses(name, body, model):
    """Each body is refused by the spec, and by the server (here its request model, where the
    rule lives there; the others are serving's, checked against the live server by
    tests/e2e/test_spec_conformance.py)."""
    spec = _spec()
    assert not _validator(spec, name).is_valid(body), body
    if model is not None:
        with pytest.raises(ValidationError):
            model.model_validate(body)


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("ChatMessageIn", {"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}),
        ("ChatMessageIn", {"role": "function", "content": None}),
        ("ChatMessageIn", {"role": "user", "content": [{"type": "text", "text": "hi"}]}),
        ("CompletionRequest", {"prompt": [1.0, 2], "best_of": 3, "n": 3}),
        ("TokenizeRequest", {"messages": [{"role": "user", "content": "x"}], "tools": []}),
        ("ChatCompletionRequest", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 64, "max_tokens": 1000}),
    ],
)
def test_spec_accepts_what_the_server_serves(name, body):
    assert _validator(_spec(), name).is_valid(body), body


def test_structured_json_text_must_be_json():
    """A 400 naming it, not the 500 schemathesis found (json.loads in serving)."""
    assert StructuredOutputs.model_validate({"json": '{"type": "object"}'}).json_ == '{"type": "object"}'
    with pytest.raises(ValidationError, match="not valid JSON"):
        StructuredOutputs.model_validate({"json": "B x"})

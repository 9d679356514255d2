"""The OpenAPI spec promises the statuses the server really answers with."""

from __future__ import annotations

from glm_api.app import create_app
from glm_api.config import Settings


def test_spec_documents_400_and_never_422():
    spec = create_app(Settings(_env_file=None)).openapi()
    posts = {path: ops["post"] for path, ops in spec["paths"].items() if "post" in ops}
    assert {"/chat", "/embedding", "/tokenize", "/v1/chat/completions", "/v1/embeddings"} <= set(posts)
    for path, operation in posts.items():
        assert "422" not in operation["responses"], path
        assert "400" in operation["responses"], path
        assert "429" in operation["responses"], path
    assert "text/event-stream" in posts["/chat"]["responses"]["200"]["content"]

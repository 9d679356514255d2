"""API keys, body limit and CORS on a real app with no models loaded (the routes that need
models answer 503, which is enough to see the middleware let a request through)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from glm_api.app import create_app
from glm_api.config import Settings
from glm_api.security import ApiKeyMiddleware


def app_client(**settings) -> TestClient:
    # No registry and no lifespan run: models never load, so /models answers 503 "loading".
    return TestClient(create_app(Settings(_env_file=None, **settings)))


def test_without_keys_everything_is_open():
    client = app_client()
    assert client.get("/models").status_code == 503  # past the middleware, models not loaded


@pytest.mark.parametrize("headers", [{"Authorization": "Bearer k2"}, {"authorization": "bearer k1"}, {"api-key": "k1"}])
def test_a_valid_key_passes(headers):
    assert app_client(api_keys=["k1", "k2"]).get("/models", headers=headers).status_code == 503


@pytest.mark.parametrize(
    "headers, code",
    [({}, "missing_api_key"), ({"Authorization": "Bearer nope"}, "invalid_api_key"),
     ({"Authorization": "k1"}, "missing_api_key"), ({"api-key": "k1x"}, "invalid_api_key")],
)
def test_a_missing_or_wrong_key_is_401_in_openai_shape(headers, code):
    response = app_client(api_keys=["k1"]).post("/chat", headers=headers, json={})
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == code
    assert "k1" not in response.text


def test_probes_stay_open_with_keys():
    client = app_client(api_keys=["k1"])
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 503  # open, and truthfully not ready
    assert client.get("/models").status_code == 401


def test_key_file(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nalpha\n\n beta \n")
    client = app_client(api_key_file=keys)
    assert client.get("/models", headers={"Authorization": "Bearer beta"}).status_code == 503
    assert client.get("/models", headers={"Authorization": "Bearer gamma"}).status_code == 401


def test_keys_are_compared_against_every_key():
    middleware = ApiKeyMiddleware(app=None, keys=["a", "", "b"])
    assert middleware._keys == [b"a", b"b"]  # empty keys never match anything


def test_body_over_the_limit_is_413_before_parsing():
    client = app_client(max_body_bytes=2048)
    response = client.post("/embedding", content=b"x" * 5000, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_body_without_length_is_counted_as_it_streams():
    client = app_client(max_body_bytes=2048)

    def chunks():
        for _ in range(10):
            yield b"y" * 500

    response = client.post("/embedding", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_body_under_the_limit_gets_through():
    client = app_client(max_body_bytes=2048)
    response = client.post("/embedding", content=b'{"prompt": "%s"}' % (b"z" * 1900), headers={"content-type": "application/json"})
    assert response.status_code == 503  # past the limit, at the route (models not loaded here)


def test_bad_content_length_is_400():
    client = app_client()
    response = client.post("/chat", content=b"{}", headers={"content-type": "application/json", "content-length": "abc"})
    assert response.status_code == 400


def test_cors_is_off_by_default_and_lists_origins_when_on():
    plain = app_client().options("/chat", headers={"Origin": "https://a.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in plain.headers
    client = app_client(cors_origins=["https://a.example"], api_keys=["k"])
    preflight = client.options("/chat", headers={"Origin": "https://a.example", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200  # no key needed for a preflight
    assert preflight.headers["access-control-allow-origin"] == "https://a.example"
    other = client.options("/chat", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert other.headers.get("access-control-allow-origin") != "https://evil.example"


def test_wildcard_origin_with_credentials_is_refused():
    with pytest.raises(ValidationError, match="credentials"):
        Settings(_env_file=None, cors_origins=["*"], cors_allow_credentials=True)


def test_request_id_is_returned_and_sanitised():
    client = app_client()
    assert client.get("/health", headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
    assert client.get("/health", headers={"x-request-id": "bad id\nwith newline"}).headers["x-request-id"].startswith("req-")

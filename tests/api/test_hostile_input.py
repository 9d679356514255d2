"""Broken and hostile input: every case is a 4xx in OpenAI's error shape, never a 500 or a hang,
and the server keeps answering good requests afterwards."""

from __future__ import annotations

import json

import pytest

from tests.api.test_seed_api import QUESTION, assert_error

JSON = {"content-type": "application/json"}


def post_raw(client, path: str, body: bytes, headers=JSON):
    return client.post(path, content=body, headers=headers)


@pytest.mark.parametrize(
    "path, body, status",
    [
        ("/chat", b'{"messages": [', 400),  # truncated JSON
        ("/embedding", b'{"prompt": "\xff\xfe"}', 400),  # invalid UTF-8
        ("/embedding", b'{"prompt":' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400),  # deep nesting
        ("/chat", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400),
        ("/chat", b'{"messages": [{"role": "user", "content": "x"}], "top_p": Infinity}', 400),
        ("/tokenize", b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", 400),  # a 5000-digit number
        ("/embedding", b"null", 400),
        ("/embedding", b"[1, 2, 3]", 400),
        ("/chat", b'{"messages": [{"role": "user", "content": {"nested": true}}]}', 400),
        ("/chat", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1000000000000}', 400),
        ("/chat", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -3}', 400),
        ("/chat", b'{"messages": [{"role": "user", "content": "x"}], "stop": ' + json.dumps(["s"] * 100).encode() + b"}", 400),
        ("/tokenize", b'{"prompt": "x", "max_tokens": 1.5}', 400),
    ],
)
def test_broken_bodies_are_4xx(client, path, body, status):
    assert_error(post_raw(client, path, body), status)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
def test_wrong_content_types_are_415(client, content_type):
    response = post_raw(client, "/embedding", b'{"prompt": "x"}', {"content-type": content_type})
    assert_error(response, 415)


def test_a_ten_megabyte_message_is_413_before_parsing(client):
    body = json.dumps({"messages": [{"role": "user", "content": "x" * 10_000_000}]}).encode()
    error = assert_error(post_raw(client, "/chat", body), 413)
    assert error["code"] == "request_too_large"


def test_a_million_messages_is_413(client):
    body = b'{"messages": [' + b",".join([b'{"role":"user","content":""}'] * 1_000_000) + b"]}"
    assert_error(post_raw(client, "/chat", body), 413)


def test_many_messages_under_the_body_limit_are_a_context_error(client):
    messages = [{"role": "user", "content": "hi"}] * 20_000
    error = assert_error(client.post("/chat", json={"messages": messages}), 400)
    assert error["code"] == "context_length_exceeded"


def test_nul_bytes_and_control_characters_are_just_text(client):
    text = "a\x00b\x01c\u202e\ufeff"
    tokens = client.post("/tokenize", json={"prompt": text}).json()
    assert tokens["tokenIds"]
    assert client.post("/embedding", json={"prompt": text}).status_code == 200
    chat = client.post("/chat", json={"messages": [{"role": "user", "content": text}], "max_tokens": 2})
    assert chat.status_code == 200


def test_the_server_still_serves_after_all_that(client):
    response = client.post("/chat", json={"messages": QUESTION, "max_tokens": 8, "temperature": 0})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"]

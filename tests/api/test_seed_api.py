"""The seed GLM-API routes on the real packaged models, through the ASGI app."""

from __future__ import annotations

import json

import numpy as np
import pytest

from glm_api.registry import PACKAGED_CHAT_NAME, PACKAGED_EMBEDDING_NAME

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def sse_events(response) -> list:
    """Parsed ``data:`` payloads of an SSE body, ``"[DONE]"`` kept as a string."""
    events = []
    for line in response.text.splitlines():
        if line.startswith("data:"):
            data = line[len("data:") :].strip()
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def chat(client, **body):
    body.setdefault("messages", QUESTION)
    return client.post("/chat", json=body)


def assert_error(response, status: int, param: str | None = None, code: str | None = None) -> dict:
    """An OpenAI-shaped error body with this status (and param / code when given)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def test_models_lists_exactly_what_is_loaded(client):
    body = client.get("/models").json()
    assert body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    assert set(by_id) == {PACKAGED_CHAT_NAME, PACKAGED_EMBEDDING_NAME}
    assert by_id[PACKAGED_CHAT_NAME]["object"] == "chat.completion"
    assert by_id[PACKAGED_EMBEDDING_NAME]["object"] == "embedding"
    assert by_id[PACKAGED_EMBEDDING_NAME]["dimensions"] == 384
    for card in body["data"]:
        assert {"id", "object", "created", "owned_by", "root", "parent", "permission"} <= set(card)


def test_chat_answers_with_the_real_model(client, smollm2):
    response = chat(client, temperature=0, max_tokens=40)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == PACKAGED_CHAT_NAME
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert "Paris" in choice["message"]["content"]
    assert choice["finish_reason"] == "stop"
    prompt_tokens = len(smollm2.template.encode_messages(QUESTION))
    usage = body["usage"]
    assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens"}  # the seed's shape
    assert usage["prompt_tokens"] == prompt_tokens
    assert usage["total_tokens"] == prompt_tokens + usage["completion_tokens"]
    assert response.headers["x-request-id"] == body["id"]


def test_max_tokens_cut_gives_length(client):
    body = chat(client, temperature=0, max_tokens=3).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


def test_stop_string_ends_generation_and_is_not_output(client):
    full = chat(client, temperature=0, max_tokens=40).json()["choices"][0]["message"]["content"]
    assert "Paris" in full
    body = chat(client, temperature=0, max_tokens=40, stop=["Paris"]).json()
    content = body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "stop"
    assert "Paris" not in content
    assert content == full[: full.index("Paris")]


def test_stream_chunk_true_sends_deltas(client):
    full = chat(client, temperature=0, max_tokens=24).json()["choices"][0]["message"]["content"]
    response = chat(client, temperature=0, max_tokens=24, stream=True, chunk=True)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] in {"stop", "length"}
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert len([p for p in pieces if p]) > 3  # really incremental
    assert "".join(pieces) == full


def test_stream_chunk_false_sends_the_whole_text_so_far(client):
    full = chat(client, temperature=0, max_tokens=24).json()["choices"][0]["message"]["content"]
    events = sse_events(chat(client, temperature=0, max_tokens=24, stream=True, chunk=False))
    texts = [e["choices"][0]["delta"]["content"] for e in events[1:-1]]
    for before, after in zip(texts, texts[1:]):
        assert after.startswith(before)
    assert texts[-1] == full
    assert events[-2]["choices"][0]["finish_reason"] in {"stop", "length"}


def test_stream_reports_length(client):
    events = sse_events(chat(client, temperature=0, max_tokens=4, stream=True))
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_chat_model_name_must_match(client):
    assert chat(client, model=PACKAGED_CHAT_NAME, max_tokens=2).status_code == 200
    error = assert_error(chat(client, model="chatglm3-6b-32k", max_tokens=2), 404, "model")
    assert PACKAGED_CHAT_NAME in error["message"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}, None),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, None),
        ({"messages": "hello"}, "messages"),
        ({"messages": QUESTION, "temperature": "hot"}, "temperature"),
        ({"messages": QUESTION, "temperature": 2.5}, "temperature"),
        ({"messages": QUESTION, "top_p": 0}, "top_p"),
        ({"messages": QUESTION, "top_p": 1.5}, "top_p"),
        ({"messages": QUESTION, "max_tokens": -1}, "max_tokens"),
        ({"messages": QUESTION, "max_tokens": 0}, "max_tokens"),
        ({"messages": QUESTION, "max_tokens": 10**12}, "max_tokens"),
        ({"messages": QUESTION, "stop": [""]}, "stop"),
        ({"messages": QUESTION, "repetition_penalty": 0}, "repetition_penalty"),
        ({}, "messages"),
    ],
)
def test_bad_chat_requests_are_400(client, body, param):
    assert_error(client.post("/chat", json=body), 400, param)


@pytest.mark.parametrize("role", ["system", "user", "assistant", "observation", "tool", "function"])
@pytest.mark.parametrize("null", [False, True], ids=["missing", "null"])
def test_a_message_without_content_is_400_naming_it(client, role, null):
    """OpenAI's contract: served, it would be an empty turn the model answers at length. The
    seed's messages have no tool_calls, so an assistant turn needs its text too."""
    message = {"role": role, "content": None} if null else {"role": role}
    messages = [{"role": "system", "content": "Be brief."}, message, *QUESTION]
    for stream in (False, True):  # refused before the stream starts
        error = assert_error(chat(client, messages=messages, stream=stream), 400, "messages[1].content")
        assert "required" in error["message"] and error["code"] == "missing_required_parameter"


def test_malformed_json_is_400(client):
    response = client.post("/chat", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert_error(response, 400)


def test_prompt_longer_than_context_is_400(client, smollm2):
    long_text = "hello " * (smollm2.context_length + 100)
    error = assert_error(chat(client, messages=[{"role": "user", "content": long_text}]), 400, "messages")
    assert error["code"] == "context_length_exceeded"
    assert str(smollm2.context_length) in error["message"]


def test_max_tokens_is_capped_to_the_context_left(client):
    # The seed's default of 4096 fits; a huge-but-valid value is capped rather than refused.
    body = chat(client, temperature=0, max_tokens=500_000).json()
    assert body["choices"][0]["finish_reason"] == "stop"


def test_unknown_route_and_method_are_json_errors(client):
    assert_error(client.get("/nope"), 404)
    assert_error(client.get("/chat"), 405)


def test_embedding_single_and_batch(client, minilm):
    one = client.post("/embedding", json={"prompt": "The cat sits on the mat."}).json()
    assert one["object"] == "embedding"
    assert one["model"] == PACKAGED_EMBEDDING_NAME
    assert len(one["data"]) == 1 and len(one["data"][0]) == 384
    many = client.post(
        "/embedding",
        json={"model": PACKAGED_EMBEDDING_NAME, "prompt": ["The cat sits on the mat.", "A kitten rests on a rug.", "Stock markets fell."]},
    ).json()
    vectors = np.array(many["data"], dtype=np.float32)
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(vectors[0], one["data"][0], atol=1e-5)  # batching does not change a vector
    reference = minilm.model.encode(["The cat sits on the mat."], convert_to_numpy=True)[0]
    np.testing.assert_allclose(vectors[0], reference, atol=1e-5)

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2])
    assert many["usage"]["prompt_tokens"] > 0


def test_embedding_normalize(client):
    raw = np.array(client.post("/embedding", json={"prompt": "hello"}).json()["data"][0])
    unit = np.array(client.post("/embedding", json={"prompt": "hello", "normalize": True}).json()["data"][0])
    assert abs(np.linalg.norm(unit) - 1) < 1e-5
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw), atol=1e-6)


def test_embedding_errors(client):
    error = assert_error(client.post("/embedding", json={"model": "text2vec-large-chinese", "prompt": "x"}), 404, "model")
    assert PACKAGED_EMBEDDING_NAME in error["message"]
    assert_error(client.post("/embedding", json={"prompt": []}), 400, "prompt")
    assert_error(client.post("/embedding", json={"prompt": 42}), 400)
    assert_error(client.post("/embedding", json={}), 400, "prompt")


def test_tokenize_ids_and_tokens_match_one_to_one(client, smollm2):
    prompt = "Hello world, this is glm-api."
    body = client.post("/tokenize", json={"prompt": prompt}).json()
    assert body["object"] == "tokenizer"
    assert body["model"] == PACKAGED_CHAT_NAME
    ids, tokens = body["tokenIds"], body["tokens"]
    assert len(ids) == len(tokens) > 3
    assert ids == smollm2.template.tokenizer.encode(prompt)  # its default: SmolLM2's tokenizer adds nothing
    assert tokens == smollm2.template.convert_ids_to_tokens(ids)
    assert smollm2.template.decode(ids) == prompt
    cut = client.post("/tokenize", json={"prompt": prompt, "max_tokens": 2}).json()
    assert cut["tokenIds"] == ids[:2] and cut["tokens"] == tokens[:2]


def test_tokenize_with_an_embedding_model(client, minilm):
    body = client.post("/tokenize", json={"prompt": "hello world", "model": PACKAGED_EMBEDDING_NAME}).json()
    assert body["model"] == PACKAGED_EMBEDDING_NAME
    assert body["tokens"] == minilm.model.tokenizer.convert_ids_to_tokens(body["tokenIds"])
    assert "hello" in body["tokens"]


def test_tokenize_errors(client):
    assert_error(client.post("/tokenize", json={"prompt": "x", "model": "nope"}), 404, "model")
    assert_error(client.post("/tokenize", json={"prompt": "x", "max_tokens": 0}), 400, "max_tokens")
    assert_error(client.post("/tokenize", json={}), 400, "prompt")


def test_health_and_ready(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200

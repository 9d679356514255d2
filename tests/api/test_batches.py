"""The OpenAI Files and Batch APIs on the real packaged models, through the ASGI app: every
status a batch can reach, cancel, the error file, ownership, refusals before a batch starts,
resuming from a database a previous run left, and /metrics. Bodies are checked against the
``openai`` package's own types.

Generation is kept short (a few tokens, greedy) because the CPU is shared.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from openai.types import Batch, CreateEmbeddingResponse, FileDeleted, FileObject
from openai.types.chat import ChatCompletion

from glm_api.app import create_app
from glm_api.registry import PACKAGED_CHAT_NAME, PACKAGED_EMBEDDING_NAME
from glm_api.storage import Storage
from tests.api.test_seed_api import assert_error
from tests.conftest import make_registry, make_settings

KEY_A, KEY_B = "key-a", "key-b"


def chat_line(custom_id: str, content: str = "Say hi.", max_tokens: int = 3, **extra) -> dict:
    body = {"model": PACKAGED_CHAT_NAME, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0, **extra}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def jsonl(lines: list) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


def upload(client, content: bytes, purpose: str = "batch", headers=None):
    return client.post("/v1/files", files={"file": ("input.jsonl", content)}, data={"purpose": purpose}, headers=headers)


def create(client, file_id: str, endpoint: str = "/v1/chat/completions", headers=None, **extra):
    body = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h", **extra}
    return client.post("/v1/batches", json=body, headers=headers)


def wait_for(client, batch_id: str, statuses: set[str], headers=None, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v1/batches/{batch_id}", headers=headers).json()
        if body["status"] in statuses:
            return body
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} still {body['status']} after {timeout} s")


def read_lines(client, file_id: str | None, headers=None) -> list[dict]:
    if file_id is None:
        return []
    response = client.get(f"/v1/files/{file_id}/content", headers=headers)
    assert response.status_code == 200
    return [json.loads(line) for line in response.content.decode().splitlines()]


@pytest.fixture(scope="module")
def app_client(smollm2, minilm, tmp_path_factory):
    settings = make_settings(data_dir=tmp_path_factory.mktemp("batch-data"), batch_max_file_bytes=64 * 1024)
    registry = make_registry(smollm2, {PACKAGED_EMBEDDING_NAME: minilm}, settings)
    with TestClient(create_app(settings, registry)) as client:
        yield client


def test_a_chat_batch_completes_with_its_bad_lines_in_the_error_file(app_client):
    lines = [
        chat_line("a", "Say hi."),
        "{not json",
        chat_line("b", "Name a colour."),
        {**chat_line("c"), "url": "/v1/embeddings"},
        chat_line("d", model="no-such-model"),
        "",  # blank lines are skipped, not errors
        chat_line("e", "Count to three."),
        chat_line("a", "a repeated custom_id"),
        {"custom_id": "f", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": "oops"}},
    ]
    uploaded = app_client.post("/v1/files", files={"file": ("in.jsonl", jsonl(lines))}, data={"purpose": "batch"})
    assert uploaded.status_code == 200, uploaded.text
    file = FileObject.model_validate(uploaded.json())
    assert file.purpose == "batch" and file.bytes == len(jsonl(lines)) and file.filename == "in.jsonl"

    created = create(app_client, file.id, metadata={"job": "test"})
    assert created.status_code == 200, created.text
    batch = Batch.model_validate(created.json())
    assert batch.status == "validating" and batch.metadata == {"job": "test"} and batch.input_file_id == file.id
    assert batch.expires_at == batch.created_at + 24 * 3600

    done = Batch.model_validate(wait_for(app_client, batch.id, {"completed", "failed"}))
    assert done.status == "completed"
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at
    assert done.request_counts.total == 8 and done.request_counts.completed == 3 and done.request_counts.failed == 5

    output = read_lines(app_client, done.output_file_id)
    assert sorted(o["custom_id"] for o in output) == ["a", "b", "e"]
    for line in output:
        assert line["error"] is None and line["id"].startswith("batch_req_")
        assert line["response"]["status_code"] == 200
        completion = ChatCompletion.model_validate(line["response"]["body"])
        assert completion.usage.completion_tokens <= 3
    # the same answer the interactive route gives (greedy)
    direct = app_client.post("/v1/chat/completions", json=chat_line("x", "Say hi.")["body"]).json()
    first = next(o for o in output if o["custom_id"] == "a")
    assert first["response"]["body"]["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]

    errors = {e["error"]["line"]: e for e in read_lines(app_client, done.error_file_id)}
    assert sorted(errors) == [2, 4, 5, 8, 9]
    assert "not valid JSON" in errors[2]["error"]["message"] and errors[2]["custom_id"] is None
    assert "endpoint" in errors[4]["error"]["message"] and errors[4]["custom_id"] == "c"
    assert errors[5]["response"]["status_code"] == 404 and errors[5]["custom_id"] == "d"
    assert errors[5]["response"]["body"]["error"]["code"] == "model_not_found"
    assert "repeated" in errors[8]["error"]["message"]
    assert errors[9]["response"]["status_code"] == 400 and errors[9]["error"]["message"].startswith("line 9: messages")
    out_file = FileObject.model_validate(app_client.get(f"/v1/files/{done.output_file_id}").json())
    assert out_file.purpose == "batch_output"


def test_an_embedding_batch_gives_the_interactive_vectors(app_client):
    texts = ["the cat sat", "a dog ran", "rain in spain"]
    lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": PACKAGED_EMBEDDING_NAME, "input": t}} for i, t in enumerate(texts)]
    file_id = upload(app_client, jsonl(lines)).json()["id"]
    batch = create(app_client, file_id, "/v1/embeddings").json()
    done = wait_for(app_client, batch["id"], {"completed"})
    assert done["request_counts"] == {"total": 3, "completed": 3, "failed": 0} and done["error_file_id"] is None
    output = {o["custom_id"]: o["response"]["body"] for o in read_lines(app_client, done["output_file_id"])}
    direct = app_client.post("/v1/embeddings", json={"model": PACKAGED_EMBEDDING_NAME, "input": texts[1]}).json()
    batched = CreateEmbeddingResponse.model_validate(output["e1"]).data[0].embedding
    # equal up to float rounding: the batch may share a forward pass (padding) with other texts
    assert np.allclose(batched, direct["data"][0]["embedding"], atol=1e-5)


def test_cancel_stops_the_batch_and_keeps_what_finished(app_client):
    lines = [chat_line(f"c{i}", "Write a long story about a ship.", max_tokens=48) for i in range(40)]
    batch = create(app_client, upload(app_client, jsonl(lines)).json()["id"]).json()
    wait_for(app_client, batch["id"], {"in_progress"})
    cancelling = app_client.post(f"/v1/batches/{batch['id']}/cancel")
    assert cancelling.status_code == 200
    assert Batch.model_validate(cancelling.json()).status in {"cancelling", "cancelled"}
    done = Batch.model_validate(wait_for(app_client, batch["id"], {"cancelled", "completed"}))
    assert done.status == "cancelled" and done.cancelling_at <= done.cancelled_at
    counts = done.request_counts
    assert counts.total == 40 and counts.completed < 40 and counts.failed == 0
    output = read_lines(app_client, done.output_file_id)
    assert len(output) == counts.completed and len({o["custom_id"] for o in output}) == counts.completed
    # cancelling again changes nothing
    again = app_client.post(f"/v1/batches/{batch['id']}/cancel").json()
    assert again["status"] == "cancelled" and again["cancelled_at"] == done.cancelled_at


def test_a_batch_past_its_window_expires_with_its_lines_in_the_error_file(app_client):
    batch = create(app_client, upload(app_client, jsonl([chat_line("x"), chat_line("y")])).json()["id"],
                   completion_window="0s").json()
    assert batch["expires_at"] == batch["created_at"]
    done = wait_for(app_client, batch["id"], {"expired", "completed"})
    assert done["status"] == "expired" and done["expired_at"] >= done["in_progress_at"]
    errors = read_lines(app_client, done["error_file_id"])
    assert {e["custom_id"] for e in errors} == {"x", "y"}
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert done["request_counts"] == {"total": 2, "completed": 0, "failed": 2}


def test_refused_before_the_batch_starts(app_client):
    assert_error(upload(app_client, b"hello, world\n"), 400, "file", "invalid_file_format")
    assert_error(upload(app_client, b"\xff\xfe binary"), 400, "file", "invalid_file_format")
    assert_error(upload(app_client, b"[1, 2]\n"), 400, "file", "invalid_file_format")
    assert_error(upload(app_client, jsonl([chat_line("x", "y" * 70_000)])), 400, "file", "file_too_large")
    assert_error(upload(app_client, jsonl([chat_line("x")]), purpose="nonsense"), 400, "purpose")
    good = upload(app_client, jsonl([chat_line("x")])).json()["id"]
    assert_error(create(app_client, good, "/v1/moderations"), 400, "endpoint", "invalid_endpoint")
    assert_error(create(app_client, "file-nope"), 404, "file_id")
    # A window whose end is no exact JSON integer, and JSON's types as they are.
    assert_error(create(app_client, good, completion_window="99999999999999999999h"), 400, "completion_window")
    assert_error(create(app_client, good, metadata={"n": 1}), 400, "metadata.n")
    assert_error(app_client.post("/v1/batches", json={"input_file_id": 7, "endpoint": "/v1/completions"}), 400, "input_file_id")
    other = upload(app_client, jsonl([chat_line("x")]), purpose="user_data").json()["id"]
    assert_error(create(app_client, other), 400, "input_file_id")
    assert_error(app_client.post("/v1/batches", json={"endpoint": "/v1/embeddings"}), 400, "input_file_id")
    assert_error(app_client.post("/v1/files", json={"purpose": "batch"}), 400)
    assert_error(app_client.get("/v1/batches/batch_nope"), 404, "batch_id")


def test_file_listing_pages_and_delete(app_client):
    ids = [upload(app_client, jsonl([chat_line(f"p{i}")])).json()["id"] for i in range(3)]
    listed = app_client.get("/v1/files", params={"purpose": "batch", "limit": 2}).json()
    assert listed["object"] == "list" and [f["id"] for f in listed["data"]] == ids[::-1][:2] and listed["has_more"]
    rest = app_client.get("/v1/files", params={"purpose": "batch", "limit": 2, "after": ids[1]}).json()
    assert rest["data"][0]["id"] == ids[0]
    deleted = app_client.delete(f"/v1/files/{ids[0]}")
    assert FileDeleted.model_validate(deleted.json()).deleted
    assert_error(app_client.get(f"/v1/files/{ids[0]}"), 404)
    assert_error(app_client.get(f"/v1/files/{ids[0]}/content"), 404)
    assert_error(app_client.delete(f"/v1/files/{ids[0]}"), 404)
    batches = app_client.get("/v1/batches", params={"limit": 1}).json()
    assert batches["object"] == "list" and len(batches["data"]) == 1 and batches["has_more"]
    Batch.model_validate(batches["data"][0])


def batch_metric(client, name: str, state: str) -> float:
    prefix = f'{name}{{state="{state}"}}'
    return next(float(line.split()[-1]) for line in client.get("/metrics").text.splitlines() if line.startswith(prefix))


def test_metrics_count_batch_lines_by_state(app_client):
    before = {s: batch_metric(app_client, "glm_api_batch_lines_finished_total", s) for s in ("completed", "failed")}
    lines = [{"custom_id": f"m{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": PACKAGED_EMBEDDING_NAME, "input": "some text"}} for i in range(2)]
    batch = create(app_client, upload(app_client, jsonl([*lines, "{bad"])).json()["id"], "/v1/embeddings").json()
    wait_for(app_client, batch["id"], {"completed"})
    assert batch_metric(app_client, "glm_api_batch_lines_finished_total", "completed") == before["completed"] + 2
    assert batch_metric(app_client, "glm_api_batch_lines_finished_total", "failed") == before["failed"] + 1
    assert batch_metric(app_client, "glm_api_batch_lines", "running") == 0
    assert batch_metric(app_client, "glm_api_batch_lines", "pending") == 0


def test_with_keys_files_and_batches_belong_to_the_key_that_made_them(smollm2, tmp_path):
    settings = make_settings(data_dir=tmp_path, api_keys=[KEY_A, KEY_B])
    registry = make_registry(smollm2, {}, settings)
    a, b = {"Authorization": f"Bearer {KEY_A}"}, {"api-key": KEY_B}
    with TestClient(create_app(settings, registry)) as client:
        file_id = upload(client, jsonl([chat_line("k")]), headers=a).json()["id"]
        batch = create(client, file_id, headers=a).json()
        assert_error(client.get(f"/v1/files/{file_id}", headers=b), 404)
        assert_error(client.get(f"/v1/files/{file_id}/content", headers=b), 404)
        assert_error(client.delete(f"/v1/files/{file_id}", headers=b), 404)
        assert_error(create(client, file_id, headers=b), 404)
        assert_error(client.get(f"/v1/batches/{batch['id']}", headers=b), 404)
        assert_error(client.post(f"/v1/batches/{batch['id']}/cancel", headers=b), 404)
        assert client.get("/v1/files", headers=b).json()["data"] == []
        assert client.get("/v1/batches", headers=b).json()["data"] == []
        assert_error(client.get("/v1/files"), 401)
        done = wait_for(client, batch["id"], {"completed"}, headers=a)
        assert len(read_lines(client, done["output_file_id"], headers=a)) == 1
        assert_error(client.get(f"/v1/files/{done['output_file_id']}/content", headers=b), 404)


def test_a_restart_resumes_what_the_last_run_left(smollm2, tmp_path):
    """A database left mid-batch (two lines done, three pending) and one left validating with
    its input gone: the next start finishes the first with every line once, fails the second."""
    storage = Storage(tmp_path)
    lines = [chat_line(f"r{i}") for i in range(5)]
    source = storage.add_file("", "batch", "in.jsonl", jsonl(lines))
    now = int(time.time())
    base = {"object": "batch", "endpoint": "/v1/chat/completions", "input_file_id": source.id,
            "completion_window": "24h", "created_at": now, "expires_at": now + 86400}
    storage.add_batch("", {**base, "id": "batch_mid", "status": "in_progress", "in_progress_at": now})
    storage.add_lines("batch_mid", [(i + 1, f"r{i}", "pending", json.dumps(line), None) for i, line in enumerate(lines)])
    for i in range(2):
        storage.finish_line("batch_mid", i + 1, "completed", {"custom_id": f"r{i}", "response": {"status_code": 200}})
    storage.add_batch("", {**base, "id": "batch_lost", "input_file_id": "file-gone", "status": "validating"})
    storage.close()

    settings = make_settings(data_dir=tmp_path)
    with TestClient(create_app(settings, make_registry(smollm2, {}, settings))) as client:
        done = wait_for(client, "batch_mid", {"completed"})
        output = read_lines(client, done["output_file_id"])
        assert sorted(o["custom_id"] for o in output) == [f"r{i}" for i in range(5)]
        assert [o["response"].get("body") is None for o in output].count(True) == 2  # the two from before
        lost = wait_for(client, "batch_lost", {"failed"})
        assert lost["errors"]["data"][0]["code"] == "invalid_input_file" and lost["failed_at"]

"""The Batch API through the official openai SDK against real uvicorn, with the server killed
hard (SIGKILL) in the middle of a batch and started again on the same data directory: every
line must come out exactly once."""

from __future__ import annotations

import json
import signal
import time

import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletion

from glm_api.registry import PACKAGED_CHAT_NAME
from tests.e2e.conftest import NO_KERNEL_TIMING, start_server, stop_server

pytestmark = pytest.mark.e2e

# Enough for the kill to land mid-batch (it comes once 2 lines are done; 2 run at a time, so the
# other 6 take three more rounds) and for the restart to have lines left to resume.
LINES = 8
TOPICS = ["the sea", "a red fox", "winter", "trains", "bread", "the moon", "rivers", "music"]


def batch_input() -> bytes:
    rows = []
    for i in range(LINES):
        body = {"model": PACKAGED_CHAT_NAME, "temperature": 0, "max_tokens": 6 + (i % 4) * 2,
                "messages": [{"role": "user", "content": f"Write two sentences about {TOPICS[i % len(TOPICS)]}."}]}
        rows.append(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
    rows.insert(5, '{"custom_id": "broken", "method": "POST"')  # cut short: an error line, not a failed batch
    return ("\n".join(rows) + "\n").encode()


def sdk_for(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.mark.timeout(1200)  # two server starts and a batch on a shared CPU
def test_sdk_flow_survives_a_hard_kill_mid_batch(smollm2_cache_dir, tmp_path):
    data_dir = tmp_path / "data"
    args = ["--cache-dir", str(smollm2_cache_dir), "--data-dir", str(data_dir), "--batch-max-running", "2",
            *NO_KERNEL_TIMING]
    server = start_server(args, tmp_path / "first.log")
    try:
        with sdk_for(server.url) as sdk:
            uploaded = sdk.files.create(file=("prompts.jsonl", batch_input()), purpose="batch")
            assert uploaded.purpose == "batch" and uploaded.bytes == len(batch_input())
            batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                       completion_window="24h", metadata={"run": "kill-test"})
            assert batch.status == "validating"
            deadline = time.monotonic() + 500
            while time.monotonic() < deadline:
                batch = sdk.batches.retrieve(batch.id)
                if batch.request_counts and batch.request_counts.completed >= 2:
                    break
                time.sleep(0.1)
        done_before = batch.request_counts.completed
        assert batch.status == "in_progress" and 2 <= done_before < LINES, batch
        server.process.send_signal(signal.SIGKILL)  # no shutdown, no flush: as a crash
        server.process.wait(30)
    finally:
        stop_server(server)

    server = start_server(args, tmp_path / "second.log")
    try:
        with sdk_for(server.url) as sdk:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                batch = sdk.batches.retrieve(batch.id)
                if batch.status not in ("validating", "in_progress", "finalizing"):
                    break
                time.sleep(0.25)
            assert batch.status == "completed", batch
            assert batch.metadata == {"run": "kill-test"}
            assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (
                LINES + 1, LINES, 1)
            output = [json.loads(x) for x in sdk.files.content(batch.output_file_id).text.splitlines()]
            errors = [json.loads(x) for x in sdk.files.content(batch.error_file_id).text.splitlines()]
            assert [e["error"]["line"] for e in errors] == [6]
            ids = [o["custom_id"] for o in output]
            assert sorted(ids) == sorted(f"req-{i}" for i in range(LINES))  # each exactly once
            for line in output:
                assert line["response"]["status_code"] == 200
                ChatCompletion.model_validate(line["response"]["body"])
            assert any(b.id == batch.id for b in sdk.batches.list())
            assert {batch.output_file_id, batch.error_file_id, uploaded.id} <= {f.id for f in sdk.files.list()}
            assert sdk.files.delete(uploaded.id).deleted
        assert "resuming batch" in server.log()
    finally:
        assert stop_server(server) == 0

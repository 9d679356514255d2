"""``python -m glm_api batch``: a real process, a failed line's exit status, and ``--resume``
after an interruption (results missing, the last one cut short).

The models are tiny ones built by the fixtures (a 2-layer Llama with SmolLM2's tokenizer, a
2-layer BERT), loaded by the same code as the packaged SmolLM2 and all-MiniLM-L6-v2: what is
checked is the runner's bookkeeping, and each of the two full runs starts ~4 s sooner.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.e2e.conftest import NO_KERNEL_TIMING, REPO

pytestmark = pytest.mark.e2e


def run_batch(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "glm_api", "batch", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.timeout(1200)
def test_offline_batch_reports_failures_and_resumes(tiny_llama_dir, tiny_bert_dir, tmp_path):
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "tiny", "max_tokens": 3, "temperature": 0,
                       "messages": [{"role": "user", "content": f"Say {i}."}]}} for i in range(4)]
    lines.append({"custom_id": "e0", "method": "POST", "url": "/v1/embeddings",
                  "body": {"model": "tiny-bert", "input": "hello"}})
    text = "".join(json.dumps(x) + "\n" for x in lines) + "not json\n"
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(text)
    common = [str(source), "-o", str(output), "--chat-model", str(tiny_llama_dir), "--chat-model-name", "tiny",
              "--embedding-model", f"tiny-bert={tiny_bert_dir}", "--cache-dir", str(tmp_path / "cache"),
              "--log-level", "warning", *NO_KERNEL_TIMING]

    first = run_batch(common)
    assert first.returncode == 1, first.stderr
    assert "6 lines: 5 completed, 1 failed" in first.stderr
    got = rows(output)
    assert len(got) == 6 and sum(r["error"] is not None for r in got) == 1
    assert next(r for r in got if r["error"])["error"]["line"] == 6
    assert output.exists() and run_batch(common).returncode == 2  # no silent overwrite

    # as if killed: two results missing and the last written one cut in half
    kept = [r for r in got if r["custom_id"] not in ("c1", "e0")]
    partial = json.dumps(next(r for r in got if r["custom_id"] == "c1"))[:40]
    output.write_text("".join(json.dumps(r) + "\n" for r in kept) + partial)
    resumed = run_batch([*common, "--resume"])
    assert resumed.returncode == 1 and "(4 from an earlier run)" in resumed.stderr, resumed.stderr
    final = rows(output)
    assert sorted(str(r["custom_id"]) for r in final) == ["None", "c0", "c1", "c2", "c3", "e0"]
    assert next(r for r in final if r["custom_id"] == "e0")["response"]["body"]["data"][0]["embedding"]

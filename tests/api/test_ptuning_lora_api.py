"""A row with both a P-Tuning v2 prefix and a LoRA adapter, through the real start-up path.

A whole P-tuned ChatGLM3 checkpoint is the chat model (its prefix before every request) and
``--lora sql=PATH`` serves an adapter over it. A request to ``sql`` must be ChatGLM3's own
computation with the prefix's keys/values (the prefix encoder's, not touched by LoRA) over the
linears with the adapter merged in (peft's ``merge_and_unload``): the float64 reference of
tests/engines/test_ptuning_prefix.py on the merged weights. Its prefix-cache blocks are chained
from the prefix's root joined with the adapter's, so they never serve the plain prefix rows.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from glm_api.app import create_app
from glm_api.engines.kv_blocks import join_salts
from glm_api.registry import build_registry
from tests.api.test_ptuning_api import BASE, settings_for
from tests.engines.test_ptuning_prefix import reference_logits, reference_prompt
from tests.families.test_chatglm3_checkpoint import raw_checkpoint
from tests.fixtures.chatglm3_ptuning import build_ptuning
from tests.fixtures.lora_adapters import (
    CHATGLM3_TARGETS,
    ChatGLM3Linears,
    chatglm3_checkpoint,
    make_lora,
    merged_chatglm3_folder,
)

ADAPTER = "sql"
STEPS = 6


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_chatglm3_dir):
    """The P-tuned checkpoint (its base weights are tiny_chatglm3_dir's), the adapter folder,
    and the reference's inputs: the merged weights and the prefix's keys/values."""
    full = build_ptuning(tmp_path_factory.mktemp("full"), tiny_chatglm3_dir, pre_seq_len=7, projection=True,
                         layout="full", seed=9)
    config, weights = chatglm3_checkpoint(tiny_chatglm3_dir)
    adapter = tmp_path_factory.mktemp("adapter")
    merged = make_lora(ChatGLM3Linears(weights, config["num_layers"]), adapter, CHATGLM3_TARGETS, r=4, alpha=8,
                       seed=5, base_model="THUDM/chatglm3-6b")
    merged_dir = merged_chatglm3_folder(tiny_chatglm3_dir, merged, tmp_path_factory.mktemp("merged"))
    prefix = {}
    for shard in sorted(full.glob("*.safetensors")):
        prefix.update({k: v.double() for k, v in load_file(shard).items() if k.startswith("transformer.prefix_encoder.")})
    prompt = reference_prompt(json.loads((full / "config.json").read_text()), prefix)
    settings = settings_for(tmp_path_factory, full, lora={ADAPTER: str(adapter)}, kv_block_size=4,
                            prefix_cache_tokens=512)
    registry = build_registry(settings)
    with TestClient(create_app(settings, registry)) as client:
        yield client, registry.chat, raw_checkpoint(merged_dir), raw_checkpoint(tiny_chatglm3_dir), prompt


def reference_greedy(config: dict, weights: dict, prompt, ids: list[int], stop: frozenset[int]):
    """Greedy tokens (up to a stop token, left out) and the log-probabilities of every token
    chosen, one float64 forward per token."""
    tokens, logprobs = [], []
    for _ in range(STEPS):
        logits = reference_logits(config, weights, ids + tokens, prompt)[-1]
        token = int(logits.argmax())
        logprobs.append(float(logits.log_softmax(-1)[token]))
        if token in stop:
            break
        tokens.append(token)
    return tokens, logprobs


def complete(client, model: str, ids: list[int]) -> dict:
    body = {"model": model, "prompt": ids, "max_tokens": STEPS, "temperature": 0, "logprobs": 0}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_prefix_and_an_adapter_on_one_row_equal_chatglm3_with_both(served):
    client, engine, (merged_config, merged_weights), (base_config, base_weights), prompt = served
    assert engine.default_prefix is not None and engine.adapters == [ADAPTER]
    ids = engine.tokenize(["今天北京的天气怎么样？请详细说说。"])[0]
    stop = engine.template.stop_token_ids
    expected, expected_logprobs = reference_greedy(merged_config, merged_weights, prompt, ids, stop)
    plain, _ = reference_greedy(base_config, base_weights, prompt, ids, stop)
    without_prefix, _ = reference_greedy(merged_config, merged_weights, None, ids, stop)
    assert expected != plain and expected != without_prefix  # both the prefix and the adapter matter here

    answer = complete(client, ADAPTER, ids)
    choice = answer["choices"][0]
    assert answer["model"] == ADAPTER
    assert choice["text"] == engine.decode(expected)
    torch.testing.assert_close(choice["logprobs"]["token_logprobs"], expected_logprobs, atol=2e-4, rtol=1e-4)
    assert complete(client, BASE, ids)["choices"][0]["text"] == engine.decode(plain)


def cached_tokens(answer: dict) -> int:
    return answer["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_its_prefix_cache_blocks_are_its_own(served):
    client, engine, *_ = served
    ids = random.Random(7).choices(range(10, 300), k=22)  # no beginning shared with another test's prompts
    assert cached_tokens(complete(client, BASE, ids)) == 0
    assert cached_tokens(complete(client, BASE, ids)) >= len(ids) - 4  # the plain prefix rows' blocks are found
    first = complete(client, ADAPTER, ids)
    assert cached_tokens(first) == 0  # the same tokens after the same prefix, computed under other weights
    again = complete(client, ADAPTER, ids)
    assert cached_tokens(again) >= len(ids) - 4 and again["choices"][0]["text"] == first["choices"][0]["text"]
    # Two chains in the pool, from two roots: the prefix's, and the prefix's joined with the adapter's.
    prefix_root = engine.default_prefix.salt
    adapter_root = join_salts(prefix_root, engine.runner.lora.cache_roots[ADAPTER])
    plain, tuned = engine.kv.lookup(ids, prefix_root), engine.kv.lookup(ids, adapter_root)
    assert plain.blocks and tuned.blocks and not set(plain.blocks) & set(tuned.blocks)

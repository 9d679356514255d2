"""GLM-4.7-Flash- and GLM-5-style models (latent attention, MoE; GLM-5's key indexer) through the
API, loaded by the real start-up path from tiny random checkpoints (tests/fixtures/tiny_glm_moe.py).

Before the pool learned each layer's cache entries these started and then failed every request
with a 500; a model whose cache the pool cannot hold is now refused at start-up, by name.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3NextConfig, Qwen3NextForCausalLM

from glm_api.app import create_app
from glm_api.registry import StartupError, build_registry
from tests.api.test_seed_api import sse_events
from tests.conftest import make_settings
from tests.fixtures.tiny_encoders import build_tiny_bert
from tests.fixtures.tiny_glm_moe import build_tiny_latent_glm

KINDS = ["glm4_moe_lite", "glm_moe_dsa"]
QUESTION = [{"role": "user", "content": "What is the weather in Beijing today? Please answer in detail."}]


def _settings(folder: Path, tmp: Path, name: str):
    bert = build_tiny_bert(tmp / "bert", with_pooling_config=False)
    return make_settings(
        chat_model=str(folder), chat_model_name=name, embedding_models={"tiny": str(bert)}, cache_dir=tmp / "cache",
        device="cpu", kv_block_size=4, prefill_chunk_tokens=16,  # blocks and chunks cross inside short prompts
    )


@pytest.fixture(scope="module", params=KINDS)
def latent_client(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    folder = build_tiny_latent_glm(tmp / "model", request.param)
    settings = _settings(folder, tmp, request.param)
    with TestClient(create_app(settings, build_registry(settings))) as client:
        yield client, folder


def _stock_greedy(folder: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The same checkpoint loaded by transformers alone, decoded greedily with its own cache."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    stop = model.generation_config.eos_token_id
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop)
    return [t for t in out[0, len(prompt) :].tolist() if t not in stop]


def test_latent_models_answer_with_the_stock_models_greedy_tokens(latent_client):
    client, folder = latent_client
    engine = client.app.state.glm.services.registry.chat
    assert not any(layer.direct for layer in engine.runner.pool.layout.layers)  # the latent path, not K/V
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    body = {"model": engine.model_name, "messages": QUESTION, "max_tokens": 24, "temperature": 0}
    reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["usage"]["prompt_tokens"] == len(prompt)
    expected = _stock_greedy(folder, prompt, 24)
    assert answer["usage"]["completion_tokens"] >= len(expected)
    # (A random model's bytes may end inside a UTF-8 character: that comes out at the end as U+FFFD.)
    assert answer["choices"][0]["message"]["content"] == engine.template.decode(expected)
    # Streamed, and again (the prompt's blocks now come from the prefix cache): the same text.
    events = sse_events(client.post("/v1/chat/completions", json={**body, "stream": True}))
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    assert text == answer["choices"][0]["message"]["content"]
    assert engine.kv.cached_prefix_tokens(prompt) > 0


def test_latent_models_serve_the_seed_route_too(latent_client):
    client, _ = latent_client
    body = client.post("/chat", json={"messages": QUESTION, "max_tokens": 6, "temperature": 0}).json()
    assert body["usage"]["completion_tokens"] >= 1


def test_a_model_whose_cache_the_pool_cannot_hold_is_refused_at_start_up(tmp_path):
    """Qwen3-Next keeps a recurrent state (convolution and linear attention) in most layers."""
    folder = build_tiny_latent_glm(tmp_path / "glm", "glm4_moe_lite")  # its tokenizer and template
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = Qwen3NextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512,
    )
    torch.manual_seed(0)
    Qwen3NextForCausalLM(config).save_pretrained(tmp_path / "hybrid")
    tokenizer.save_pretrained(tmp_path / "hybrid")
    settings = _settings(tmp_path / "hybrid", tmp_path, "hybrid")
    with pytest.raises(StartupError) as refused:
        build_registry(settings)
    message = str(refused.value)
    assert "Qwen3NextForCausalLM (qwen3_next)" in message and "KV cache" in message, message

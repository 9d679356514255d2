"""LoRA adapters over HTTP: listed under /v1/models and /models with their base as parent,
chosen by ``model`` on every generating route, and loaded/unloaded at run time through vLLM's
routes only when the server allows it (real tiny Llama, real peft adapters)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from glm_api.app import create_app
from glm_api.config import Settings
from glm_api.registry import ModelSource, ModelSources, build_registry
from tests.fixtures.lora_adapters import tiny_chat_with_adapters

CPU = torch.device("cpu")
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir: Path, tmp_path_factory):
    """Two adapters and their merged models, and the template to encode prompts with."""
    return tiny_chat_with_adapters(tiny_llama_dir, tmp_path_factory)


def _client(tiny_llama_dir: Path, adapters, **settings) -> TestClient:
    _, made = adapters
    config = Settings(_env_file=None, chat_model=str(tiny_llama_dir), chat_model_name="tiny", **settings)
    loras = tuple(ModelSource(name, made[name][0]) for name in config.lora)
    registry = build_registry(config, ModelSources(ModelSource("tiny", tiny_llama_dir), (), (), loras=loras))
    return TestClient(create_app(config, registry))


def _greedy_text(loaded, model, steps: int) -> str:
    ids = loaded.template.encode(PROMPT)
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            token = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if token in loaded.template.stop_token_ids:
                break
            out.append(token)
    return loaded.template.decode(out)


def _complete(client: TestClient, model: str) -> dict:
    r = client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def test_adapters_are_listed_and_chosen_by_model(tiny_llama_dir, adapters) -> None:
    loaded, made = adapters
    lora = {"sql": str(made["sql"][0]), "poet": str(made["poet"][0])}
    with _client(tiny_llama_dir, adapters, lora=lora) as client:
        cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
        assert cards["sql"]["parent"] == "tiny" and cards["poet"]["parent"] == "tiny" and cards["tiny"]["parent"] is None
        assert cards["sql"]["kind"] == "chat"
        assert client.get("/v1/models/sql").json()["parent"] == "tiny"
        seed_cards = {c["id"]: c for c in client.get("/models").json()["data"]}
        assert seed_cards["poet"]["parent"] == "tiny" and seed_cards["poet"]["object"] == "chat.completion"

        texts = {}
        for name in ("sql", "poet", "tiny"):
            body = _complete(client, name)
            assert body["model"] == name
            texts[name] = body["choices"][0]["text"]
        assert texts["sql"] == _greedy_text(loaded, made["sql"][1], 6)
        assert texts["poet"] == _greedy_text(loaded, made["poet"][1], 6)
        assert texts["tiny"] == _greedy_text(loaded, loaded.model, 6)
        assert len(set(texts.values())) > 1

        messages = [{"role": "user", "content": "hello"}]
        chat = client.post("/v1/chat/completions", json={"model": "sql", "messages": messages, "max_tokens": 3})
        assert chat.status_code == 200 and chat.json()["model"] == "sql"
        responses = client.post("/v1/responses", json={"model": "poet", "input": "hello", "max_output_tokens": 3})
        assert responses.status_code == 200 and responses.json()["model"] == "poet", responses.text
        seed = client.post("/chat", json={"model": "sql", "messages": messages, "max_tokens": 3, "stream": False})
        assert seed.status_code == 200, seed.text
        assert client.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404

        off = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(made["sql"][0])})
        assert off.status_code == 403 and "--allow-runtime-lora" in off.json()["error"]["message"]
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}).status_code == 403


def test_runtime_loading_and_unloading_when_allowed(tiny_llama_dir, adapters, tmp_path) -> None:
    loaded, made = adapters
    with _client(tiny_llama_dir, adapters, allow_runtime_lora=True) as client:
        assert [c["id"] for c in client.get("/v1/models").json()["data"] if c["parent"]] == []
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "poet", "lora_path": str(made["poet"][0])})
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'poet' added successfully."
        assert client.get("/v1/models/poet").json()["parent"] == "tiny"
        assert _complete(client, "poet")["choices"][0]["text"] == _greedy_text(loaded, made["poet"][1], 6)

        again = client.post("/v1/load_lora_adapter", json={"lora_name": "poet", "lora_path": str(made["sql"][0])})
        assert again.status_code == 409
        taken = client.post("/v1/load_lora_adapter", json={"lora_name": "tiny", "lora_path": str(made["sql"][0])})
        assert taken.status_code == 409
        missing = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path / "none")})
        assert missing.status_code == 400 and missing.json()["error"]["code"] == "invalid_lora_adapter"
        assert client.post("/v1/load_lora_adapter", json={"lora_name": ""}).status_code == 400

        r = client.post("/v1/unload_lora_adapter", json={"lora_name": "poet"})
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'poet' removed successfully."
        assert client.post("/v1/completions", json={"model": "poet", "prompt": "x"}).status_code == 404
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "poet"}).status_code == 404
        assert "poet" not in [c["id"] for c in client.get("/v1/models").json()["data"]]

"""P-Tuning v2 checkpoints through the real start-up path and the HTTP API.

A tiny ChatGLM3 is the chat model; ``--ptuning NAME=PATH`` folders (built as THUDM's demos save
them) are served as NAME over it; a whole P-tuned checkpoint is served as its own model. What
the server answers is compared with ChatGLM3's own greedy decoding (the float64 reference of
tests/engines/test_ptuning_prefix.py), and bad checkpoints are refused at start-up.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from fastapi.testclient import TestClient

from glm_api.app import create_app
from glm_api.cli import settings_from_args
from glm_api.config import Settings
from glm_api.registry import StartupError, build_registry, resolve_model_sources
from tests.conftest import make_settings
from tests.engines.test_ptuning_prefix import raw_prefix, reference_prompt
from tests.fixtures.chatglm_reference import raw_checkpoint, reference_logits
from tests.fixtures.chatglm3_ptuning import build_ptuning
from tests.fixtures.chatglm3_tiny import build_tiny_chatglm3

BASE = "glm-base"
PROMPT = "今天北京的天气怎么样？"


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_chatglm3_dir):
    return {
        "tuned": build_ptuning(tmp_path_factory.mktemp("tuned"), tiny_chatglm3_dir, pre_seq_len=6, projection=False,
                               seed=3),
        "tuned-mlp": build_ptuning(tmp_path_factory.mktemp("tuned_mlp"), tiny_chatglm3_dir, pre_seq_len=20,
                                   projection=True, seed=4),
    }


def settings_for(tmp_path_factory, chat_model, **overrides) -> Settings:
    fields = {"kv_cache_tokens": 2048, **overrides}
    return make_settings(
        chat_model=str(chat_model), chat_model_name=BASE, device="cpu", model_dir=tmp_path_factory.mktemp("empty"),
        cache_dir=tmp_path_factory.mktemp("cache"), **fields,
    )


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_chatglm3_dir, folders):
    settings = settings_for(tmp_path_factory, tiny_chatglm3_dir, ptuning={k: str(v) for k, v in folders.items()})
    registry = build_registry(settings)
    with TestClient(create_app(settings, registry)) as test_client:
        yield test_client


def greedy_text(engine, base_dir, prefix_dir, prompt_ids: list[int], n: int) -> str:
    config, weights = raw_checkpoint(base_dir)
    prompt = reference_prompt(*raw_prefix(prefix_dir)) if prefix_dir is not None else None
    ids = list(prompt_ids)
    for _ in range(n):
        token = int(reference_logits(config, weights, ids, prompt)[-1].argmax())
        if token in engine.template.stop_token_ids:
            break
        ids.append(token)
    return engine.decode(ids[len(prompt_ids):])


def test_models_lists_each_prefix_with_its_base_as_parent(client):
    cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert cards[BASE]["kind"] == "chat" and cards[BASE]["parent"] is None
    for name in ("tuned", "tuned-mlp"):
        assert cards[name]["kind"] == "chat" and cards[name]["parent"] == BASE
        assert cards[name]["context_length"] == cards[BASE]["context_length"]
        assert client.get(f"/v1/models/{name}").json()["parent"] == BASE
    seed_cards = {m["id"]: m for m in client.get("/models").json()["data"]}
    assert seed_cards["tuned"]["parent"] == BASE


def test_model_name_routes_to_its_prefix_and_the_answer_is_chatglm3s_own(client, tiny_chatglm3_dir, folders):
    engine = client.app.state.glm.services.registry.chat
    prompt_ids = engine.tokenize([PROMPT])[0]
    texts = {}
    for name, folder in [(BASE, None), *folders.items()]:
        request = {"model": name, "prompt": prompt_ids, "max_tokens": 5, "temperature": 0}
        body = client.post("/v1/completions", json=request)
        assert body.status_code == 200, body.text
        body = body.json()
        assert body["model"] == name
        texts[name] = body["choices"][0]["text"]
        assert texts[name] == greedy_text(engine, tiny_chatglm3_dir, folder, prompt_ids, 5), name
    assert len(set(texts.values())) > 1  # the prefixes change the answer
    chat = client.post("/v1/chat/completions", json={
        "model": "tuned-mlp", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3, "temperature": 0,
    })
    assert chat.status_code == 200 and chat.json()["model"] == "tuned-mlp"
    tokens = client.post("/v1/tokenize", json={"model": "tuned", "prompt": PROMPT}).json()
    assert tokens["tokens"] == prompt_ids


def test_an_unknown_model_is_a_404_naming_the_chat_models(client):
    r = client.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404
    message = r.json()["error"]["message"]
    assert "'tuned'" in message and f"'{BASE}'" in message


def test_prefix_blocks_are_pinned_once_in_the_chat_models_pool(client):
    engine = client.app.state.glm.services.registry.chat
    assert set(engine.prefixes) == {"tuned", "tuned-mlp"}
    # 6 positions -> 1 block of 16, 20 -> 2 blocks: pinned once, whatever the requests.
    assert engine.kv.num_pinned == 3
    assert engine.kv.blocks.num_used == 3  # every request above is done


def test_a_whole_p_tuned_checkpoint_is_served_as_its_own_model(tmp_path_factory, tiny_chatglm3_dir):
    full = build_ptuning(tmp_path_factory.mktemp("full"), tiny_chatglm3_dir, pre_seq_len=7, projection=True,
                         layout="full", seed=9)
    settings = settings_for(tmp_path_factory, full)
    registry = build_registry(settings)
    with TestClient(create_app(settings, registry)) as client:
        engine = registry.chat
        assert engine.default_prefix is not None and engine.default_prefix.tokens == 7
        prompt_ids = engine.tokenize([PROMPT])[0]
        body = client.post("/v1/completions", json={"prompt": prompt_ids, "max_tokens": 5, "temperature": 0}).json()
        prefix_only = tmp_path_factory.mktemp("same_prefix")  # the reference reads the prefix from a .bin
        weights = {}
        from safetensors.torch import load_file

        for shard in sorted(full.glob("*.safetensors")):
            weights.update({k: v for k, v in load_file(shard).items() if k.startswith("transformer.prefix_encoder.")})
        torch.save(weights, prefix_only / "pytorch_model.bin")
        shutil.copy(full / "config.json", prefix_only / "config.json")
        expected = greedy_text(engine, tiny_chatglm3_dir, prefix_only, prompt_ids, 5)
        assert body["model"] == BASE and body["choices"][0]["text"] == expected
        assert [m["id"] for m in client.get("/v1/models").json()["data"] if m["kind"] == "chat"] == [BASE]


# -- start-up errors ---------------------------------------------------------------------------


def refused(tmp_path_factory, chat_model, **overrides) -> str:
    """The one line the server exits with (the loaders' ValueErrors are reported as they are)."""
    settings = settings_for(tmp_path_factory, chat_model, **overrides)
    with pytest.raises((StartupError, ValueError)) as info:
        build_registry(settings, resolve_model_sources(settings))
    return str(info.value)


@pytest.mark.parametrize(("field", "value"), [("num_layers", 3), ("kv_channels", 8), ("multi_query_group_num", 1)])
def test_a_prefix_for_another_model_shape_is_refused(tmp_path_factory, tiny_chatglm3_dir, field, value):
    other = build_tiny_chatglm3(tmp_path_factory.mktemp("other"), **{field: value})
    folder = build_ptuning(tmp_path_factory.mktemp("mismatch"), other, pre_seq_len=4, projection=False)
    message = refused(tmp_path_factory, tiny_chatglm3_dir, ptuning={"bad": str(folder)})
    assert "'bad'" in message and field in message and "another model shape" in message


def test_a_prefix_without_its_weights_is_refused(tmp_path_factory, tiny_chatglm3_dir):
    folder = build_ptuning(tmp_path_factory.mktemp("noweights"), tiny_chatglm3_dir, pre_seq_len=4, projection=True)
    weights = torch.load(folder / "pytorch_model.bin", weights_only=True)
    del weights["transformer.prefix_encoder.trans.2.bias"]
    torch.save(weights, folder / "pytorch_model.bin")
    message = refused(tmp_path_factory, tiny_chatglm3_dir, ptuning={"bad": str(folder)})
    assert "transformer.prefix_encoder.trans.2.bias" in message and "missing" in message
    (folder / "pytorch_model.bin").unlink()
    assert "no weights found" in refused(tmp_path_factory, tiny_chatglm3_dir, ptuning={"bad": str(folder)})


def test_a_prefix_whose_weights_disagree_with_its_config_is_refused(tmp_path_factory, tiny_chatglm3_dir):
    folder = build_ptuning(tmp_path_factory.mktemp("badshape"), tiny_chatglm3_dir, pre_seq_len=4, projection=False)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "pre_seq_len": 5}))
    message = refused(tmp_path_factory, tiny_chatglm3_dir, ptuning={"bad": str(folder)})
    assert "has shape (4, 128), expected (5, 128)" in message


def test_a_prefix_over_a_model_that_is_not_chatglm3_is_refused(tmp_path_factory, tiny_llama_dir, folders):
    settings = settings_for(tmp_path_factory, tiny_llama_dir, ptuning={"tuned": str(folders["tuned"])})
    with pytest.raises(StartupError, match="over a ChatGLM3 chat model"):
        resolve_model_sources(settings)


def test_a_folder_that_is_not_p_tuned_or_a_taken_name_is_refused(tmp_path_factory, tiny_chatglm3_dir, folders):
    settings = settings_for(tmp_path_factory, tiny_chatglm3_dir, ptuning={"x": str(tiny_chatglm3_dir)})
    with pytest.raises(StartupError, match="not a P-Tuning v2 checkpoint"):
        resolve_model_sources(settings)
    settings = settings_for(tmp_path_factory, tiny_chatglm3_dir, ptuning={BASE: str(folders["tuned"])})
    with pytest.raises(StartupError, match="already the name of another model"):
        resolve_model_sources(settings)
    settings = settings_for(tmp_path_factory, tiny_chatglm3_dir, ptuning={"x": "/no/such/folder"})
    with pytest.raises(StartupError, match="does not exist"):
        resolve_model_sources(settings)


def test_a_prefix_only_folder_as_the_chat_model_says_to_use_ptuning(tmp_path_factory, folders):
    assert "--ptuning NAME=PATH" in refused(tmp_path_factory, folders["tuned"])


def test_a_prefix_the_kv_cache_cannot_hold_is_refused(tmp_path_factory, tiny_chatglm3_dir):
    folder = build_ptuning(tmp_path_factory.mktemp("long"), tiny_chatglm3_dir, pre_seq_len=64, projection=False)
    message = refused(tmp_path_factory, tiny_chatglm3_dir, ptuning={"long": str(folder)}, kv_cache_tokens=64)
    assert "--kv-cache-tokens" in message and "'long'" in message


def test_ptuning_from_flags_and_environment(monkeypatch):
    assert settings_from_args(["--ptuning", "a=/p/a", "--ptuning", "b=/p/b"]).ptuning == {"a": "/p/a", "b": "/p/b"}
    monkeypatch.setenv("GLM_API_PTUNING", "a=/p/a, b=/p/b")
    assert Settings(_env_file=None).ptuning == {"a": "/p/a", "b": "/p/b"}
    monkeypatch.setenv("GLM_API_PTUNING", "nameless")
    with pytest.raises(ValueError, match="P-Tuning v2 checkpoint 'nameless' is not NAME=PATH"):
        Settings(_env_file=None)

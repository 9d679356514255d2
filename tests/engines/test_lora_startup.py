"""``--lora NAME=PATH`` / ``GLM_API_LORA``: adapters load with the chat model, or the server
refuses to start with a message that says what is wrong (real tiny models, real peft folders)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from glm_api.cli import settings_from_args
from glm_api.config import Settings
from glm_api.registry import ModelSource, ModelSources, StartupError, build_registry, resolve_model_sources
from tests.fixtures.lora_adapters import LLAMA_TARGETS, make_lora

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llama_adapter(tiny_llama_dir: Path, tmp_path_factory) -> Path:
    from glm_api.families.detect import load_chat_model

    loaded = load_chat_model(tiny_llama_dir, CPU, torch.float32, tmp_path_factory.mktemp("cache"))
    folder = tmp_path_factory.mktemp("sql")
    make_lora(loaded.model, folder, LLAMA_TARGETS, r=4, alpha=8, copy_model=False)
    return folder


def test_lora_flags_and_env_are_name_path_pairs(monkeypatch) -> None:
    settings = settings_from_args(["--lora", "sql=/a/sql", "--lora", "poet=/b/poet", "--allow-runtime-lora"])
    assert settings.lora == {"sql": "/a/sql", "poet": "/b/poet"} and settings.allow_runtime_lora
    monkeypatch.setenv("GLM_API_LORA", "sql=/a/sql, poet=/b/poet")
    assert Settings(_env_file=None).lora == {"sql": "/a/sql", "poet": "/b/poet"}
    assert not Settings(_env_file=None).allow_runtime_lora
    with pytest.raises(ValueError, match="LoRA adapter 'sql' is not NAME=PATH"):
        Settings(_env_file=None, lora="sql")


def _settings(chat: Path, **kw) -> Settings:
    return Settings(_env_file=None, chat_model=str(chat), chat_model_name="tiny", **kw)


def test_adapter_folder_without_weights_is_refused_before_loading(tiny_llama_dir, tiny_bert_dir, llama_adapter, tmp_path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(llama_adapter, broken)
    (broken / "adapter_model.safetensors").unlink()
    settings = _settings(tiny_llama_dir, lora={"sql": str(broken)}, embedding_models={"e": str(tiny_bert_dir)})
    with pytest.raises(StartupError, match=r"--lora sql=.*broken: .* has no weight file"):
        resolve_model_sources(settings)
    with pytest.raises(StartupError, match=r"'tiny' is already the name of a model"):
        resolve_model_sources(_settings(tiny_llama_dir, lora={"tiny": str(llama_adapter)}, embedding_models={"e": str(tiny_bert_dir)}))


def test_adapters_load_with_the_chat_model_or_the_server_does_not_start(tiny_llama_dir, tiny_chatglm3_dir, llama_adapter) -> None:
    settings = _settings(tiny_llama_dir, lora={"sql": str(llama_adapter)})
    registry = build_registry(settings, ModelSources(ModelSource("tiny", tiny_llama_dir), (), (), loras=(ModelSource("sql", llama_adapter),)))
    try:
        assert registry.adapters == {"sql": str(llama_adapter)}
        assert registry.chat_engine("sql").model_name == "sql"
        assert registry.chat.adapters == ["sql"]
    finally:
        registry.stop()
    # The same adapter over a ChatGLM3 model: modules of another architecture.
    settings = _settings(tiny_chatglm3_dir, lora={"sql": str(llama_adapter)})
    sources = ModelSources(ModelSource("glm", tiny_chatglm3_dir), (), (), loras=(ModelSource("sql", llama_adapter),))
    with pytest.raises(StartupError, match=r"--lora sql=.*: LoRA adapter 'sql' .* (does not have|does not fit)"):
        build_registry(settings, sources)

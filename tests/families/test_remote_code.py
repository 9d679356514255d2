"""Remote code runs only for a chat model the operator names, and the log says so."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from glm_api.families.detect import detect_chat_family, load_chat_model
from glm_api.registry import StartupError, build_registry, resolve_model_sources
from tests.conftest import make_settings

CONFIGURATION = '''
from transformers import LlamaConfig


class EchoConfig(LlamaConfig):
    model_type = "echo_llama"
'''
MODELING = '''
from transformers import LlamaForCausalLM

from .configuration_echo import EchoConfig


class EchoForCausalLM(LlamaForCausalLM):
    config_class = EchoConfig
    ran_from_the_folder = True
'''


@pytest.fixture(scope="module")
def remote_code_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama, relabelled as a model type only its own Python files define."""
    folder = tmp_path_factory.mktemp("remote") / "echo-llama"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "configuration_echo.py").write_text(CONFIGURATION)
    (folder / "modeling_echo.py").write_text(MODELING)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="echo_llama",
        architectures=["EchoForCausalLM"],
        auto_map={"AutoConfig": "configuration_echo.EchoConfig", "AutoModelForCausalLM": "modeling_echo.EchoForCausalLM"},
    )
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_refused_unless_trusted(remote_code_dir, tmp_path):
    with pytest.raises(ValueError, match="remote code is never run"):
        detect_chat_family(remote_code_dir)
    with pytest.raises(StartupError, match="auto_map"):
        resolve_model_sources(make_settings(chat_model=str(remote_code_dir), model_dir=tmp_path))


def test_trusting_another_name_is_refused(remote_code_dir, tmp_path):
    settings = make_settings(chat_model=str(remote_code_dir), model_dir=tmp_path, trust_remote_code=["all-MiniLM-L6-v2"])
    with pytest.raises(StartupError, match="only ever allowed for the chat model"):
        resolve_model_sources(settings)


def test_trusted_by_name_it_loads_its_own_code_and_says_so(remote_code_dir, tmp_path, caplog):
    settings = make_settings(
        chat_model=str(remote_code_dir), chat_model_name="echo", model_dir=tmp_path, trust_remote_code=["echo"],
        cache_dir=tmp_path / "cache", device="cpu",
    )
    with caplog.at_level(logging.WARNING, logger="glm_api.registry"):
        registry = build_registry(settings)
    assert "trust_remote_code is ON for echo" in caplog.text
    assert type(registry.chat.model).__name__ == "EchoForCausalLM"
    assert getattr(registry.chat.model, "ran_from_the_folder", False)
    assert registry.chat.family == "transformers (remote code)"


def test_load_chat_model_keeps_it_off_by_default(remote_code_dir, tmp_path):
    with pytest.raises(ValueError, match="remote code"):
        load_chat_model(remote_code_dir, torch.device("cpu"), torch.float32, tmp_path)

"""/tokenize and /v1/tokenize give a text's ids as the model's own tokenizer encodes it by default.

The tiny Llama carries SmolLM2's GPT-2 style tokenizer, which adds no special token; a copy
saved with ``add_bos_token`` adds a BOS, as Llama tokenizers do. The expected ids come from the
HF tokenizer loaded from the folder, with its default ``add_special_tokens``.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from glm_api.app import create_app
from glm_api.families.detect import load_chat_model
from tests.conftest import make_registry, make_settings

TEXT = "Hello world, this is glm-api."


@pytest.fixture(scope="module")
def bos_llama_dir(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bos-llama")
    shutil.copytree(tiny_llama_dir, folder, dirs_exist_ok=True)
    AutoTokenizer.from_pretrained(tiny_llama_dir, add_bos_token=True).save_pretrained(folder)
    return folder


def serve(folder, cache_dir):
    settings = make_settings(chat_model_name="tiny-llama")
    loaded = load_chat_model(folder, torch.device("cpu"), torch.float32, cache_dir)
    return TestClient(create_app(settings, make_registry(loaded, {}, settings)))


@pytest.mark.parametrize("bos", [False, True], ids=["gpt2-style", "llama-bos"])
def test_tokenize_adds_what_the_tokenizer_adds_by_default(bos, tiny_llama_dir, bos_llama_dir, tmp_path):
    folder = bos_llama_dir if bos else tiny_llama_dir
    tokenizer = AutoTokenizer.from_pretrained(folder)
    expected = tokenizer.encode(TEXT)  # the tokenizer's own default add_special_tokens
    plain = tokenizer.encode(TEXT, add_special_tokens=False)
    assert expected == ([tokenizer.bos_token_id] if bos else []) + plain  # the fixture is what it claims
    with serve(folder, tmp_path) as client:
        body = client.post("/tokenize", json={"prompt": TEXT}).json()
        assert body["tokenIds"] == expected
        assert body["tokens"] == tokenizer.convert_ids_to_tokens(expected)
        cut = client.post("/tokenize", json={"prompt": TEXT, "max_tokens": 2}).json()
        assert (cut["tokenIds"], cut["tokens"]) == (expected[:2], body["tokens"][:2])  # the BOS counts
        twin = client.post("/v1/tokenize", json={"prompt": TEXT}).json()
        assert (twin["tokens"], twin["token_strs"], twin["count"]) == (expected, body["tokens"], len(expected))
        # A chat's prompt is the template's alone: the BOS a plain text gets is not added again.
        messages = [{"role": "user", "content": TEXT}]
        counted = client.post("/v1/tokenize", json={"messages": messages}).json()
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert counted["tokens"] == tokenizer.encode(rendered, add_special_tokens=False)

"""GLM models through the seed routes: a ./model folder in the seed's layout, loaded for real.

The folders hold tiny models the fixtures build (random weights in the real formats): a
ChatGLM3 checkpoint as chatglm3-6b-32k, a BERT without pooling config as
text2vec-large-chinese, an ERNIE sentence-transformers folder as
text2vec-base-chinese-paraphrase.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece as spm
import torch
from fastapi.testclient import TestClient
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer

from glm_api.app import create_app
from glm_api.registry import build_registry
from tests.api.test_seed_api import assert_error, sse_events
from tests.conftest import make_registry, make_settings
from tests.fixtures.chatglm3_tools import EXPECTED_CALL, TOOL_CONVERSATION, TOOL_QUESTION, TOOL_SYSTEM

CHAT = "chatglm3-6b-32k"
LARGE = "text2vec-large-chinese"
PARAPHRASE = "text2vec-base-chinese-paraphrase"


@pytest.fixture(scope="module")
def seed_model_dir(tmp_path_factory, tiny_chatglm3_dir, tiny_bert_dir, tiny_ernie_st_dir):
    root = tmp_path_factory.mktemp("seed-layout")
    (root / CHAT).symlink_to(tiny_chatglm3_dir, target_is_directory=True)
    (root / LARGE).symlink_to(tiny_bert_dir, target_is_directory=True)
    (root / PARAPHRASE).symlink_to(tiny_ernie_st_dir, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def glm_client(seed_model_dir, tmp_path_factory):
    settings = make_settings(model_dir=seed_model_dir, cache_dir=tmp_path_factory.mktemp("cache"), device="cpu")
    registry = build_registry(settings)  # the real start-up path: detection and loading
    with TestClient(create_app(settings, registry)) as client:
        yield client


@pytest.fixture(scope="module")
def chatglm3(glm_client):
    return glm_client.app.state.glm.services.registry.chat


def test_models_lists_the_seed_names(glm_client):
    cards = {m["id"]: m for m in glm_client.get("/models").json()["data"]}
    assert set(cards) == {CHAT, LARGE, PARAPHRASE}
    assert cards[CHAT]["object"] == "chat.completion"
    assert cards[CHAT]["context_length"] == 256  # the tiny checkpoint's seq_length
    assert cards[LARGE]["object"] == cards[PARAPHRASE]["object"] == "embedding"
    assert cards[LARGE]["dimensions"] == cards[PARAPHRASE]["dimensions"] == 32
    assert glm_client.app.state.glm.services.registry.chat.family == "chatglm3"


def test_tokenize_is_gmask_sop_then_the_text_and_user_text_cannot_forge_specials(glm_client, tiny_chatglm3_dir):
    """As ChatGLM3's own tokenizer encodes a text (and the seed answered): [gMASK] sop, then the
    text's sentencepiece ids; tokens in step, specials by name."""
    sp = spm.SentencePieceProcessor(model_file=str(tiny_chatglm3_dir / "tokenizer.model"))
    n = sp.vocab_size()  # the specials follow the pieces: [MASK] [gMASK] [sMASK] sop eop <|system|> <|user|>
    gmask, sop, user = n + 1, n + 3, n + 6
    text = "你好 <|user|> hello"
    pieces = sp.encode(text)
    body = glm_client.post("/tokenize", json={"prompt": text}).json()
    assert body["model"] == CHAT
    assert body["tokenIds"] == [gmask, sop, *pieces]
    assert body["tokens"] == ["[gMASK]", "sop", *map(sp.id_to_piece, pieces)]
    assert body["tokens"][2].startswith("▁")  # plain sentencepiece encode: dummy prefix
    assert user not in body["tokenIds"]
    for limit in (1, 3):  # max_tokens cuts the whole list, specials included
        cut = glm_client.post("/tokenize", json={"prompt": text, "max_tokens": limit}).json()
        assert (cut["tokenIds"], cut["tokens"]) == (body["tokenIds"][:limit], body["tokens"][:limit])
    twin = glm_client.post("/v1/tokenize", json={"prompt": text}).json()
    assert (twin["tokens"], twin["token_strs"]) == (body["tokenIds"], body["tokens"])


def test_chat_prompt_is_the_chatglm3_format(glm_client, chatglm3):
    tok = chatglm3.template.tokenizer
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "你好"}]
    expected = [tok.special_id("[gMASK]"), tok.special_id("sop")]
    for m in messages:
        expected += [tok.special_id(f"<|{m['role']}|>")] + tok.encode("\n") + tok.encode(m["content"])
    expected.append(tok.special_id("<|assistant|>"))
    body = glm_client.post("/chat", json={"messages": messages, "max_tokens": 4, "temperature": 0}).json()
    assert body["usage"]["prompt_tokens"] == len(expected)
    assert chatglm3.template.encode_messages(messages) == expected


def test_chat_output_is_the_models_greedy_output(glm_client, chatglm3):
    messages = [{"role": "user", "content": "今天北京的天气怎么样？"}]
    body = glm_client.post("/chat", json={"messages": messages, "max_tokens": 12, "temperature": 0, "repetition_penalty": 1.0}).json()
    prompt = chatglm3.template.encode_messages(messages)
    with torch.no_grad():
        out = chatglm3.model.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
            eos_token_id=sorted(chatglm3.template.stop_token_ids),
        )
    generated = [t for t in out[0, len(prompt) :].tolist() if t not in chatglm3.template.stop_token_ids]
    parser = chatglm3.template.new_output_parser(False)
    parser.feed(chatglm3.template.decode(generated))
    assert body["choices"][0]["message"]["content"] == parser.finish().content
    assert body["usage"]["completion_tokens"] == len(out[0]) - len(prompt)


def test_chat_stream_on_chatglm3(glm_client):
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 10, "temperature": 0, "stream": True}
    whole = glm_client.post("/chat", json={**body, "stream": False}).json()["choices"][0]
    events = sse_events(glm_client.post("/chat", json=body))
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == whole["message"]["content"]
    assert events[-2]["choices"][0]["finish_reason"] == whole["finish_reason"]


def test_prompt_over_the_32k_style_context_is_400(glm_client):
    long_text = "北京 " * 400  # well over the tiny checkpoint's 256 positions
    error = assert_error(glm_client.post("/chat", json={"messages": [{"role": "user", "content": long_text}]}), 400)
    assert error["code"] == "context_length_exceeded"


def mean_pooled(folder, texts: list[str], max_length: int) -> np.ndarray:
    """Mean pooling over the attention mask, computed here from the raw encoder."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return ((hidden * mask).sum(1) / mask.sum(1)).numpy()


def test_embedding_default_is_text2vec_large_with_mean_pooling(glm_client, tiny_bert_dir):
    texts = ["你好", "今天北京的天气怎么样？"]
    body = glm_client.post("/embedding", json={"prompt": texts}).json()
    assert body["model"] == LARGE  # the seed's default when it is loaded
    vectors = np.array(body["data"], dtype=np.float32)
    np.testing.assert_allclose(vectors, mean_pooled(tiny_bert_dir, texts, 256), atol=1e-5)
    assert not np.allclose(np.linalg.norm(vectors, axis=1), 1.0)  # unnormalised, as the seed


def test_embedding_paraphrase_uses_its_pooling_config(glm_client, tiny_ernie_st_dir):
    texts = ["明天一起去公园", "hello world"]
    body = glm_client.post("/embedding", json={"model": PARAPHRASE, "prompt": texts}).json()
    assert body["model"] == PARAPHRASE
    reference = SentenceTransformer(str(tiny_ernie_st_dir), device="cpu").encode(texts)
    np.testing.assert_allclose(np.array(body["data"]), reference, atol=1e-5)


@pytest.fixture(scope="module")
def tool_client(tool_calling_chatglm3):
    settings = make_settings(chat_model_name=CHAT)
    with TestClient(create_app(settings, make_registry(tool_calling_chatglm3, {}, settings))) as client:
        yield client


def test_seed_function_call_is_parsed_not_executed(tool_client):
    body = tool_client.post(
        "/chat", json={"messages": TOOL_CONVERSATION, "temperature": 0, "return_function_call": True, "max_tokens": 60}
    ).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "function_call"
    call = json.loads(choice["message"]["content"])
    assert call == {"name": EXPECTED_CALL.name, "parameters": json.loads(EXPECTED_CALL.arguments)}
    assert body["history"][-1]["role"] == "assistant"
    assert body["history"][-1]["metadata"] == "get_weather"


def test_seed_function_call_streams_as_one_piece(tool_client):
    events = sse_events(tool_client.post(
        "/chat", json={"messages": TOOL_CONVERSATION, "temperature": 0, "return_function_call": True, "stream": True}
    ))
    deltas = [e["choices"][0]["delta"].get("content") for e in events[1:-1]]
    assert json.loads("".join(d for d in deltas if d))["name"] == "get_weather"
    assert events[-2]["choices"][0]["finish_reason"] == "function_call"


def test_observation_is_fed_back(tool_client, tool_calling_chatglm3):
    call = json.dumps({"name": "get_weather", "parameters": {"city": "北京"}}, ensure_ascii=False)
    messages = [
        TOOL_SYSTEM, TOOL_QUESTION,
        {"role": "assistant", "metadata": "get_weather", "content": call},
        {"role": "observation", "content": '{"temperature": 22}'},
    ]
    body = tool_client.post("/chat", json={"messages": messages, "temperature": 0, "max_tokens": 8}).json()
    assert body["choices"][0]["finish_reason"] in {"stop", "length"}
    template = tool_calling_chatglm3.template
    prompt = template.encode_messages([{**m, "role": "tool"} if m["role"] == "observation" else m for m in messages])
    observation = template.tokenizer.special_id("<|observation|>")
    assert observation in prompt
    tail = prompt[prompt.index(observation) :]
    assert template.tokenizer.encode('{"temperature": 22}') == tail[-1 - len(template.tokenizer.encode('{"temperature": 22}')) : -1]
    assert body["usage"]["prompt_tokens"] == len(prompt)


def test_glm4_hf_layout_served_through_the_generic_path(tiny_glm4_dir, tmp_path):
    settings = make_settings(chat_model=str(tiny_glm4_dir), chat_model_name="glm-4-9b-chat-hf",
                             embedding_models={}, cache_dir=tmp_path, device="cpu")
    from tests.fixtures.tiny_encoders import build_tiny_bert

    settings.embedding_models = {"tiny": str(build_tiny_bert(tmp_path / "bert", with_pooling_config=False))}
    with TestClient(create_app(settings, build_registry(settings))) as client:
        body = client.post("/chat", json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "temperature": 0}).json()
        assert body["model"] == "glm-4-9b-chat-hf"
        assert body["usage"]["completion_tokens"] >= 1
        events = sse_events(client.post("/chat", json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "temperature": 0, "stream": True}))
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == body["choices"][0]["message"]["content"]
        assert client.app.state.glm.services.registry.chat.family == "transformers"

"""The generic transformers chat family: detection, loading, templates, GGUF cache, tool calls.

Real checkpoints throughout: tiny random Llama / GLM-4 folders built by the fixtures, and the
packaged SmolLM2 GGUF (converted once per session).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

# Registered as a plugin below; marked first so importing its helpers here does not warn.
pytest.register_assert_rewrite("tests.fixtures.tiny_causal_lm")

from glm_api.families.base import ChatTemplate, PassthroughParser, ToolCall
from glm_api.families.detect import detect_chat_family, load_chat_model
from glm_api.families.hf_template import GlmToolParser, HermesToolParser
from glm_api.families.timing_store import FILE_NAME as TIMINGS
from glm_api.families.transformers_lm import (
    gguf_cache_folder,
    load_gguf,
    load_transformers_lm,
    packaged_chat_gguf,
    remove_stale_temps,
)
from tests.fixtures.tiny_causal_lm import GgufConversion, build_tiny_glm4_hf, probe

pytest_plugins = ["tests.fixtures.tiny_causal_lm"]

CPU = torch.device("cpu")
F32 = torch.float32


def write_config(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@torch.inference_mode()
def greedy(model: torch.nn.Module, prompt: list[int], stop_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stop_ids,
        pad_token_id=stop_ids[0],
    )
    return out[0, len(prompt) :].tolist()


def assert_generation_stops(model: torch.nn.Module, prompt: list[int], stop_ids: frozenset[int]) -> None:
    """Greedy generation ends at the first stop token or at max_new_tokens, nothing past it."""
    new = greedy(model, prompt, sorted(stop_ids), 8)
    assert 1 <= len(new) <= 8
    assert not stop_ids & set(new[:-1])
    assert len(new) == 8 or new[-1] in stop_ids
    # Make a token the model does produce a stop token: generation must end right there.
    k = min(2, len(new) - 1)
    cut = greedy(model, prompt, [new[k]], 8)
    assert cut == new[: new.index(new[k]) + 1]


# --- detection ---------------------------------------------------------------------------------


def test_detect_gguf_file_and_folder(tmp_path: Path) -> None:
    gguf = packaged_chat_gguf()
    assert gguf is not None and gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert detect_chat_family(gguf) == "gguf"
    folder = tmp_path / "smol"
    folder.mkdir()
    (folder / "model.gguf").symlink_to(gguf)
    assert detect_chat_family(folder) == "gguf"
    (folder / "other.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several GGUF files"):
        detect_chat_family(folder)


def test_detect_transformers_folders(tiny_llama_dir: Path, tiny_glm4_dir: Path) -> None:
    assert detect_chat_family(tiny_llama_dir) == "transformers"
    assert detect_chat_family(tiny_glm4_dir) == "transformers"


CHATGLM_CONFIG = {
    "architectures": ["ChatGLMModel"],
    "model_type": "chatglm",
    "auto_map": {"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"},
    "kv_channels": 128,
}


def test_detect_chatglm3_config(tmp_path: Path) -> None:
    folder = write_config(tmp_path / "chatglm3-6b", CHATGLM_CONFIG)
    assert detect_chat_family(folder) == "chatglm3"


def test_glm4_remote_code_folder_is_native_and_chatglm_v1_is_refused(tmp_path: Path) -> None:
    """GLM-4-9B-chat's remote-code layout is ChatGLM3's (loaded natively with its own tokenizer);
    ChatGLM-6B v1 (no kv_channels) shares model_type "chatglm" but not the layout."""
    folder = write_config(tmp_path / "glm-4-9b-chat", CHATGLM_CONFIG)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ChatGLM4Tokenizer"}))
    assert detect_chat_family(folder) == "chatglm3"
    v1 = {k: v for k, v in CHATGLM_CONFIG.items() if k != "kv_channels"}
    with pytest.raises(ValueError, match="remote code is never run.*ChatGLM2/3 and GLM-4-9B-chat"):
        detect_chat_family(write_config(tmp_path / "chatglm-6b", v1))


def test_refuses_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "model" / "chatglm3-6b"
    with pytest.raises(ValueError) as info:
        detect_chat_family(missing)
    message = str(info.value)
    assert str(missing) in message
    assert "nothing is downloaded" in message
    assert "./model/<name>" in message and "GLM_API_CHAT_MODEL" in message


def test_refuses_empty_folder_and_other_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a config.json nor a .gguf"):
        detect_chat_family(tmp_path)
    stray = tmp_path / "weights.bin"
    stray.write_bytes(b"\0")
    with pytest.raises(ValueError, match="not a .gguf"):
        detect_chat_family(stray)


def test_refuses_encoder_only_config(tmp_path: Path) -> None:
    folder = write_config(tmp_path / "bert", {"architectures": ["BertModel"], "model_type": "bert"})
    with pytest.raises(ValueError, match="not a causal language model"):
        detect_chat_family(folder)
    with pytest.raises(ValueError, match="not a causal language model"):
        load_transformers_lm(folder, CPU, F32)


def test_refuses_remote_code_config(tmp_path: Path) -> None:
    folder = write_config(
        tmp_path / "custom",
        {
            "architectures": ["MyLMForCausalLM"],
            "model_type": "my_lm",
            "auto_map": {"AutoModelForCausalLM": "modeling_my_lm.MyLMForCausalLM"},
        },
    )
    with pytest.raises(ValueError, match="auto_map.*remote code is never run"):
        detect_chat_family(folder)
    with pytest.raises(ValueError, match="remote code"):
        load_chat_model(folder, CPU, F32, tmp_path / "cache")


def test_refuses_folder_without_chat_template(tiny_llama_dir: Path, tmp_path: Path) -> None:
    base = tmp_path / "base-model"
    shutil.copytree(tiny_llama_dir, base)
    (base / "chat_template.jinja").unlink()
    assert "chat_template" not in json.loads((base / "tokenizer_config.json").read_text())
    with pytest.raises(ValueError, match="no chat template"):
        load_transformers_lm(base, CPU, F32)


# --- tiny transformers models --------------------------------------------------------------------


def test_tiny_llama_loads_formats_and_generates(tiny_llama_dir: Path, tmp_path: Path) -> None:
    loaded = load_chat_model(tiny_llama_dir, CPU, F32, tmp_path)
    template = loaded.template
    assert isinstance(template, ChatTemplate)
    assert (loaded.family, loaded.context_length, loaded.source) == ("transformers", 512, str(tiny_llama_dir))
    assert not loaded.model.training
    assert template.stop_token_ids == frozenset({2})  # <|im_end|>
    assert template.supports_tools is False

    messages = [
        {"role": "system", "content": "Be brief.", "metadata": "ignored"},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    ids = template.encode_messages(messages)
    tokenizer = template.tokenizer
    text = tokenizer.apply_chat_template(
        [{k: v for k, v in m.items() if k != "metadata"} for m in messages],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert ids == tokenizer.encode(text, add_special_tokens=False)

    plain = template.encode("Hello world")
    assert template.decode(plain) == "Hello world"
    assert len(template.convert_ids_to_tokens(ids)) == len(ids)
    assert template.decode(ids).startswith("system\nBe brief.")  # special tokens left out

    with pytest.raises(ValueError, match="does not support tools"):
        template.encode_messages(messages, tools=[{"name": "f", "parameters": {}}])
    assert isinstance(template.new_output_parser(tools_enabled=False), PassthroughParser)

    assert_generation_stops(loaded.model, ids, template.stop_token_ids)


def test_tiny_glm4_loads_formats_and_generates(tiny_glm4_dir: Path, tmp_path: Path) -> None:
    loaded = load_chat_model(tiny_glm4_dir, CPU, F32, tmp_path)
    template = loaded.template
    tokenizer = template.tokenizer
    assert type(loaded.model).__name__ == "Glm4ForCausalLM"
    assert loaded.family == "transformers"
    assert loaded.context_length == 1024  # tokenizer limit, below max_position_embeddings 2048
    special = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "<|observation|>"])
    assert template.stop_token_ids == frozenset(special)
    assert template.supports_tools is True

    ids = template.encode_messages(
        [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "Hello, how are you?"}]
    )
    expected = "[gMASK]<sop><|system|>\n你是助手<|user|>\nHello, how are you?<|assistant|>"
    assert ids == tokenizer.encode(expected, add_special_tokens=False)
    assert ids[:2] == tokenizer.convert_tokens_to_ids(["[gMASK]", "<sop>"])

    with pytest.raises(ValueError, match="cannot format.*no role function"):
        template.encode_messages([{"role": "function", "content": "x"}])

    assert_generation_stops(loaded.model, ids, template.stop_token_ids)


def test_glm4_tool_conversation(tiny_glm4_dir: Path) -> None:
    loaded = load_transformers_lm(tiny_glm4_dir, CPU, F32)
    template = loaded.template
    weather = {"name": "get_weather", "description": "Weather of a city", "parameters": {"type": "object"}}
    messages = [
        {"role": "system", "content": "", "tools": [weather]},  # seed style: tools on the system message
        {"role": "user", "content": "Weather in Beijing?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [ToolCall(name="get_weather", arguments='{"city": "Beijing"}', id="call_1")],
        },
        {"role": "tool", "name": "get_weather", "content": '{"temp": 20}'},
    ]
    # The same tool also passed as an OpenAI tool must be shown once.
    ids = template.encode_messages(messages, tools=[{"type": "function", "function": weather}])
    text = template.tokenizer.decode(ids)
    assert text.count("## get_weather") == 1
    assert '<|assistant|>get_weather\n{"city": "Beijing"}<|observation|>\n{"temp": 20}<|assistant|>' in text

    with pytest.raises(ValueError, match="arguments are not valid JSON"):
        template.encode_messages([{"role": "assistant", "content": "", "tool_calls": [ToolCall("f", "{oops")]}])
    assert isinstance(template.new_output_parser(tools_enabled=True), GlmToolParser)
    assert isinstance(template.new_output_parser(tools_enabled=False), GlmToolParser)


def test_glm_hf_layout_loads_and_generates(tmp_path: Path) -> None:
    folder = build_tiny_glm4_hf(tmp_path / "glm-4-9b-chat-hf-tiny", model_type="glm")
    loaded = load_chat_model(folder, CPU, F32, tmp_path / "cache")
    assert type(loaded.model).__name__ == "GlmForCausalLM"
    ids = loaded.template.encode_messages([{"role": "user", "content": "Hello"}])
    assert_generation_stops(loaded.model, ids, loaded.template.stop_token_ids)


# --- GGUF ------------------------------------------------------------------------------------------


def test_gguf_cache_key_follows_the_file(tmp_path: Path) -> None:
    file = tmp_path / "m.gguf"
    file.write_bytes(b"GGUF" + b"\0" * 12)
    first = gguf_cache_folder(file, tmp_path / "cache")
    os.utime(file, ns=(0, 1_000_000_000))
    touched = gguf_cache_folder(file, tmp_path / "cache")
    file.write_bytes(b"GGUF" + b"\0" * 20)
    os.utime(file, ns=(0, 1_000_000_000))
    grown = gguf_cache_folder(file, tmp_path / "cache")
    assert len({first, touched, grown}) == 3
    assert first.parent == tmp_path / "cache" and first.name.startswith("m-")


def test_stale_conversion_temps_are_removed(tmp_path: Path) -> None:
    stale, fresh = tmp_path / ".m-16-1.tmp-a", tmp_path / ".m-16-1.tmp-b"
    other_model = tmp_path / ".other-1-1.tmp-c"
    for folder in (stale, fresh, other_model):
        folder.mkdir()
    os.utime(stale, (0, time.time() - 7200))
    os.utime(other_model, (0, time.time() - 7200))
    remove_stale_temps(tmp_path / "m-16-1")
    assert not stale.exists() and fresh.exists() and other_model.exists()


def test_smollm2_gguf_converts_once_then_loads_from_cache(
    smollm2_conversion: GgufConversion, caplog: pytest.LogCaptureFixture
) -> None:
    conv = smollm2_conversion
    assert (conv.cache_folder / "config.json").is_file()
    assert (conv.cache_folder / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((conv.cache_folder / "config.json").read_text())
    # no temp leftovers (servers started on this cache dir keep their kernel timings beside it)
    assert [p.name for p in conv.cache_dir.iterdir() if not p.name.startswith(TIMINGS)] == [conv.cache_folder.name]

    caplog.set_level(logging.INFO, logger="glm_api")
    start = time.monotonic()
    loaded = load_chat_model(conv.gguf_file, CPU, F32, conv.cache_dir)
    seconds = time.monotonic() - start
    assert "from cache" in caplog.text
    assert Path(loaded.model.name_or_path) == conv.cache_folder
    assert seconds < conv.seconds / 2, (seconds, conv.seconds)
    assert (loaded.family, loaded.source, loaded.context_length) == ("gguf", str(conv.gguf_file), 8192)

    template = loaded.template
    assert template.tokenizer.chat_template == conv_template(conv)  # survived save/load
    assert template.stop_token_ids == frozenset({2})
    prompt = template.encode_messages([{"role": "user", "content": "What is the capital of France?"}])
    assert prompt == conv.probe_ids
    logits, reply_ids = probe(loaded.model, prompt, sorted(template.stop_token_ids))
    # load_chat_model re-lays the linear weights for CPU (another summation order): close;
    # the cache itself, loaded as saved, gives the conversion's logits bit for bit.
    torch.testing.assert_close(logits, conv.probe_logits, rtol=0, atol=1e-3)
    assert reply_ids == conv.probe_greedy
    assert "Paris" in template.decode(reply_ids)
    as_saved = load_gguf(conv.gguf_file, CPU, F32, conv.cache_dir)
    assert torch.equal(probe(as_saved.model, prompt, sorted(template.stop_token_ids))[0], conv.probe_logits)


def conv_template(conv: GgufConversion) -> str:
    return (conv.cache_folder / "chat_template.jinja").read_text()


def test_load_gguf_refuses_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_gguf(tmp_path / "nope.gguf", CPU, F32, tmp_path)


# --- tool-call parser ------------------------------------------------------------------------------

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'


def run_parser(text: str, chunk: int) -> tuple[str, list[str], HermesToolParser]:
    parser = HermesToolParser()
    shown = [parser.feed(text[i : i + chunk]) for i in range(0, len(text), chunk)]
    return "".join(shown), shown, parser


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ("Plain answer, no tools.\n", "Plain answer, no tools.\n", []),
        (CALL, "", [("get_weather", {"city": "北京"})]),
        ("Let me check.\n\n" + CALL, "Let me check.", [("get_weather", {"city": "北京"})]),
        (
            CALL + "\n" + CALL.replace("北京", "Paris"),
            "",
            [("get_weather", {"city": "北京"}), ("get_weather", {"city": "Paris"})],
        ),
        # malformed JSON, Python literals (never eval'd) and calls without a name stay content
        ("<tool_call>{\"name\": \"f\", </tool_call> ok", "<tool_call>{\"name\": \"f\", </tool_call> ok", []),
        ("<tool_call>{'name': 'f'}</tool_call>", "<tool_call>{'name': 'f'}</tool_call>", []),
        ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
        # text that only starts like the tag
        ("a <tool x> b <tool_cal", "a <tool x> b <tool_cal", []),
        # double-encoded arguments; a block cut off after complete JSON
        ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', "", [("f", {"a": 1})]),
        ('Sure <tool_call>{"name": "f", "arguments": {}}', "Sure", [("f", {})]),
        ('<tool_call>{"name": "f", "argu', '<tool_call>{"name": "f", "argu', []),
    ],
)
def test_hermes_parser(text: str, content: str, calls: list[tuple[str, dict]]) -> None:
    expected = None
    for chunk in (1, 2, 3, 5, 7, 11, len(text)):
        shown, pieces, parser = run_parser(text, chunk)
        result = parser.finish()
        assert result.content == content
        assert result.content.startswith(shown)  # streamed text is never taken back
        assert all("<tool_call>" not in p for p in pieces) or not calls
        got = [(c.name, json.loads(c.arguments)) for c in result.tool_calls]
        assert got == calls
        expected = expected or result
        assert result == expected  # same result whatever the chunking


def test_hermes_parser_streams_text_promptly() -> None:
    parser = HermesToolParser()
    assert parser.feed("Hello") == "Hello"
    assert parser.feed(" world. <tool") == " world."  # "<tool" might open a call: held
    assert parser.feed("s are great") == " <tools are great"
    assert parser.finish().content == "Hello world. <tools are great"


@pytest.mark.parametrize(
    ("tools", "text", "content", "calls"),
    [
        # GLM-4 replies start with an empty metadata line, dropped as ChatGLM3's is
        (True, "\nBeijing is sunny.", "Beijing is sunny.", []),
        (False, "\nBeijing is sunny.\nWarm too.", "Beijing is sunny.\nWarm too.", []),
        # a function name as metadata, JSON arguments after it: a call (GLM-4's chat-hf form)
        (True, 'get_weather\n{"city": "北京"}', "", [("get_weather", {"city": "北京"})]),
        (True, 'lookup.v2\n  {"q": [1, 2]}\n', "", [("lookup.v2", {"q": [1, 2]})]),
        # without tools, or with arguments that are no JSON object, it stays text
        (False, 'get_weather\n{"city": "北京"}', 'get_weather\n{"city": "北京"}', []),
        (True, "get_weather\n{oops", "get_weather\n{oops", []),
        (True, 'f\n["a"]', 'f\n["a"]', []),
        # a first line that cannot be a name, or no newline at all: text
        (True, "Sure, here it is:\n42", "Sure, here it is:\n42", []),
        (True, "42", "42", []),
        (True, "", "", []),
    ],
)
def test_glm_tool_parser(tools: bool, text: str, content: str, calls: list[tuple[str, dict]]) -> None:
    for chunk in (1, 2, 3, 7, max(len(text), 1)):
        parser = GlmToolParser(tools)
        shown = "".join(parser.feed(text[i : i + chunk]) for i in range(0, len(text), chunk))
        result = parser.finish()
        assert result.content == content
        assert result.content.startswith(shown)  # streamed text is never taken back
        assert [(c.name, json.loads(c.arguments)) for c in result.tool_calls] == calls


def test_glm_tool_parser_streams_a_reply_once_its_first_line_is_known() -> None:
    parser = GlmToolParser(tools_enabled=True)
    assert parser.feed("get_wea") == ""  # might be a call's name
    assert GlmToolParser(tools_enabled=False).feed("get_wea") == "get_wea"  # no tools: text at once
    assert GlmToolParser(tools_enabled=True).feed("Sure, ") == "Sure, "  # cannot be a name
    parser = GlmToolParser(tools_enabled=True)
    assert parser.feed("\nHel") == "Hel"
    assert parser.feed("lo") == "lo"
    assert parser.finish().content == "Hello"

"""GLM-4-9B-chat's conversation format (its published ``chat_template``), as a ``ChatTemplate``.

A prompt is ``[gMASK]<sop>``, then per message ``<|role|>`` + metadata + ``"\\n"`` + content
(messages without content are left out, as the template leaves them out), then
``<|assistant|>``. Tools are described in a ``<|system|>`` turn of their own before the first
system message's text: GLM-4's fixed assistant prompt, ``# 可用工具`` and per function its name
and JSON schema. The model calls a tool by writing the function's name as the metadata line
and the JSON arguments after it (``get_weather\\n{"city": "北京"}``), read back by the same
parser as glm-4-9b-chat-hf's (:class:`~glm_api.families.json_tool_calls.GlmToolParser`); a tool's
result is an ``<|observation|>`` turn.

Each turn's text is tokenised on its own, between the special ids, exactly as the rendered
template tokenises; role markers typed inside a text stay text and cannot forge a turn.
"""

from __future__ import annotations

import json
from typing import Any

from glm_api.families.chatglm3.template import ROLES, message_text, tool_call_parts
from glm_api.families.chatglm3.tools import openai_tools_to_chatglm
from glm_api.families.glm4_chat.tokenizer import Glm4Tokenizer
from glm_api.families.json_tool_calls import GlmToolParser

#: What glm-4-9b-chat's template writes before the tool list (its own words: the model was
#: trained on this text).
TOOL_SYSTEM_PROMPT = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。"
)
TOOLS_HEADING = "\n\n# 可用工具"
#: After each function's schema: "when calling the function above, give its arguments as JSON".
FUNCTION_SUFFIX = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"


def _tool_name(tool: dict[str, Any]) -> str:
    return str(tool["name"])


def tools_text(functions: list[dict[str, Any]]) -> str:
    """The text of the tools' ``<|system|>`` turn, after its newline."""
    parts = [TOOL_SYSTEM_PROMPT, TOOLS_HEADING]
    for function in functions:
        try:
            schema = json.dumps(function, ensure_ascii=False, indent=4)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"tools are not JSON serialisable: {exc}") from exc
        parts.append(f"\n\n## {function['name']}\n\n{schema}{FUNCTION_SUFFIX}")
    return "".join(parts)


def _unique(functions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same tool given twice (on the system message and beside the messages) is shown once."""
    seen: set[str] = set()
    out = []
    for function in functions:
        if _tool_name(function) not in seen:
            seen.add(_tool_name(function))
            out.append(function)
    return out


def _call_arguments(arguments: str, index: int) -> str:
    """A call's arguments as the model writes them: one line of JSON."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"messages[{index}].tool_calls: arguments are not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"messages[{index}].tool_calls: arguments must be a JSON object")
    return json.dumps(value, ensure_ascii=False)


def _seed_call_arguments(metadata: str, content: str) -> str:
    """The seed's function-call history turn holds ``{"name", "parameters"}``: the model wrote
    only the parameters, so only they are shown to it again."""
    try:
        value = json.loads(content)
    except json.JSONDecodeError:
        return content
    if isinstance(value, dict) and value.get("name") == metadata and isinstance(value.get("parameters"), dict):
        return json.dumps(value["parameters"], ensure_ascii=False)
    return content


class Glm4ChatTemplate:
    """Tokenizer, prompt format, stop tokens and output parser of GLM-4-9B-chat."""

    supports_tools = True
    tool_call_syntax = "glm4"  # name line, then the JSON arguments: forced calls are constrained so
    thinking_markers = None

    def __init__(self, tokenizer: Glm4Tokenizer) -> None:
        self.tokenizer = tokenizer
        special = tokenizer.special_ids
        # glm-4-9b-chat's generation_config: <|endoftext|>, <|user|>, <|observation|>.
        self.stop_token_ids: frozenset[int] = frozenset(
            {tokenizer.eos_id, special["<|user|>"], special["<|observation|>"]}
        )
        self._prefix = tokenizer.prefix_ids

    def _turn(self, role: str, text: str) -> list[int]:
        return [self.tokenizer.special_id(f"<|{role}|>"), *self.tokenizer.encode(text)]

    def encode_messages(
        self, messages: list[dict[str, Any]], tools: list[dict] | None = None, options: dict[str, Any] | None = None
    ) -> list[int]:
        """Prompt ids, ending with ``<|assistant|>``. ``tools`` (OpenAI style) and tools on a
        system message (the seed's style) are described together before the first system text."""
        functions = openai_tools_to_chatglm(tools) if tools else []
        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ValueError(f"messages[{index}] must be an object")
            if message.get("role") == "system" and message.get("tools"):
                if not isinstance(message["tools"], list):
                    raise ValueError(f"messages[{index}].tools must be a list")
                functions += openai_tools_to_chatglm(message["tools"])
        ids = list(self._prefix)
        if functions:
            ids += self._turn("system", "\n" + tools_text(_unique(functions)))
        for index, message in enumerate(messages):
            ids += self._message(message, index)
        ids.append(self.tokenizer.special_id("<|assistant|>"))
        return ids

    def _message(self, message: dict[str, Any], index: int) -> list[int]:
        role = ROLES.get(message.get("role"))  # type: ignore[arg-type]
        if role is None:
            allowed = ", ".join(sorted(ROLES))
            raise ValueError(f"messages[{index}].role {message.get('role')!r} is not supported (use one of: {allowed})")
        metadata = message_text(message, "metadata", index)
        if "\n" in metadata:
            raise ValueError(f"messages[{index}].metadata must be a single line")
        content = message_text(message, "content", index)
        ids: list[int] = []
        if role == "assistant" and message.get("tool_calls"):
            calls = message["tool_calls"]
            if not isinstance(calls, list):
                raise ValueError(f"messages[{index}].tool_calls must be a list")
            if content:
                ids += self._turn("assistant", f"{metadata}\n{content}")
            for call in calls:
                name, arguments = tool_call_parts(call)
                if not name.strip() or "\n" in name:
                    raise ValueError(f"messages[{index}].tool_calls: a function name must be one non-empty line")
                ids += self._turn("assistant", f"{name}\n{_call_arguments(arguments, index)}")
            return ids
        if role == "assistant" and metadata.strip():
            content = _seed_call_arguments(metadata.strip(), content)
        if content:  # the published template skips turns without content
            ids += self._turn(role, f"{metadata}\n{content}")
        return ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return (self._prefix if add_special_tokens else []) + self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        """Text of ids, special tokens left out (the stop tokens end generation before them)."""
        return self.tokenizer.decode(ids)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(ids)

    def prompt_opens_thinking(self, prompt_ids: list[int]) -> bool:
        return False  # GLM-4-9B-chat does not think

    def new_output_parser(
        self, tools_enabled: bool, tools: list[dict] | None = None, prompt_ids: list[int] | None = None
    ) -> GlmToolParser:
        return GlmToolParser(tools_enabled)

"""ChatGLM3 tool calls: presenting tools to the model and reading its calls back.

ChatGLM3 calls a tool by writing, after ``<|assistant|>``, the function name as the metadata
line and then a Python code block ``tool_call(arg=value, ...)``. THUDM's demos ``eval`` that
code; here it is parsed with ``ast`` and only literal values are accepted, so model output is
never executed.
"""

from __future__ import annotations

import ast
import json
import math
from typing import Any

from glm_api.families.base import ToolCall

#: The system prompt THUDM's demos put before the tool list when the client gave none.
DEFAULT_TOOL_SYSTEM_PROMPT = (
    "Answer the following questions as best as you can. You have access to the following tools:"
)


def openai_tools_to_chatglm(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI ``[{"type": "function", "function": {...}}]`` -> ChatGLM3's list of function dicts.

    A dict that is already a bare function (``{"name": ..., ...}``, as the seed's clients and
    ChatGLM3's own demos send) is kept as it is.
    """
    converted: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise ValueError(f"tools[{i}] must be an object")
        if "function" in tool or "type" in tool:
            if tool.get("type", "function") != "function" or not isinstance(tool.get("function"), dict):
                raise ValueError(f"tools[{i}]: only tools of type 'function' with a 'function' object are supported")
            tool = tool["function"]
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise ValueError(f"tools[{i}]: a function needs a non-empty 'name'")
        converted.append(tool)
    return converted


def tools_json(tools: list[dict[str, Any]]) -> str:
    """The tool list as THUDM's ``build_chat_input`` appends it to the system message."""
    try:
        return json.dumps(tools, indent=4, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"tools are not JSON serialisable: {exc}") from exc


def _python_literal(value: Any) -> str:
    """A JSON value written as the Python literal the model would write."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, str):
        # JSON string syntax is valid Python and keeps the double quotes the model uses.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_python_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(str(k), ensure_ascii=False)}: {_python_literal(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise ValueError(f"cannot write {type(value).__name__} as a tool argument")


def tool_call_code(arguments: str) -> str:
    """The code block ChatGLM3 writes for a call with these JSON ``arguments``."""
    try:
        kwargs = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"tool call arguments are not valid JSON: {exc}") from exc
    if not isinstance(kwargs, dict):
        raise ValueError("tool call arguments must be a JSON object")
    for key in kwargs:
        if not key.isidentifier():
            raise ValueError(f"tool call argument name {key!r} is not a valid identifier")
    call = ", ".join(f"{key}={_python_literal(value)}" for key, value in kwargs.items())
    return f"```python\ntool_call({call})\n```"


def _code_of(body: str) -> str:
    """The code inside a fenced block (THUDM drops the first and last lines: the fences)."""
    lines = body.strip().split("\n")
    if lines and lines[0].strip().startswith("```"):
        lines = lines[1:]
    if lines and lines[-1].strip() == "```":
        lines = lines[:-1]
    return "\n".join(lines).strip()


def parse_tool_call(name: str, body: str) -> ToolCall | None:
    """``name`` + a ``tool_call(k=literal, ...)`` code block -> ToolCall, or None if it is not one.

    Only keyword arguments with literal values (strings, numbers, booleans, None, lists,
    dicts) are accepted; anything else (names, calls, attribute access) makes it not a call.
    """
    name = name.strip()
    if not name:
        return None
    try:
        tree = ast.parse(_code_of(body), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
        return None
    if call.args:
        return None
    kwargs: dict[str, Any] = {}
    for keyword in call.keywords:
        if keyword.arg is None or keyword.arg in kwargs:  # **spread or a repeated name
            return None
        try:
            kwargs[keyword.arg] = ast.literal_eval(keyword.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None
    try:
        arguments = json.dumps(kwargs, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):  # sets, bytes, complex, nan: not JSON
        return None
    return ToolCall(name=name, arguments=arguments)


def format_seed_function_call(call: ToolCall) -> str:
    """The seed GLM-API's ``return_function_call`` content: ``{"name": ..., "parameters": {...}}``."""
    parameters = json.loads(call.arguments) if call.arguments.strip() else {}
    return json.dumps({"name": call.name, "parameters": parameters}, ensure_ascii=False)

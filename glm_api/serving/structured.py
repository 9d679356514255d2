"""Structured outputs: OpenAI's ``response_format`` and forced tools, vLLM's ``structured_outputs``,
turned into the engine's grammar constraints (:mod:`glm_api.engines.grammar`).

A forced tool call (``tool_choice: "required"`` or a named function) is constrained to a call of
the offered tools with arguments valid for that tool's parameters. Where the family writes
calls in a JSON-based syntax of its own (Hermes ``<tool_call>`` blocks, GLM-4's name line), the
grammar is that syntax and the family's own parser reads the call. Elsewhere (chat formats
without tools, like the default SmolLM2's, and ChatGLM3, whose calls are Python code) the tools
are described in a system message and the output is ``{"name": ..., "arguments": {...}}``,
returned as ``message.tool_calls`` all the same.
"""

from __future__ import annotations

import json
from typing import Any

from glm_api.engines.base import Constraint
from glm_api.errors import BadRequestError
from glm_api.families.base import ToolCall
from glm_api.families.xml_tool_calls import is_string_schema  # the parser's own reading of types
from glm_api.protocol.openai import ResponseFormat, SamplingRequest
from glm_api.serving.json_bounds import bounded_schema, strict_schema

JSON_INSTRUCTION = "Answer with one JSON object only."
TOOL_INSTRUCTION = (
    "You can call these functions:\n{tools}\n\n"
    'Answer with a JSON object {{"name": <function name>, "arguments": <its arguments>}} that calls one of them.'
)


def output_constraint(req: SamplingRequest, response_format: ResponseFormat | None) -> Constraint | None:
    """The grammar ``response_format`` or the ``structured_outputs`` extra asks for (at most one)."""
    wanted = response_format if response_format is not None and response_format.type != "text" else None
    extra = req.structured_outputs
    if wanted is not None and extra is not None:
        raise BadRequestError("give response_format or structured_outputs, not both", param="structured_outputs")
    if wanted is not None:
        if wanted.type == "json_object":
            return Constraint("json_object")
        schema = wanted.json_schema.schema_
        return Constraint("json_schema", _schema_text(strict_schema(schema) if wanted.json_schema.strict else schema,
                                                      "response_format"))
    if extra is None:
        return None
    if extra.json_ is not None:
        schema = json.loads(extra.json_) if isinstance(extra.json_, str) else extra.json_
        return Constraint("json_schema", _schema_text(schema, "structured_outputs"), param="structured_outputs")
    if extra.regex is not None:
        return Constraint("regex", extra.regex, param="structured_outputs")
    if extra.choice is not None:
        return Constraint("choice", json.dumps(extra.choice), param="structured_outputs")
    return Constraint("grammar", extra.grammar or "", param="structured_outputs")


def _schema_text(schema: Any, param: str) -> str:
    if schema is True or schema == {}:
        schema = {}
    elif not isinstance(schema, dict):
        raise BadRequestError("the JSON schema must be an object", param=param)
    return json.dumps(schema)  # key order kept: properties come out in the order the schema gives


def with_json_instruction(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The grammar makes the JSON; the instruction makes the model mean it (better content)."""
    return _with_system(messages, JSON_INSTRUCTION)


def with_tool_instruction(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    described = json.dumps([t["function"] for t in tools], ensure_ascii=False)
    return _with_system(messages, TOOL_INSTRUCTION.format(tools=described))


def _with_system(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{text}".lstrip()}
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def native_tool_call_constraint(
    syntax: str | None,
    tools: list[dict[str, Any]],
    marker_ids: dict[str, int] | None = None,
    separator: str = "\n",
) -> Constraint | None:
    """A call in the family's own syntax (a Lark grammar embedding the JSON schemas), or None.
    The JSON is written as the families' templates write it (``json.dumps``' ", " and ": ").
    ``marker_ids``: markers that are one token of the vocabulary (``<tool_call>``...), named in
    the grammar by id (llguidance sees added tokens as special, never as their text);
    ``separator``: what the template writes between a GLM-4.5+ call's parts."""
    marker_ids = marker_ids or {}
    if syntax == "hermes":  # Qwen2.5 and Hermes put the call on its own line; some write it inline
        call = json.dumps(_as_written(bounded_schema(json.loads(tool_call_constraint(tools).spec))))
        opening, closing = _marker("<tool_call>", marker_ids), _marker("</tool_call>", marker_ids)
        return Constraint("grammar", f"start: {opening} /\\n?/ call /\\n?/ {closing}\ncall: %json {call}",
                          param="tools")
    if syntax == "glm45":
        return Constraint("grammar", _xml_call_grammar(tools, marker_ids, separator), param="tools")
    if syntax == "glm4":
        rules = ["start: " + " | ".join(f"c{i}" for i in range(len(tools)))]
        for i, tool in enumerate(tools):
            arguments = json.dumps(_as_written(bounded_schema(_tool_arguments(tool))))
            rules += [f"c{i}: {json.dumps(tool['function']['name'] + chr(10))} a{i}", f"a{i}: %json {arguments}"]
        return Constraint("grammar", "\n".join(rules), param="tools")
    return None


def _marker(text: str, marker_ids: dict[str, int]) -> str:
    return f"<[{marker_ids[text]}]>" if text in marker_ids else json.dumps(text)


def _xml_call_grammar(tools: list[dict[str, Any]], marker_ids: dict[str, int], separator: str) -> str:
    """GLM-4.5+: ``<tool_call>NAME (SEP <arg_key>K</arg_key> SEP <arg_value>V</arg_value>)* SEP
    </tool_call>``, the schema's properties in its order (the required ones always, no others):
    a string value raw (its enum or length kept), any other value as JSON valid for its schema."""
    m = {t: _marker(t, marker_ids) for t in ("<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>",
                                               "<arg_value>", "</arg_value>")}
    sep = f" {json.dumps(separator)}" if separator else ""
    # Free text up to the closing marker: any text where it is one token, else text without "<".
    free = "/(?s:.{{{}}})/" if "</arg_value>" in marker_ids else "/[^<]{{{}}}/"
    rules = [f"start: {json.dumps(separator) + '? ' if separator else ''}(" + " | ".join(
        f"c{i}" for i in range(len(tools))) + ")"]
    for i, tool in enumerate(tools):
        schema = _tool_arguments(tool)
        properties = schema.get("properties") or {} if isinstance(schema, dict) else {}
        required = set(schema.get("required") or []) if isinstance(schema, dict) else set()
        defs = {k: schema[k] for k in ("$defs", "definitions") if isinstance(schema, dict) and k in schema}
        parts = []
        for j, (key, value) in enumerate(properties.items()):
            name = f"v{i}_{j}"
            rules.append(f"{name}: " + _xml_value(value if isinstance(value, dict) else {}, defs, free))
            argument = (f"{sep} {m['<arg_key>']} {json.dumps(key)} {m['</arg_key>']}{sep} {m['<arg_value>']} {name} "
                        f"{m['</arg_value>']}")
            parts.append(f"({argument})" + ("" if key in required else "?"))
        name = json.dumps(tool["function"]["name"])
        rules.append(f"c{i}: {m['<tool_call>']} {name} {' '.join(parts)}{sep} {m['</tool_call>']}")
    return "\n".join(rules)


def _xml_value(schema: dict[str, Any], defs: dict[str, Any], free: str) -> str:
    if is_string_schema(schema) and not defs.keys() & schema.keys():
        if isinstance(schema.get("enum"), list):
            return " | ".join(json.dumps(v) for v in schema["enum"] if isinstance(v, str)) or '""'
        if isinstance(schema.get("const"), str):
            return json.dumps(schema["const"])
        low, high = int(schema.get("minLength") or 0), schema.get("maxLength")
        return free.format(f"{low}," + (str(int(high)) if isinstance(high, int) else ""))
    return f"%json {json.dumps(_as_written(bounded_schema({**schema, **defs})))}"


def _as_written(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}


def tool_call_constraint(tools: list[dict[str, Any]]) -> Constraint:
    """One call of one of ``tools``, its arguments valid against that tool's parameters."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                "arguments": _tool_arguments(t),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return Constraint("json_schema", _schema_text(schema, "tools"), param="tools")


def _tool_arguments(tool: dict[str, Any]) -> Any:
    """No invented properties: unnamed ones only where the schema allows them (OpenAI's strict rule)."""
    return strict_schema(tool["function"].get("parameters") or {"type": "object"})


def parse_tool_call(text: str) -> list[ToolCall]:
    """The constrained output as a tool call (empty when it was cut before it closed)."""
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return []
    return [ToolCall(call["name"], json.dumps(call["arguments"], ensure_ascii=False))]

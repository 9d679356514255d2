"""What a jinja chat template tells about its model: thinking, tool-call syntax, options.

Read from the template's own text and from what it renders, never from the model's name:
- thinking: the template writes ``<think>`` and ``</think>`` (GLM-4.5+, GLM-Z1, Qwen3, ...);
- the tool-call syntax: ``<arg_key>`` markers (GLM-4.5+ XML arguments), GLM-4's
  ``<|assistant|>name\\n{json}`` turns (``<|observation|>`` results, no ``<arg_key>``), else
  Hermes ``<tool_call>{json}</tool_call>`` when it takes tools at all;
- how it separates a call's parts (``\\n`` in GLM-4.5/4.6, nothing in GLM-4.7/5), from a call it
  renders itself, so a forced call is constrained to what the model saw in training;
- the options (``chat_template_kwargs``) it reads: ``enable_thinking``, ``thinking``,
  ``reasoning_effort``, ``clear_thinking``..., so OpenAI's ``reasoning_effort`` maps onto them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.meta

THINK_MARKERS = ("<think>", "</think>")
ARG_KEY = "<arg_key>"
#: apply_chat_template's own arguments: a request's chat_template_kwargs cannot replace them.
RESERVED_OPTIONS = frozenset(
    {
        "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
        "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
        "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "processor_kwargs",
    }
)
#: OpenAI's reasoning_effort values that mean "do not think".
NO_EFFORT = frozenset({"none"})
_OPTION_NAMES = ("enable_thinking", "thinking", "reasoning_effort", "clear_thinking")
_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "probe_fn",
        "description": "",
        "parameters": {"type": "object", "properties": {"k1": {"type": "string"}, "k2": {"type": "string"}}},
    },
}
_PROBE = [
    {"role": "user", "content": "q"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "probe_fn", "arguments": {"k1": "v1", "k2": "v2"}}}],
    },
]


@dataclass(frozen=True)
class TemplateFeatures:
    thinking_markers: tuple[str, str] | None
    tool_call_syntax: str | None  # "glm45", "glm4", "hermes" or None
    call_separator: str  # between a glm45 call's name, keys, values and its end
    variables: frozenset[str]  # the template's free variables (its options among them)


def template_variables(text: str) -> frozenset[str]:
    """The names a template reads without setting them (jinja's own analysis; a text search
    for the known option names where the template does not parse outside transformers)."""
    try:
        env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
        return frozenset(jinja2.meta.find_undeclared_variables(env.parse(text)))
    except jinja2.TemplateError:
        return frozenset(n for n in _OPTION_NAMES if re.search(rf"(?<![\w.]){n}(?!\w)", text))


def read_features(text: str | None, supports_tools: bool, render: Any) -> TemplateFeatures:
    """``render(messages, tools) -> str`` renders the template (for the call-style probe)."""
    if not text:
        return TemplateFeatures(None, None, "", frozenset())
    thinking = THINK_MARKERS if all(m in text for m in THINK_MARKERS) else None
    if ARG_KEY in text:
        syntax = "glm45"
    elif "<|observation|>" in text and "<|assistant|>" in text:
        syntax = "glm4"
    else:
        syntax = "hermes" if supports_tools else None
    separator = _call_separator(render) if syntax == "glm45" else ""
    return TemplateFeatures(thinking, syntax, separator, template_variables(text))


def _call_separator(render: Any) -> str:
    """What the template writes between a call's name and its first ``<arg_key>``: GLM-4.5
    and 4.6 a newline, GLM-4.7 and 5 nothing. A newline when the probe cannot tell."""
    try:
        text = render(_PROBE, [_PROBE_TOOL])
    except Exception:  # noqa: BLE001 - any template error: fall back to GLM-4.5's style
        return "\n"
    match = re.search(r"probe_fn(\s*)" + re.escape(ARG_KEY), text)
    return match.group(1) if match else "\n"


def template_options(features: TemplateFeatures, options: dict[str, Any] | None) -> dict[str, Any]:
    """The request's template options (``chat_template_kwargs``, with OpenAI's
    ``reasoning_effort`` among them) as this template takes them: a ``reasoning_effort`` the
    template does not read becomes the thinking switch it does read (an explicit switch wins).
    ValueError for names the server sets itself."""
    out = dict(options or {})
    clash = sorted(RESERVED_OPTIONS & out.keys())
    if clash:
        raise ValueError(f"chat_template_kwargs cannot set {', '.join(clash)}: the server sets them")
    names = features.variables
    effort = out.get("reasoning_effort")
    if isinstance(effort, str) and "reasoning_effort" not in names:
        del out["reasoning_effort"]
        for switch in ("enable_thinking", "thinking"):
            if switch in names:
                out.setdefault(switch, effort not in NO_EFFORT)
                break
    return out

"""An OpenAI chat request as one engine call (:class:`ChatCall`), decided in one pass.

Everything the request asks of the engine is read here, once, in this order: the messages, the
tools the model is shown (after ``tool_choice``), a forced tool call (``tool_choice:
"required"`` or a named function: in the family's own syntax where it has one, else a JSON call
described in a system message), the output constraint (``response_format`` or the
``structured_outputs`` extra, with a JSON instruction) and the sampling parameters. The
grammars themselves are built by :mod:`glm_api.serving.structured`, which knows nothing of this
module.
"""

from __future__ import annotations

from typing import Any

from glm_api.engines.base import ChatEngine, Constraint
from glm_api.errors import BadRequestError
from glm_api.families.base import ToolCall
from glm_api.protocol.openai import ChatCompletionRequest, ChatMessageIn, NamedToolChoice, SamplingRequest, ToolDef
from glm_api.serving.chat import ChatCall
from glm_api.serving.messages import check_content
from glm_api.serving.structured import (
    native_tool_call_constraint,
    output_constraint,
    tool_call_constraint,
    with_json_instruction,
    with_tool_instruction,
)

#: OpenAI's default, where the seed route keeps the seed's 1.1.
OPENAI_REPETITION_PENALTY = 1.0


def chat_call(req: ChatCompletionRequest, engine: ChatEngine) -> tuple[ChatCall, bool]:
    """The engine call for ``req``, and whether its answer is a forced tool call written as JSON
    (returned to the client as ``tool_calls``). A request the model cannot honour is a 400."""
    messages = openai_messages(req.messages)
    forced = bool(req.tools) and (req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice))
    if forced:
        if req.response_format is not None and req.response_format.type != "text" or req.structured_outputs:
            raise BadRequestError("a forced tool call cannot also follow response_format", param="tool_choice")
        offered = _offered_tools(req) or []
        template = engine.template
        native = native_tool_call_constraint(
            template.tool_call_syntax, offered, getattr(template, "marker_token_ids", None),
            getattr(getattr(template, "features", None), "call_separator", "\n"),
        )
        # A forced call is written without thinking first: the prompt closes the thinking.
        if native is not None:  # the family's own syntax, read by its own parser
            return call_with(req, messages, offered, native, close_thinking=True), False
        instructed = with_tool_instruction(messages, offered)
        return call_with(req, instructed, None, tool_call_constraint(offered), close_thinking=True), True
    tools = _offered_tools(req)
    if tools and not engine.template.supports_tools:
        raise BadRequestError(
            f"model {engine.model_name!r} has a chat format without tools; send no tools, "
            '(or tool_choice "none"), or force one with tool_choice "required" or a named function',
            param="tools",
        )
    constraint = output_constraint(req, req.response_format)
    if constraint is not None and constraint.kind in ("json_object", "json_schema"):
        messages = with_json_instruction(messages)
    return call_with(req, messages, tools, constraint), False


def call_with(
    req: ChatCompletionRequest,
    messages: list[dict[str, Any]],
    tools: list[dict] | None,
    constraint: Constraint | None = None,
    *,
    close_thinking: bool = False,
) -> ChatCall:
    """The ChatCall of ``req``'s sampling parameters over the given messages, tools and constraint."""
    options = dict(req.chat_template_kwargs or {})
    if req.reasoning_effort is not None:  # the template maps it onto the option it offers
        options.setdefault("reasoning_effort", req.reasoning_effort)
    return ChatCall(
        messages=messages,
        tools=tools,
        max_tokens=req.max_completion_tokens or req.max_tokens,
        constraint=constraint,
        template_options=options or None,
        close_thinking=close_thinking,  # else a constraint starts after the thinking (serving/chat.py)
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        **sampling_fields(req),
    )


def tool_dicts(tools: list[ToolDef] | None) -> list[dict[str, Any]] | None:
    return [t.model_dump(exclude_none=True) for t in tools] if tools else None


def openai_messages(messages: list[ChatMessageIn]) -> list[dict[str, Any]]:
    """OpenAI messages -> the internal dicts of :mod:`glm_api.families.base`."""
    names: dict[str, str] = {}  # tool_call_id -> function name, for tool results
    out: list[dict[str, Any]] = []
    for index, m in enumerate(messages):
        check_content(index, m.role, m.content, m.tool_calls or m.reasoning_text())  # a thinking-only turn
        role = {"developer": "system", "function": "tool"}.get(m.role, m.role)
        message: dict[str, Any] = {"role": role, "content": m.text()}
        if m.role == "assistant" and m.tool_calls:
            message["tool_calls"] = [ToolCall(c.function.name, c.function.arguments, c.id) for c in m.tool_calls]
            names.update({c.id: c.function.name for c in m.tool_calls if c.id})
        if m.role == "assistant" and m.reasoning_text():  # the template decides whether to show it
            message["reasoning_content"] = m.reasoning_text()
        if role == "tool":
            name = m.name or names.get(m.tool_call_id or "")
            if name:
                message["name"] = name
            if m.tool_call_id:
                message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


def _offered_tools(req: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The tools the model is shown, after ``tool_choice``."""
    if not req.tools or req.tool_choice == "none":
        return None
    if isinstance(req.tool_choice, NamedToolChoice):
        wanted = req.tool_choice.function.name
        named = [t for t in req.tools if t.function.name == wanted]
        if not named:
            raise BadRequestError(f"tool_choice names {wanted!r}, which is not in tools", param="tool_choice")
        return tool_dicts(named)
    return tool_dicts(req.tools)


def sampling_fields(req: SamplingRequest) -> dict[str, Any]:
    """ChatCall fields from the sampling parameters chat and completions share (OpenAI defaults)."""
    return {
        "model": req.model,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "top_k": req.top_k or 0,
        "repetition_penalty": req.repetition_penalty or OPENAI_REPETITION_PENALTY,
        "presence_penalty": req.presence_penalty or 0.0,
        "frequency_penalty": req.frequency_penalty or 0.0,
        "seed": req.seed,
        "stop": list(req.stop or []),
        "n": req.n or 1,
    }

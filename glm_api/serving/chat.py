"""Chat serving shared by /chat and /v1/chat/completions: protocol-neutral request in, events out.

Everything that can fail deterministically (model name, template, context length, admission)
fails in :meth:`ChatService.start`, before a response starts; the stream that follows only
carries output.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from glm_api.config import Settings
from glm_api.engines.base import ChatEngine, Constraint, GenerationChunk, SamplingParams, TokenLogprob
from glm_api.errors import BadRequestError, ContextLengthError
from glm_api.families.base import (
    OutputParser,
    ParsedOutput,
    PassthroughParser,
    ReasoningParser,
    StreamingToolParser,
    ToolCall,
    ToolCallPart,
)
from glm_api.registry import ModelRegistry
from glm_api.serving.json_bounds import bounded_constraint
from glm_api.serving.logprobs import TokenTexts
from glm_api.serving.merge import merge
from glm_api.request_context import record_tokens


@dataclass
class ChatCall:
    """A chat request in neither wire shape: what both API families translate into."""

    messages: list[dict[str, Any]]
    model: str | None = None
    tools: list[dict[str, Any]] | None = None
    max_tokens: int | None = None
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    n: int = 1
    constraint: Constraint | None = None  # structured outputs: the grammar the answer must match
    priority: int = 0  # the engine's: 0 interactive, 1 a batch line (queued behind, preempted first)
    #: The request's chat_template_kwargs, OpenAI's reasoning_effort among them (the template maps it).
    template_options: dict[str, Any] | None = None
    #: Close the model's thinking in the prompt when the generation prompt opened it: the answer
    #: (a constrained one) starts at the first token.
    close_thinking: bool = False
    logprobs: int | None = None  # each generated token's log-probability, with this many alternatives
    prompt_logprobs: int | None = None  # each prompt token's (completions' echo)


@dataclass
class ChatEvent:
    """New output of one choice. The last event of a choice has ``finish_reason``."""

    index: int
    text: str
    finish_reason: str | None = None  # "stop", "length" or "tool_calls"
    tool_calls: list[ToolCall] = field(default_factory=list)  # all of the choice's, on its last event
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning: str = ""  # new reasoning, streamed before the answer's text
    tool_parts: list[ToolCallPart] = field(default_factory=list)  # new pieces of streamed calls
    reasoning_tokens: int = 0  # of the completion tokens, on the last event
    # Of the tokens generated since the previous event (ChatCall.logprobs): text a parser holds
    # back has its tokens' log-probabilities come with the event that shows it.
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on a choice's first event, when asked


@dataclass
class ChatChoice:
    index: int
    content: str
    finish_reason: str
    tool_calls: list[ToolCall]
    completion_tokens: int
    reasoning: str = ""
    reasoning_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class ChatPrompt:
    """A formatted conversation: the engine it is for and its prompt ids."""

    engine: ChatEngine
    ids: list[int]
    tools_enabled: bool
    tools: list[dict[str, Any]] | None = None  # what the model was shown (types call arguments)


class ChatRun:
    """The admitted engine streams of one request (one per choice)."""

    def __init__(
        self,
        engine: ChatEngine,
        request_ids: list[str],
        prompt_tokens: int,
        streams: list[AsyncIterator[GenerationChunk]],
        parsers: list,
    ) -> None:
        self.model = engine.model_name
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = 0  # of the prompt, counted once like prompt_tokens (first choice's)
        self._streams = streams
        self._parsers = parsers
        # Also when nobody ever iterates events() (the client left before the response
        # started): dropping the run frees the engine slots. Holds no reference to self.
        self._finalizer = weakref.finalize(self, _abort_all, engine, list(request_ids))

    def abort(self) -> None:
        """Free the engine slots of every choice (a no-op for those already finished)."""
        self._finalizer()

    async def events(self) -> AsyncIterator[ChatEvent]:
        """Events of all choices, interleaved as they are produced."""
        try:
            async for event in merge([self._choice_events(i) for i in range(len(self._streams))]):
                yield event
        finally:
            self.abort()

    async def _choice_events(self, index: int) -> AsyncIterator[ChatEvent]:
        parser = self._parsers[index]
        stream = self._streams[index]
        logprobs: list[TokenLogprob] = []  # not yet sent with an event
        prompt_logprobs = None
        try:
            async for chunk in stream:
                thinking = parser.reasoning_open
                visible, reasoning, parts = parser.feed(chunk.text) if chunk.text else ("", "", [])
                if thinking or parser.reasoning_open:  # the chunk's tokens were (some of) the reasoning
                    parser.reasoning_tokens += len(chunk.token_ids)
                logprobs += chunk.logprobs or ()
                if chunk.prompt_logprobs is not None:
                    prompt_logprobs = chunk.prompt_logprobs
                if chunk.finish_reason is None:
                    if visible or reasoning or parts:
                        yield ChatEvent(
                            index, visible, prompt_tokens=chunk.prompt_tokens, reasoning=reasoning,
                            completion_tokens=chunk.completion_tokens, tool_parts=parts,
                            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                        )
                        logprobs, prompt_logprobs = [], None
                    continue
                parsed, rest, more_reasoning, more_parts = parser.finish()
                reason = "tool_calls" if parsed.tool_calls and chunk.finish_reason != "length" else chunk.finish_reason
                record_tokens(prompt=chunk.prompt_tokens if index == 0 else 0, completion=chunk.completion_tokens)
                if index == 0:
                    self.cached_tokens = chunk.cached_tokens
                yield ChatEvent(
                    index, visible + rest, reason, list(parsed.tool_calls), chunk.prompt_tokens,
                    chunk.completion_tokens, reasoning=reasoning + more_reasoning, tool_parts=parts + more_parts,
                    reasoning_tokens=parser.reasoning_tokens if parsed.reasoning else 0,
                    logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                )
                return
        finally:
            await stream.aclose()

    async def collect(self) -> list[ChatChoice]:
        """Run to the end and return each choice whole (non-streaming responses)."""
        texts: dict[int, list[str]] = {i: [] for i in range(len(self._streams))}
        reasoning: dict[int, list[str]] = {i: [] for i in range(len(self._streams))}
        logprobs: dict[int, list[TokenLogprob]] = {i: [] for i in range(len(self._streams))}
        choices: dict[int, ChatChoice] = {}
        async for event in self.events():
            texts[event.index].append(event.text)
            reasoning[event.index].append(event.reasoning)
            logprobs[event.index] += event.logprobs
            if event.finish_reason is not None:
                choices[event.index] = ChatChoice(
                    event.index, "".join(texts[event.index]), event.finish_reason, event.tool_calls,
                    event.completion_tokens, "".join(reasoning[event.index]), event.reasoning_tokens,
                    logprobs[event.index],
                )
        return [choices[i] for i in sorted(choices)]


def _abort_all(engine: ChatEngine, request_ids: list[str]) -> None:
    for request_id in request_ids:
        engine.abort(request_id)


class ChatService:
    def __init__(self, registry: ModelRegistry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings
        self._token_texts: dict[str, TokenTexts] = {}

    def token_texts(self, engine: ChatEngine) -> TokenTexts:
        """The texts of ``engine``'s tokens, for log-probabilities (kept: decoding is what costs)."""
        texts = self._token_texts.get(engine.model_name)
        if texts is None:
            texts = self._token_texts[engine.model_name] = TokenTexts(engine)
        return texts

    async def start(self, call: ChatCall, request_id: str) -> ChatRun:
        """Format the conversation, check it, and admit it to the engine."""
        prompt = await self.prepare(call)
        return await self.start_prompt(
            prompt.engine, prompt.ids, call, request_id, tools_enabled=prompt.tools_enabled, tools=prompt.tools
        )

    async def prepare(self, call: ChatCall) -> ChatPrompt:
        """Resolve the model and format the conversation, without admitting it (for callers
        that extend the prompt, or only count it)."""
        engine = self.registry.chat_engine(call.model)
        engine.check_health()
        # Seed clients put tools on the system message, which the template renders itself;
        # OpenAI clients pass them beside the messages.
        seed_tools = _seed_tools(call.messages)
        tools_enabled = bool(call.tools or seed_tools) and engine.template.supports_tools
        tools = call.tools if tools_enabled else None
        prompt_ids = await asyncio.to_thread(self._encode, engine, call, tools)
        shown = [*(tools or []), *(seed_tools or [])] if tools_enabled else None
        return ChatPrompt(engine, prompt_ids, tools_enabled, shown)

    async def start_prompt(
        self,
        engine: ChatEngine,
        prompt_ids: list[int],
        call: ChatCall,
        request_id: str,
        *,
        tools_enabled: bool = False,
        tools: list[dict[str, Any]] | None = None,
        raw: bool = False,
    ) -> ChatRun:
        """Admit already-tokenised prompt ids (chat after templating, or a raw completion: ``raw``
        output is the text as generated, nothing parsed out of it)."""
        capacity = self.settings.max_running + self.settings.max_waiting
        if call.n > min(self.settings.max_n, capacity):
            # Never a 429 for what could not fit even in an idle server: SDKs retry 429s.
            raise BadRequestError(
                f"n is {call.n}; at most {min(self.settings.max_n, capacity)} choices per request", param="n"
            )
        if not prompt_ids:
            raise BadRequestError("the prompt is empty", param="prompt")
        params = self._sampling_params(engine, call, len(prompt_ids))
        if call.constraint is not None:  # compiled (or found in the cache) off the event loop; 400 if it cannot be
            constraint = bounded_constraint(call.constraint, self.settings.json_max_depth)  # JSON that can end
            if not raw and engine.template.prompt_opens_thinking(prompt_ids):  # the answer comes after it
                constraint = replace(constraint, reasoning_end=_reasoning_end(engine.template))
            params = replace(params, grammar=await asyncio.to_thread(engine.compile_constraint, constraint))
        request_ids = [f"{request_id}-{i}" for i in range(call.n)]
        streams: list[AsyncIterator[GenerationChunk]] = []
        try:
            for i, choice_id in enumerate(request_ids):
                choice_params = params if params.seed is None else replace(params, seed=params.seed + i)
                streams.append(engine.generate(prompt_ids, choice_params, choice_id))
        except BaseException:
            for choice_id in request_ids[: len(streams)]:  # admitted siblings of a refused choice give way
                engine.abort(choice_id)
            raise
        parsers = [
            _TrackingParser(
                PassthroughParser() if raw else engine.template.new_output_parser(tools_enabled, tools, prompt_ids)
            )
            for _ in streams
        ]
        return ChatRun(engine, request_ids, len(prompt_ids), streams, parsers)

    @staticmethod
    def _encode(engine: ChatEngine, call: ChatCall, tools: list[dict] | None) -> list[int]:
        template = engine.template
        try:
            ids = template.encode_messages(call.messages, tools, call.template_options)
        except ValueError as exc:
            param = "chat_template_kwargs" if "chat_template_kwargs" in str(exc) else "messages"
            raise BadRequestError(f"the conversation cannot be formatted for this model: {exc}", param=param) from None
        if call.close_thinking and template.thinking_markers and template.prompt_opens_thinking(ids):
            ids = ids + template.encode(template.thinking_markers[1])  # "<think></think>": no thinking
        return ids

    def _sampling_params(self, engine: ChatEngine, call: ChatCall, prompt_tokens: int) -> SamplingParams:
        limit = engine.context_length
        if self.settings.max_prompt_tokens is not None:
            limit = min(limit, self.settings.max_prompt_tokens + 1)
        if prompt_tokens >= limit:
            raise ContextLengthError(
                f"the prompt is {prompt_tokens} tokens; this server takes at most {limit - 1} prompt tokens "
                f"(model context {engine.context_length}) so that at least one token can be generated",
                param="messages",
            )
        limit_tokens = self.settings.max_tokens_limit
        if call.max_tokens is not None and limit_tokens is not None and call.max_tokens > limit_tokens:
            raise BadRequestError(
                f"max_tokens is {call.max_tokens}; this server generates at most {limit_tokens} per request",
                param="max_tokens",
            )
        room = engine.context_length - prompt_tokens
        wanted = call.max_tokens if call.max_tokens is not None else self.settings.default_max_tokens
        if limit_tokens is not None:
            wanted = min(wanted, limit_tokens)
        return SamplingParams(
            max_tokens=min(wanted, room),
            temperature=call.temperature,
            top_p=call.top_p,
            top_k=call.top_k,
            repetition_penalty=call.repetition_penalty,
            presence_penalty=call.presence_penalty,
            frequency_penalty=call.frequency_penalty,
            seed=call.seed,
            stop=tuple(call.stop),
            stop_token_ids=tuple(call.stop_token_ids),
            priority=call.priority,
            logprobs=call.logprobs,
            prompt_logprobs=call.prompt_logprobs,
        )


class _TrackingParser:
    """Wraps a family's OutputParser: what it showed so far (content, reasoning, call pieces), so
    that the last event carries exactly the rest, and how many tokens the reasoning took."""

    def __init__(self, inner: OutputParser) -> None:
        self._inner = inner
        self.shown = 0
        self.shown_reasoning = 0
        self.sent_calls: dict[int, str] = {}  # call index -> its arguments text streamed so far
        self.reasoning_tokens = 0

    @property
    def reasoning_open(self) -> bool:
        return isinstance(self._inner, ReasoningParser) and self._inner.reasoning_open

    def feed(self, delta: str) -> tuple[str, str, list[ToolCallPart]]:
        out = self._inner.feed(delta)
        self.shown += len(out)
        reasoning = self._inner.take_reasoning() if isinstance(self._inner, ReasoningParser) else ""
        self.shown_reasoning += len(reasoning)
        return out, reasoning, self._parts()

    def _parts(self) -> list[ToolCallPart]:
        parts = self._inner.take_tool_parts() if isinstance(self._inner, StreamingToolParser) else []
        for part in parts:
            self.sent_calls[part.index] = self.sent_calls.get(part.index, "") + part.arguments
        return parts

    def finish(self) -> tuple[ParsedOutput, str, str, list[ToolCallPart]]:
        """The parsed output, and the content, reasoning and call pieces not yet shown."""
        parsed = self._inner.finish()
        parts = self._parts()
        for j, call in enumerate(parsed.tool_calls):  # calls the parser did not stream: whole, now
            sent = self.sent_calls.get(j)
            if sent is None:
                parts.append(ToolCallPart(j, call.name, call.arguments))
            elif len(call.arguments) > len(sent) and call.arguments.startswith(sent):
                parts.append(ToolCallPart(j, arguments=call.arguments[len(sent) :]))
        return parsed, parsed.content[self.shown :], parsed.reasoning[self.shown_reasoning :], parts


def _reasoning_end(template: Any) -> str:
    """The marker that closes the thinking, as a grammar names it: by id where it is one token."""
    marker = template.thinking_markers[1]
    token = getattr(template, "marker_token_ids", {}).get(marker)
    return f"<[{token}]>" if token is not None else json.dumps(marker)


def _seed_tools(messages: list[dict[str, Any]]) -> list[dict] | None:
    """The seed's clients put tools on the first system message (ChatGLM3 style)."""
    for message in messages:
        if message.get("role") == "system" and message.get("tools"):
            return message["tools"]
    return None

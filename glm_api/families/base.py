"""What a chat model family gives the engine: a loaded torch model plus its chat template.

A family (generic transformers, ChatGLM3, ...) owns its tokenizer, its conversation format,
its stop tokens and its tool-call syntax. The engine only sees token ids and this interface,
so a new family plugs in without touching the engine or the serving layer.

Messages are plain dicts in OpenAI's internal form after the serving layer normalised them:
``{"role": "system"|"user"|"assistant"|"tool", "content": str}`` plus optional keys
``"metadata"`` (ChatGLM3's per-message metadata line), ``"tools"`` (on a system message, as
the seed's clients send them), ``"tool_calls"`` (on an assistant message: a list of
:class:`ToolCall`) and ``"name"`` (on a tool message: the function that produced it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class ToolCall:
    """One function call the model asked for. ``arguments`` is a JSON object as a string."""

    name: str
    arguments: str
    id: str = ""


@dataclass(frozen=True)
class ParsedOutput:
    """Model output split into plain text, tool calls (empty when it called none) and the
    reasoning written before the answer (empty for models that do not think, or skipped it)."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    reasoning: str = ""


@dataclass(frozen=True)
class ToolCallPart:
    """A piece of the ``index``-th call while it streams: its name on the first piece only, then
    more of its arguments' JSON text; a call's pieces joined are its final arguments."""

    index: int
    name: str | None = None
    arguments: str = ""


class OutputParser(Protocol):
    """Turns one generation's raw decoded text into what the client sees, as it streams.

    ``feed`` gets each new piece of raw text and returns the part that is safe to show now
    (it may hold text back, e.g. while a tool call might be starting). ``finish`` returns the
    whole client-visible content and the tool calls; what ``feed`` returned is always a
    prefix of ``finish().content``. Model output is parsed as data, never executed.
    """

    def feed(self, delta: str) -> str: ...

    def finish(self) -> ParsedOutput: ...


@runtime_checkable
class StreamingToolParser(Protocol):
    """An :class:`OutputParser` that also streams its calls while they are written."""

    def take_tool_parts(self) -> list[ToolCallPart]:
        """Call pieces found since the last take (names before arguments, in order)."""


@runtime_checkable
class ReasoningParser(Protocol):
    """An :class:`OutputParser` that splits the reasoning off the answer as it streams."""

    #: True while the text fed is reasoning (the answer has not started).
    reasoning_open: bool

    def take_reasoning(self) -> str:
        """Reasoning text found since the last take; all of them joined is ``finish().reasoning``."""


class PassthroughParser:
    """For formats without tools or metadata: everything is content, nothing is held back."""

    def __init__(self) -> None:
        self._parts: list[str] = []

    def feed(self, delta: str) -> str:
        self._parts.append(delta)
        return delta

    def finish(self) -> ParsedOutput:
        return ParsedOutput(content="".join(self._parts))


@runtime_checkable
class ChatTemplate(Protocol):
    """Tokenizer + conversation format of one chat model."""

    #: Token ids that end generation (eos, and for ChatGLM3 <|user|>, <|observation|>).
    stop_token_ids: frozenset[int]
    #: Whether the format can present tools to the model and parse its calls back.
    supports_tools: bool
    #: "hermes" (<tool_call>{json}</tool_call>), "glm4" (name line, then JSON arguments),
    #: "glm45" (<tool_call>name<arg_key>k</arg_key><arg_value>v</arg_value></tool_call>) or None:
    #: the syntax a forced tool call is constrained to.
    tool_call_syntax: str | None
    #: ("<think>", "</think>") for formats whose model reasons before it answers, else None.
    thinking_markers: tuple[str, str] | None

    def encode_messages(
        self, messages: list[dict[str, Any]], tools: list[dict] | None = None, options: dict[str, Any] | None = None
    ) -> list[int]:
        """Prompt ids for a conversation, ending with the assistant generation prompt.
        ``options`` are the request's ``chat_template_kwargs`` (families without a jinja
        template ignore them).

        Raises ``ValueError`` with a client-facing message for a conversation the format
        cannot express (the serving layer turns it into a 400).
        """

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of plain text (completions, a prefill). With ``add_special_tokens``, framed as the
        family's own tokenizer frames a text by default (ChatGLM3: ``[gMASK] sop``; a Llama: BOS;
        GPT-2 style: nothing), as /tokenize reports it."""

    def decode(self, ids: list[int]) -> str:
        """Text of ids, special tokens left out."""

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        """The token string of each id, one to one."""

    def prompt_opens_thinking(self, prompt_ids: list[int]) -> bool:
        """Whether the prompt ends inside the model's thinking (its generation prompt opened it)."""

    def new_output_parser(
        self, tools_enabled: bool, tools: list[dict] | None = None, prompt_ids: list[int] | None = None
    ) -> "OutputParser":
        """A fresh parser for one generation's raw text (see :class:`OutputParser`). ``tools``
        (OpenAI style) type the arguments of calls written as text; ``prompt_ids`` tell whether
        the prompt already opened the model's thinking."""


@dataclass
class LoadedChatModel:
    """A chat model ready for an engine: torch module, template and facts about it."""

    model: Any  # transformers PreTrainedModel (causal LM)
    template: ChatTemplate
    context_length: int
    family: str  # "transformers", "gguf", "chatglm3", ...
    source: str  # the folder or file it came from, for logs and /models


@dataclass
class LoadedEmbeddingModel:
    """A sentence embedding model: a sentence-transformers ``SentenceTransformer``."""

    model: Any
    dimensions: int
    max_seq_length: int
    family: str
    source: str

"""/v1/completions: legacy text completion over the same chat engine, without a chat template.

A prompt is encoded as plain text (``template.encode``: no special tokens) or taken as token
ids. A list of prompts gives ``n`` choices per prompt, choice ``index = prompt_index * n + i``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from glm_api.errors import BadRequestError, ContextLengthError
from glm_api.protocol.openai import Completion, CompletionChoice, CompletionRequest, OpenAIUsage
from glm_api.serving.chat import ChatCall, ChatEvent, ChatRun, ChatService
from glm_api.serving.merge import merge
from glm_api.serving.openai_chat import system_fingerprint
from glm_api.serving.openai_chat_call import sampling_fields
from glm_api.serving.structured import output_constraint
from glm_api.serving.tokenize import check_token_ids

#: Prompts per request; each is its own engine request (times n), so this bounds the fan-out.
MAX_PROMPTS = 32
#: OpenAI's default max_tokens for /v1/completions.
DEFAULT_MAX_TOKENS = 16


@dataclass
class CompletionPlan:
    runs: list[ChatRun]  # one per prompt
    echo: list[str]  # the prompt text to put before each prompt's choices ("" without echo)
    n: int
    id: str
    created: int
    model: str
    fingerprint: str
    include_usage: bool


def _prompts(req: CompletionRequest) -> list[str | list[int]]:
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if all(isinstance(x, int) for x in p):
        return [p]  # one prompt as token ids
    return list(p)


def _encode(engine, prompts: list[str | list[int]], echo: bool) -> tuple[list[list[int]], list[str]]:
    """Prompt ids, and the prompt texts to echo ("" each without echo). Blocking: a thread."""
    limit = engine.vocab_size
    ids, texts = [], []
    for prompt in prompts:
        if isinstance(prompt, str):
            ids.append(engine.template.encode(prompt))
            texts.append(prompt if echo else "")
        else:
            check_token_ids(engine.template.convert_ids_to_tokens, prompt, limit, "prompt")
            ids.append(list(prompt))
            texts.append(engine.template.decode(prompt) if echo else "")
    return ids, texts


async def start_completion(service: ChatService, req: CompletionRequest, request_id: str) -> CompletionPlan:
    engine = service.registry.chat_engine(req.model)
    engine.check_health()
    prompts = _prompts(req)
    if len(prompts) > MAX_PROMPTS:
        raise BadRequestError(f"{len(prompts)} prompts; at most {MAX_PROMPTS} per request", param="prompt")
    ids, echo = await asyncio.to_thread(_encode, engine, prompts, bool(req.echo))
    call = ChatCall(
        messages=[],
        max_tokens=req.max_tokens if req.max_tokens is not None else _default_max_tokens(service.settings.max_tokens_limit),
        constraint=output_constraint(req, req.response_format),
        **sampling_fields(req),
    )
    runs: list[ChatRun] = []
    try:
        for j, prompt_ids in enumerate(ids):
            runs.append(await service.start_prompt(engine, prompt_ids, call, f"{request_id}-p{j}"))
    except ContextLengthError as exc:
        exc.param = "prompt"
        _abort(runs)
        raise
    except BaseException:
        _abort(runs)  # the prompts admitted before a refused one give their places back
        raise
    return CompletionPlan(
        runs=runs,
        echo=echo,
        n=call.n,
        id=f"cmpl-{request_id}",
        created=int(time.time()),
        model=engine.model_name,
        fingerprint=system_fingerprint(engine),
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
    )


def _default_max_tokens(limit: int | None) -> int:
    """OpenAI's 16, within the server's limit: a request that names no max_tokens asks for no
    particular length, so a lower limit caps it (as chat's default is capped), never refuses it."""
    return DEFAULT_MAX_TOKENS if limit is None else min(DEFAULT_MAX_TOKENS, limit)


def _abort(runs: list[ChatRun]) -> None:
    for run in runs:
        run.abort()


async def _merged(runs: list[ChatRun]) -> AsyncIterator[tuple[int, ChatEvent]]:
    """(prompt index, event) of every run, interleaved as produced."""

    async def tagged(j: int, run: ChatRun) -> AsyncIterator[tuple[int, ChatEvent]]:
        async for event in run.events():
            yield j, event

    try:
        async for item in merge([tagged(j, run) for j, run in enumerate(runs)]):
            yield item
    finally:
        _abort(runs)


def _usage(plan: CompletionPlan, completion_tokens: int) -> OpenAIUsage:
    prompt = sum(run.prompt_tokens for run in plan.runs)
    return OpenAIUsage.counted(prompt, completion_tokens, sum(run.cached_tokens for run in plan.runs))


async def completion_response(plan: CompletionPlan) -> Completion:
    texts: dict[int, list[str]] = {}
    finished: dict[int, ChatEvent] = {}
    async for j, event in _merged(plan.runs):
        index = j * plan.n + event.index
        texts.setdefault(index, [plan.echo[j]]).append(event.text)
        if event.finish_reason is not None:
            finished[index] = event
    choices = [
        CompletionChoice(index=i, text="".join(texts[i]), finish_reason=finished[i].finish_reason)
        for i in sorted(finished)
    ]
    return Completion(
        id=plan.id,
        created=plan.created,
        model=plan.model,
        system_fingerprint=plan.fingerprint,
        choices=choices,
        usage=_usage(plan, sum(e.completion_tokens for e in finished.values())),
    )


async def completion_stream(plan: CompletionPlan) -> AsyncIterator[dict]:
    def chunk(choices: list[CompletionChoice], usage: OpenAIUsage | None = None) -> dict:
        payload = Completion(
            id=plan.id,
            created=plan.created,
            model=plan.model,
            system_fingerprint=plan.fingerprint,
            choices=choices,
            usage=usage,
        ).model_dump()
        if not plan.include_usage:
            del payload["usage"]
        return payload

    for j, text in enumerate(plan.echo):
        if text:
            yield chunk([CompletionChoice(index=j * plan.n + i, text=text) for i in range(plan.n)])
    completion_tokens = 0
    async for j, event in _merged(plan.runs):
        if event.text or event.finish_reason is not None:
            yield chunk(
                [CompletionChoice(index=j * plan.n + event.index, text=event.text, finish_reason=event.finish_reason)]
            )
        if event.finish_reason is not None:
            completion_tokens += event.completion_tokens
    if plan.include_usage:
        yield chunk([], _usage(plan, completion_tokens))

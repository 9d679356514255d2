"""/v1/completions: legacy text completion over the same chat engine, without a chat template.

A prompt is encoded as plain text (``template.encode``: no special tokens) or taken as token
ids. A list of prompts gives ``n`` choices per prompt, choice ``index = prompt_index * n + i``.

``logprobs: N`` gives each generated token's log-probability with N alternatives; with
``echo`` the prompt's tokens come first with theirs (the engine computes every prompt position
for them, never taking the prompt from its prefix cache), and ``max_tokens: 0`` generates
nothing: the prompt is only scored (``finish_reason: "length"``), as evaluation harnesses ask.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from glm_api.errors import BadRequestError, ContextLengthError
from glm_api.engines.base import TokenLogprob
from glm_api.protocol.openai import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, OpenAIUsage
from glm_api.serving.chat import ChatCall, ChatEvent, ChatRun, ChatService
from glm_api.serving.logprobs import TokenTexts, completion_logprobs, extend
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
    prompt_ids: list[list[int]]
    top_logprobs: int | None = None  # logprobs asked for, with this many alternatives (else None)
    token_texts: TokenTexts | None = None

    def logprobs(
        self, j: int, prompt: list[TokenLogprob | None] | None, output: list[TokenLogprob], offset: int = 0
    ) -> CompletionLogprobs | None:
        """Prompt ``j``'s choice's logprobs: the echoed prompt's tokens (when ``prompt``), then
        the output's, whose offsets start at ``offset``, in the choice's text."""
        if self.top_logprobs is None or self.token_texts is None:
            return None
        out = completion_logprobs(self.token_texts, output, text_offset=offset)
        if prompt is not None:
            out = extend(completion_logprobs(self.token_texts, prompt, first_token=self.prompt_ids[j][0]), out)
        return out


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


async def start_completion(
    service: ChatService, req: CompletionRequest, request_id: str, *, priority: int = 0
) -> CompletionPlan:
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
        logprobs=req.logprobs,
        prompt_logprobs=req.logprobs if req.echo else None,
        **sampling_fields(req),
        priority=priority,
    )
    runs: list[ChatRun] = []
    try:
        for j, prompt_ids in enumerate(ids):
            runs.append(await service.start_prompt(engine, prompt_ids, call, f"{request_id}-p{j}", raw=True))
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
        prompt_ids=ids,
        top_logprobs=req.logprobs,
        token_texts=service.token_texts(engine) if req.logprobs is not None else None,
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
    logprobs: dict[int, list[TokenLogprob]] = {}
    prompt_logprobs: dict[int, list[TokenLogprob | None]] = {}
    async for j, event in _merged(plan.runs):
        index = j * plan.n + event.index
        texts.setdefault(index, [plan.echo[j]]).append(event.text)
        logprobs.setdefault(index, []).extend(event.logprobs)
        if event.prompt_logprobs is not None:
            prompt_logprobs[index] = event.prompt_logprobs
        if event.finish_reason is not None:
            finished[index] = event

    def choice(i: int) -> CompletionChoice:
        j = i // plan.n
        lp = plan.logprobs(j, prompt_logprobs.get(i), logprobs[i], len(plan.echo[j]))
        return CompletionChoice(index=i, text="".join(texts[i]), finish_reason=finished[i].finish_reason, logprobs=lp)

    if plan.top_logprobs is None:
        choices = [choice(i) for i in sorted(finished)]
    else:  # a scored prompt has a token per position to describe: off the event loop
        choices = await asyncio.to_thread(lambda: [choice(i) for i in sorted(finished)])
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

    # The echoed prompt comes first; with logprobs, in each choice's first chunk, with the
    # prompt's log-probabilities that the engine sends with its first output.
    echoing = plan.top_logprobs is not None
    if not echoing:
        for j, text in enumerate(plan.echo):
            if text:
                yield chunk([CompletionChoice(index=j * plan.n + i, text=text) for i in range(plan.n)])
    sent: dict[int, int] = {}  # characters of each choice's text sent so far (for text_offset)
    completion_tokens = 0
    async for j, event in _merged(plan.runs):
        index = j * plan.n + event.index
        text, prompt, start = event.text, None, sent.get(index, 0)
        if echoing and index not in sent:
            text, prompt, start = plan.echo[j] + text, event.prompt_logprobs, len(plan.echo[j])
        sent[index] = sent.get(index, 0) + len(text)
        logprobs = plan.logprobs(j, prompt, event.logprobs, start)
        if text or event.finish_reason is not None or (logprobs is not None and logprobs.tokens):
            yield chunk([CompletionChoice(index=index, text=text, finish_reason=event.finish_reason, logprobs=logprobs)])
        if event.finish_reason is not None:
            completion_tokens += event.completion_tokens
    if plan.include_usage:
        yield chunk([], _usage(plan, completion_tokens))

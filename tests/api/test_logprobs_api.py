"""Log-probabilities through /v1/completions and /v1/chat/completions, on the packaged SmolLM2.

Every figure is checked against a stock forward of the same model (transformers' own attention,
no engine): the log_softmax of its logits at each position. Bodies are validated with the
``openai`` package's types, and completions are read the way lm-evaluation-harness's
``local-completions`` model reads them (``token_logprobs[ctxlen:-1]``, greedy when each token's
logprob is the largest of its ``top_logprobs``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from openai._models import construct_type
from openai.types import Completion
from openai.types.chat import ChatCompletion

from tests.api.test_openai_api import chunks_of, completion_of

TOL = 2e-3  # the engine's paged attention against SDPA, float32, 30 layers

PROMPT = "The capital of France is Paris. The capital of Italy is"


@torch.inference_mode()
def reference(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Row p: log_softmax of a stock forward's logits at position p (it predicts token p + 1)."""
    return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def completion_type(body: dict) -> Completion:
    """Checked against openai's type. Its lists of logprobs admit no null, but the first token
    of an echoed prompt has none (null, as OpenAI's own API and vLLM send it; the SDK parses
    responses without validating them): everything else is validated strictly."""
    strict = copy.deepcopy(body)
    for choice in strict["choices"]:
        lp = choice.get("logprobs")
        if lp and lp["token_logprobs"] and lp["token_logprobs"][0] is None:
            assert lp["top_logprobs"][0] is None and None not in lp["token_logprobs"][1:]
            lp["token_logprobs"][0], lp["top_logprobs"][0] = 0.0, {}
    Completion.model_validate(strict)
    return construct_type(type_=Completion, value=body)  # as the SDK reads a response


def complete(client, **body) -> Completion:
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return completion_type(response.json())


def assert_prompt_scored(logprobs, ids: list[int], ref: torch.Tensor, token_text, top_n: int) -> None:
    texts = [token_text(i) for i in ids]
    assert logprobs.tokens[: len(ids)] == texts
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for p in range(1, len(ids)):
        assert logprobs.token_logprobs[p] == pytest.approx(ref[p - 1, ids[p]].item(), abs=TOL), p
        top = logprobs.top_logprobs[p]
        best = int(ref[p - 1].argmax())
        assert texts[p] in top and len(top) <= top_n + 1  # the token itself is always there
        if top_n:
            assert top[token_text(best)] == pytest.approx(ref[p - 1, best].item(), abs=TOL)
    offsets = logprobs.text_offset[: len(ids)]
    assert offsets == [sum(len(t) for t in texts[:p]) for p in range(len(ids))]


@pytest.fixture(scope="module")
def token_text(smollm2):
    """A token's text as the server reports it: decoded alone, a special token by its name."""
    return lambda token_id: smollm2.template.decode([token_id]) or smollm2.template.convert_ids_to_tokens([token_id])[0]


# ---------------------------------------------------------------------------------------------
# Completions: echo and max_tokens 0 (scoring a prompt)


def test_echo_with_max_tokens_0_scores_the_prompt(client, smollm2, token_text):
    ids = smollm2.template.encode(PROMPT)
    ref = reference(smollm2.model, ids)
    out = complete(client, prompt=PROMPT, echo=True, max_tokens=0, logprobs=1)
    choice = out.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(ids)
    texts = [token_text(i) for i in ids]
    assert "".join(texts) == PROMPT  # byte-level BPE: the tokens spell the prompt
    assert len(choice.logprobs.tokens) == len(ids)
    assert_prompt_scored(choice.logprobs, ids, ref, token_text, 1)
    # logprobs: 1 gives the most likely token beside the token itself: one or two entries.
    assert all(1 <= len(t) <= 2 for t in choice.logprobs.top_logprobs[1:])


def test_token_id_prompts_as_lm_eval_sends_them(client, smollm2, token_text):
    """lm-evaluation-harness's loglikelihood request: a batch of token-id prompts (context +
    continuation), echo, max_tokens 1, logprobs 1, temperature 0; it sums
    ``token_logprobs[ctxlen:-1]`` and calls the continuation greedy when each of its tokens
    has the largest logprob of its ``top_logprobs``."""
    context = smollm2.template.encode("Question: What colour is the sky on a clear day?\nAnswer:")
    continuations = [smollm2.template.encode(" blue"), smollm2.template.encode(" a loud trumpet")]
    prompts = [context + c for c in continuations]
    response = client.post(
        "/v1/completions",
        json={"prompt": prompts, "echo": True, "max_tokens": 1, "logprobs": 1, "temperature": 0, "seed": 1234},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    completion_type(body)
    choices = sorted(body["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1]
    for choice, ids, cont in zip(choices, prompts, continuations):
        ref = reference(smollm2.model, ids)
        ctxlen = len(context)
        token_logprobs = choice["logprobs"]["token_logprobs"]
        assert len(token_logprobs) == len(ids) + 1  # the prompt, then the one generated token
        summed = sum(token_logprobs[ctxlen:-1])
        expected = sum(ref[p - 1, ids[p]].item() for p in range(ctxlen, len(ids)))
        assert summed == pytest.approx(expected, abs=TOL * len(cont))
        is_greedy = all(
            tok == max(top.values())
            for tok, top in zip(token_logprobs[ctxlen:-1], choice["logprobs"]["top_logprobs"][ctxlen:-1])
        )
        assert is_greedy == all(int(ref[p - 1].argmax()) == ids[p] for p in range(ctxlen, len(ids)))
        # The generated token is the greedy one, with its own log-probability.
        generated = choice["logprobs"]["tokens"][-1]
        assert generated == token_text(int(ref[-1].argmax()))
        assert token_logprobs[-1] == pytest.approx(ref[-1].max().item(), abs=TOL)


def test_completion_logprobs_of_generated_tokens(client, smollm2, token_text):
    ids = smollm2.template.encode(PROMPT)
    out = complete(client, prompt=PROMPT, max_tokens=5, logprobs=3, temperature=0)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == out.usage.completion_tokens == 5
    # The greedy tokens: each is the most likely of its top 3 (the token itself is among them).
    new_ids = greedy(smollm2.model, ids, 5, frozenset())
    ref = reference(smollm2.model, ids + new_ids)
    for k, (tok, value, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)):
        row = ref[len(ids) - 1 + k]
        best = row.topk(3)
        assert tok == token_text(int(best.indices[0]))
        assert value == pytest.approx(best.values[0].item(), abs=TOL)
        assert list(top) == [token_text(int(i)) for i in best.indices]
        assert value == max(top.values())
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(5)]
    assert "".join(lp.tokens) == out.choices[0].text


def test_echo_and_generated_tokens_in_one_list(client, smollm2, token_text):
    ids = smollm2.template.encode(PROMPT)
    out = complete(client, prompt=ids, echo=True, max_tokens=3, logprobs=0, temperature=0)
    choice = out.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 3 and choice.text.startswith(PROMPT)
    full = ids + greedy(smollm2.model, ids, 3, frozenset())
    ref = reference(smollm2.model, full)
    texts = [token_text(i) for i in full]
    assert_prompt_scored(lp, ids, ref, token_text, 0)
    for p in range(len(ids), len(full)):
        assert lp.token_logprobs[p] == pytest.approx(ref[p - 1, full[p]].item(), abs=TOL)
        assert list(lp.top_logprobs[p]) == [texts[p]]  # logprobs 0: the token itself only
    assert lp.text_offset[len(ids)] == len(PROMPT)


def test_echo_ignores_the_prefix_cache(client, smollm2):
    """The prompt was just served, so its beginning is in the prefix cache: a scored prompt
    still computes every position (none of it counted as cached)."""
    text = "Bread, butter and jam make a simple breakfast for many families in the morning."
    ids = smollm2.template.encode(text)
    assert len(ids) > 16
    warm = complete(client, prompt=text, max_tokens=1, temperature=0)
    again = complete(client, prompt=text, max_tokens=1, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens >= 16  # it is in the cache
    scored = complete(client, prompt=text, echo=True, max_tokens=0, logprobs=1)
    assert scored.usage.prompt_tokens_details.cached_tokens == 0
    ref = reference(smollm2.model, ids)
    got = scored.choices[0].logprobs.token_logprobs
    assert max(abs(got[p] - ref[p - 1, ids[p]].item()) for p in range(1, len(ids))) < TOL
    assert warm.choices[0].text == again.choices[0].text


def test_max_tokens_0_without_logprobs_generates_nothing(client):
    out = complete(client, prompt="Hello there", max_tokens=0)
    assert out.choices[0].text == "" and out.choices[0].finish_reason == "length"
    assert out.choices[0].logprobs is None and out.usage.completion_tokens == 0
    echoed = complete(client, prompt="Hello there", max_tokens=0, echo=True)
    assert echoed.choices[0].text == "Hello there" and echoed.choices[0].logprobs is None


def test_streamed_echo_carries_the_prompt_logprobs_first(client, smollm2):
    ids = smollm2.template.encode(PROMPT)
    response = client.post(
        "/v1/completions",
        json={"prompt": PROMPT, "echo": True, "max_tokens": 3, "logprobs": 2, "temperature": 0, "stream": True},
    )
    from tests.api.test_seed_api import sse_events

    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [construct_type(type_=Completion, value=e) for e in events[:-1]]  # as the SDK reads chunks
    whole = complete(client, prompt=PROMPT, echo=True, max_tokens=3, logprobs=2, temperature=0).choices[0]
    assert chunks[0].choices[0].text.startswith(PROMPT)
    tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    values = [v for c in chunks for v in c.choices[0].logprobs.token_logprobs]
    offsets = [o for c in chunks for o in c.choices[0].logprobs.text_offset]
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    assert values[0] is None and values[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=1e-5)
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert len(tokens) == len(ids) + 3


# ---------------------------------------------------------------------------------------------
# Chat


QUESTION = [{"role": "user", "content": "Name a colour of the sky."}]


@torch.inference_mode()
def greedy(model: torch.nn.Module, prompt: list[int], n: int, stop: frozenset[int]) -> list[int]:
    """A stock greedy continuation, one full forward per token."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        if ids[-1] in stop:
            break
    return ids[len(prompt):]


def test_chat_logprobs_match_a_stock_forward(client, smollm2, token_text):
    prompt = smollm2.template.encode_messages(QUESTION)
    body = client.post(
        "/v1/chat/completions",
        json={"messages": QUESTION, "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 3},
    ).json()
    completion: ChatCompletion = completion_of(body)
    content = completion.choices[0].logprobs.content
    assert len(content) == completion.usage.completion_tokens
    ids = greedy(smollm2.model, prompt, 6, smollm2.template.stop_token_ids)
    assert [e.token for e in content] == [token_text(i) for i in ids]
    ref = reference(smollm2.model, prompt + ids)
    for k, entry in enumerate(content):
        row = ref[len(prompt) - 1 + k]
        best = row.topk(3)
        assert entry.logprob == pytest.approx(row[ids[k]].item(), abs=TOL)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=TOL)
        assert [t.token for t in entry.top_logprobs] == [token_text(int(i)) for i in best.indices]
        assert entry.top_logprobs[0].logprob == entry.logprob  # the same float, as clients compare them
        assert bytes(entry.bytes) == entry.token.encode()
    shown = [e.token for e, i in zip(content, ids) if i not in smollm2.template.stop_token_ids]
    assert "".join(shown) == completion.choices[0].message.content


def test_chat_without_logprobs_has_none(client):
    body = client.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2, "temperature": 0}).json()
    assert body["choices"][0]["logprobs"] is None


def test_streamed_chat_chunks_carry_their_tokens_logprobs(client, smollm2):
    body = {"messages": QUESTION, "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    whole = completion_of(client.post("/v1/chat/completions", json=body).json()).choices[0]
    chunks = chunks_of(client.post("/v1/chat/completions", json={**body, "stream": True}))
    entries = []
    for chunk in chunks[1:]:  # the first carries the role only
        choice = chunk.choices[0]
        if choice.delta.content:
            assert choice.logprobs is not None and choice.logprobs.content  # text comes with its tokens
        if choice.logprobs is not None:
            entries += choice.logprobs.content
    assert [e.token for e in entries] == [e.token for e in whole.logprobs.content]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in whole.logprobs.content], abs=TOL)
    assert all(len(e.top_logprobs) == 2 for e in entries)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content


def test_streamed_chat_without_logprobs_sends_null(client):
    chunks = chunks_of(client.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 3, "stream": True}))
    assert all(c.choices[0].logprobs is None for c in chunks)

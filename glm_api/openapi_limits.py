"""This server's own limits, stated in its OpenAPI spec: what its settings and its loaded models
allow (the largest ``n`` and ``max_tokens``, how many prompts, inputs or documents, token ids
below each model's vocabulary, ``dimensions`` up to each embedding model's, tools only where the
chat format has them, the batch endpoints of the loaded models). The wire rules every server keeps are stated by the protocol models
themselves (``protocol.common.stated``); these depend on the instance, so a client or a fuzzer
generated from ``/openapi.json`` sends what this server serves and nothing it refuses.

Rules that depend on the model are stated per model: an ``anyOf`` with one branch per loaded
model name (the default one also when ``model`` is absent, null or empty) and one for any other
name, which is a 404 whatever else the body holds.
"""

from __future__ import annotations

import copy
from typing import Any

from glm_api.config import Settings
from glm_api.registry import ModelRegistry
from glm_api.serving.batch_lines import served_endpoints
from glm_api.serving.openai_completions import MAX_PROMPTS

Schema = dict[str, Any]


def state_settings_limits(components: dict[str, Schema], settings: Settings) -> None:
    """Limits from ``settings``, refused with a 400 by serving."""
    most_n = min(settings.max_n, settings.max_running + settings.max_waiting)
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        _bound(components[name]["properties"]["n"], "maximum", most_n)
    limit = settings.max_tokens_limit
    if limit is not None:
        for name in ("CompletionRequest", "SeedChatRequest"):
            _bound(components[name]["properties"]["max_tokens"], "maximum", limit)
        if "ResponseCreateRequest" in components:  # /v1/responses' name for it
            _bound(components["ResponseCreateRequest"]["properties"]["max_output_tokens"], "maximum", limit)
        # Chat reads max_completion_tokens, and max_tokens only without it.
        chat = components["ChatCompletionRequest"]
        completion_tokens = copy.deepcopy(chat["properties"]["max_completion_tokens"])
        _bound(completion_tokens, "maximum", limit)
        max_tokens = copy.deepcopy(chat["properties"]["max_tokens"])
        _bound(max_tokens, "maximum", limit)
        _require(chat, {"anyOf": [
            {"required": ["max_completion_tokens"], "properties": {"max_completion_tokens": _not_null(completion_tokens)}},
            {"properties": {"max_completion_tokens": {"type": "null"}, "max_tokens": max_tokens}},
        ]})
    _bound_lists(components["CompletionRequest"]["properties"]["prompt"], MAX_PROMPTS)
    most_inputs = min(settings.max_embedding_inputs, settings.max_embedding_queue)
    _bound_lists(components["EmbeddingRequest"]["properties"]["input"], most_inputs)
    _bound_lists(components["SeedEmbeddingRequest"]["properties"]["prompt"], most_inputs)
    # Rerank and score: one pair per document (or per text_2), refused past the same bound.
    for name in ("RerankRequest", "RerankV2Request"):
        components[name]["properties"]["documents"]["maxItems"] = most_inputs
    for text in ("text_1", "text_2"):
        _bound_lists(components["ScoreRequest"]["properties"][text], most_inputs)
    # best_of is served only equal to n (n absent or null is 1).
    _require(components["CompletionRequest"], {"anyOf": [
        {"properties": {"best_of": {"type": "null"}}},
        {"required": ["best_of"], "properties": {"best_of": {"const": 1}, "n": {"enum": [1, None]}}},
        *({"required": ["best_of", "n"], "properties": {"best_of": {"const": k}, "n": {"const": k}}} for k in range(2, most_n + 1)),
    ]})


def state_model_limits(components: dict[str, Schema], registry: ModelRegistry) -> None:
    """Limits of the loaded models: vocabularies, embedding widths, tool support."""
    chat = registry.chat
    chat_name = chat.model_name if chat is not None else None
    embedding_default = registry.embedding_engine(None).model_name if registry.embeddings else None
    vocab = {name: engine.vocab_size for name, engine in _tokenizer_owners(registry).items()}

    detokenize = components["DetokenizeRequest"]
    _per_model(detokenize, chat_name, {
        name: {"tokens": _ids_below(detokenize["properties"]["tokens"], size)} for name, size in vocab.items()
    })
    if chat is not None:
        completion = components["CompletionRequest"]
        _per_model(completion, chat_name, {chat_name: {"prompt": _ids_below(completion["properties"]["prompt"], vocab[chat_name])}})
    embedding = components["EmbeddingRequest"]
    _per_model(embedding, embedding_default, {
        name: {
            "input": _ids_below(embedding["properties"]["input"], vocab[name]),
            "dimensions": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": engine.dimensions}, {"type": "null"}]},
        }
        for name, engine in registry.embeddings.items()
    })
    components["BatchCreateRequest"]["properties"]["endpoint"]["enum"] = served_endpoints(registry)
    if chat is not None and not chat.template.supports_tools:
        no_tools = {"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0}]}
        # Offered tools need a chat format with tools; forcing one (required, or a named
        # function) works on any model, through the grammar. /v1/responses translates to chat.
        tools_rule = {"anyOf": [
            {"properties": {"tools": no_tools}},
            {"required": ["tool_choice"], "properties": {"tool_choice": {"anyOf": [{"const": "required"}, {"type": "object"}]}}},
            {"required": ["tool_choice"], "properties": {"tool_choice": {"const": "none"}}},
        ]}
        for name in ("ChatCompletionRequest", "ResponseCreateRequest"):
            if name in components:
                _require(components[name], copy.deepcopy(tools_rule))
        _require(components["TokenizeRequest"], {"properties": {"tools": no_tools}})
        # The seed's clients put tools on a message, which the chat format must render.
        components["SeedMessage"]["properties"]["tools"] = no_tools


def _tokenizer_owners(registry: ModelRegistry) -> dict[str, Any]:
    owners: dict[str, Any] = {registry.chat.model_name: registry.chat} if registry.chat is not None else {}
    owners.update(registry.embeddings)
    return owners


def _per_model(model: Schema, default: str | None, rules: dict[str, Schema]) -> None:
    """One branch per served model name with its ``rules`` (properties); any other name is a 404.
    With one model, its rules are the properties themselves (a smaller spec for generators):
    a request naming another model is a 404 whatever it holds."""
    if len(rules) == 1:
        model["properties"].update(next(iter(rules.values())))
        return
    branches: list[Schema] = []
    for name, properties in rules.items():
        names: list[Any] = [name, None, ""] if name == default else [name]
        branch = {"properties": {"model": {"enum": names}, **properties}}
        if name != default:
            branch["required"] = ["model"]  # an absent model is the default one's, never this one's
        branches.append(branch)
    branches.append({"required": ["model"], "properties": {"model": {"type": "string", "not": {"enum": [*rules, ""]}}}})
    _require(model, {"anyOf": branches})


def _require(model: Schema, rule: Schema) -> None:
    model.setdefault("allOf", []).append(rule)


def _not_null(schema: Schema) -> Schema:
    return {"anyOf": [branch for branch in schema.get("anyOf", [schema]) if branch.get("type") != "null"]}


def _bound(schema: Schema, keyword: str, value: int) -> None:
    """Tighten ``keyword`` on the integer branch of ``schema`` (or on ``schema`` itself)."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "integer":
            branch[keyword] = min(value, branch.get(keyword, value))


def _bound_lists(schema: Schema, most: int) -> None:
    """``maxItems`` on the branches that are lists of prompts (of texts, or of token arrays)."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "array" and branch.get("items", {}).get("type") in ("string", "array"):
            branch["maxItems"] = most


def _ids_below(schema: Schema, size: int | None) -> Schema:
    """A copy of ``schema`` whose token ids (integers with minimum 0) are below ``size``."""
    limited = copy.deepcopy(schema)
    if size is None:
        return limited

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "integer" and node.get("minimum") == 0:
                node["maximum"] = size - 1
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(limited)
    return limited

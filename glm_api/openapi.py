"""The OpenAPI document: FastAPI's, made true to what this server answers."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from glm_api.openapi_limits import state_model_limits, state_settings_limits
from glm_api.protocol.openai import ChatCompletionChunk, Completion
from glm_api.protocol.responses import ResponseStreamEventData
from glm_api.protocol.seed import SeedChatChunk

#: What the streamed 200s (``protocol.common.streamed_response``) refer to; FastAPI only adds
#: the models of JSON bodies to the components.
STREAM_CHUNK_MODELS: tuple[type[BaseModel], ...] = (
    SeedChatChunk, ChatCompletionChunk, Completion, ResponseStreamEventData,
)


def openapi_schema(app: FastAPI) -> dict:
    """Built once per app, then cached on it (FastAPI's own convention); while the models
    load, built without their limits and not cached."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _drop_422(schema)
        _add_components(schema, STREAM_CHUNK_MODELS)
        state = app.state.glm
        components = schema["components"]["schemas"]
        state_settings_limits(components, state.settings)
        if state.services is None:
            return schema
        state_model_limits(components, state.services.registry)
        app.openapi_schema = schema
    return app.openapi_schema


def _drop_422(schema: dict) -> None:
    """FastAPI documents a 422 on every route with a body; this server answers 400 instead
    (see error_handlers), so the spec should not promise a status that never comes."""
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(name, None)


def _add_components(schema: dict, models: tuple[type[BaseModel], ...]) -> None:
    _, top = models_json_schema(
        [(model, "serialization") for model in models], ref_template="#/components/schemas/{model}"
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in top.get("$defs", {}).items():
        components.setdefault(name, definition)

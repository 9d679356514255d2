"""``create_app``: the FastAPI application, its lifespan and its routers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from glm_api import __version__
from glm_api.config import Settings
from glm_api.error_handlers import install_error_handlers
from glm_api.metrics import Metrics
from glm_api.middleware import RequestContextMiddleware
from glm_api.openapi import openapi_schema
from glm_api.passing_thread import run_in_passing_thread
from glm_api.serving.batches import BatchStore
from glm_api.serving.responses_store import ResponseStore
from glm_api.security import ApiKeyMiddleware, BodyLimitMiddleware
from glm_api.registry import ModelRegistry, ModelSources, build_registry
from glm_api.routers import batch, lora_adapters, openai, ops, playground, rerank, responses, seed
from glm_api.state import AppState, Services

log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    registry: ModelRegistry | None = None,
    *,
    sources: ModelSources | None = None,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    """Build the app. With ``registry`` it serves those engines at once; without, it loads the
    models from ``settings`` in the background (``/ready`` is 503 until then) and calls
    ``on_fatal`` with the reason if loading fails."""
    state = AppState(settings=settings)
    state.batches = BatchStore(settings, lambda: state.services)
    state.responses = ResponseStore(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader: asyncio.Task | None = None
        if registry is not None:
            registry.start()
            state.services = Services.build(registry, settings)
        else:
            loader = asyncio.create_task(_load(state, sources, on_fatal))
        await state.batches.start()  # resumes the batches a previous run left unfinished
        await state.responses.start()
        try:
            yield
        finally:
            if loader is not None and not loader.done():
                loader.cancel()
            await state.batches.stop()
            await state.responses.stop()
            if state.services is not None:
                await asyncio.to_thread(state.services.registry.stop)

    app = FastAPI(title="glm-api", version=__version__, lifespan=lifespan)
    app.state.glm = state
    # This app's own Prometheus registry: nothing shared between apps (or tests).
    app.state.metrics = Metrics(
        lambda: state.services.registry if state.services is not None else None,
        batch_stats=lambda: state.batches.runner.stats if state.batches.runner is not None else None,
    )
    # Starlette runs the last added outermost: request id and access log, then CORS (so
    # preflights need no key), then the key check, then the body limit, then the routes.
    # File uploads may be larger than other bodies (the multipart framing on top of the file).
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
        path_limits={"/v1/files": settings.batch_max_file_bytes + 64 * 1024},
    )
    app.add_middleware(
        ApiKeyMiddleware, keys=settings.all_api_keys(),
        open_paths=playground.PUBLIC_PATHS if settings.playground else (),
        open_prefixes=playground.PUBLIC_PREFIXES if settings.playground else (),
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=settings.cors_allow_credentials,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "api-key", "x-request-id"],
            expose_headers=["x-request-id", "Retry-After"],
        )
    app.add_middleware(RequestContextMiddleware, metrics=app.state.metrics)
    install_error_handlers(app)
    app.include_router(seed.router)
    app.include_router(openai.router)
    app.include_router(lora_adapters.router)
    app.include_router(responses.router)
    app.include_router(rerank.router)
    app.include_router(batch.router)
    app.include_router(ops.router)
    if settings.playground:
        playground.install(app)  # the page at / and its files; a client of /v1 like any other
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    return app


async def _load(state: AppState, sources: ModelSources | None, on_fatal: Callable[[str], None] | None) -> None:
    try:
        # In a thread that ends with the loading: see glm_api/passing_thread.py.
        registry = await asyncio.to_thread(run_in_passing_thread, build_registry, state.settings, sources, name="load")
        registry.start()
    except Exception as exc:  # any load failure: one clear line, then a non-zero exit
        state.load_error = f"{type(exc).__name__}: {exc}"
        log.error("model loading failed: %s", state.load_error)
        if on_fatal is not None:
            on_fatal(state.load_error)
        return
    state.services = Services.build(registry, state.settings)
    log.info("all models loaded; ready")

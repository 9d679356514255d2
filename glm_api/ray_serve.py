"""glm-api as a Ray Serve application: the same app behind Serve's proxy, one model set per replica.

    serve run deploy/ray/serve.yaml                              # 2 CPU replicas, 127.0.0.1:8100
    serve run glm_api.ray_serve:build num_replicas=2 max_running=16

``build(args)`` is the application builder Serve calls with a config's ``args`` (or the
``key=value`` words after the import path). Its arguments are the server's settings by name:
the fields of :class:`~glm_api.config.Settings`, i.e. the ``GLM_API_*`` variables without the
prefix or the flags of ``python api.py --help`` (``chat_model``, ``embedding_models``,
``max_running``, ...; ``max-running`` works too). Beside them, a few Serve options:

``num_replicas``
    replicas, default 1; or ``autoscaling_config`` (Serve's, e.g. ``{min_replicas: 1,
    max_replicas: 4, target_ongoing_requests: 32}``), not both.
``ray_actor_options``
    each replica's resources, default ``{num_cpus: 1}``; ``{num_gpus: 1}`` on GPU hosts.
``torch_threads``
    threads each replica's torch uses (Ray gives actors ``OMP_NUM_THREADS=1``); default the
    replica's ``num_cpus``, at least 1.
``max_ongoing_requests``
    requests Serve lets into one replica; default ``max_running + max_waiting +
    max_embedding_queue``, everything its engines would hold, so the engines' own limits
    (429 with ``Retry-After``) decide, as in the single-process server.
``max_constructor_retry_count``
    how often Serve retries a replica that fails to start (Serve's default 20); a missing model
    folder fails every time, with its path in ``serve status``.

Each replica builds its :class:`Settings` from these arguments over its own ``GLM_API_*``
environment (arguments win, as flags do), loads its models in its constructor (Serve routes to
a replica only once its constructor returned, so a replica that answers is ready) and serves
``create_app(settings, registry)``: the seed routes, ``/v1``, ``/health``, ``/ready`` and
``/metrics`` of that replica. ``host`` and ``port`` belong to Serve's proxy (``http_options``
in the config) and are refused here; ``shutdown_grace_seconds`` becomes the deployment's
``graceful_shutdown_timeout_s``. Settings are checked here, before any replica starts; model
paths are checked on the replicas, which may run on other hosts.

This module is the only one that imports Ray (``pip install -r requirements-ray.txt``);
nothing in glm-api imports it.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
from typing import Any

from pydantic import ValidationError
from ray import serve
from ray.serve import Application

from glm_api.config import Settings
from glm_api.passing_thread import run_in_passing_thread

log = logging.getLogger(__name__)

#: The deployment's name: what a config's ``deployments:`` section overrides.
DEPLOYMENT_NAME = "GlmApi"
#: Builder arguments that configure the Serve deployment rather than glm-api.
SERVE_OPTIONS = (
    "num_replicas", "autoscaling_config", "ray_actor_options", "max_ongoing_requests", "torch_threads",
    "max_constructor_retry_count",
)
#: Settings that have no meaning inside a replica, and what to use instead.
PROXY_SETTINGS = {
    "host": "the proxy's address is http_options.host in the Serve config",
    "port": "the proxy's port is http_options.port in the Serve config",
}


class _ArgsOnly(Settings):
    """Settings validated from the given arguments alone: the builder's own environment is not
    the replicas' (they read theirs)."""

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, **others):  # type: ignore[override]
        return (init_settings,)


def build(args: dict[str, Any]) -> Application:
    """The Serve application for ``args`` (settings by name plus :data:`SERVE_OPTIONS`)."""
    args = {str(key).replace("-", "_"): value for key, value in (args or {}).items()}
    options = {key: args.pop(key) for key in SERVE_OPTIONS if key in args}
    _refuse_unknown(args)
    try:
        settings = _ArgsOnly(**args)
    except ValidationError as exc:
        raise ValueError("glm-api: invalid settings for the Ray Serve application:\n" + _describe(exc)) from None

    actor_options = dict(options.get("ray_actor_options") or {"num_cpus": 1})
    _check_gpus(settings, actor_options.get("num_gpus") or 0)
    torch_threads = options.get("torch_threads", max(1, int(actor_options.get("num_cpus", 1))))
    if not str(torch_threads).isdigit() or int(torch_threads) < 1:
        raise ValueError(f"glm-api: torch_threads must be a whole number of at least 1, not {torch_threads!r}")
    if "num_replicas" in options and "autoscaling_config" in options:
        raise ValueError("glm-api: give num_replicas or autoscaling_config, not both")

    deployment_options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": actor_options,
        "max_ongoing_requests": int(options.get(
            "max_ongoing_requests", settings.max_running + settings.max_waiting + settings.max_embedding_queue
        )),
        "graceful_shutdown_timeout_s": settings.shutdown_grace_seconds,
    }
    if "max_constructor_retry_count" in options:
        deployment_options["max_constructor_retry_count"] = int(options["max_constructor_retry_count"])
    if "autoscaling_config" in options:
        deployment_options["autoscaling_config"] = options["autoscaling_config"]
    else:
        replicas = options.get("num_replicas", 1)  # "2" from the command line, or Serve's "auto"
        deployment_options["num_replicas"] = int(replicas) if str(replicas).isdigit() else replicas
    # Only what was given travels: each replica reads its own GLM_API_* environment under it.
    return GlmApiReplica.options(**deployment_options).bind(args, int(torch_threads))


def _check_gpus(settings: Settings, num_gpus: float) -> None:
    """A replica sees only the GPUs Ray gives it (``CUDA_VISIBLE_DEVICES``), numbered from 0."""
    for name in ("device", "embedding_device"):
        value = getattr(settings, name, None) or ""
        if any(d.strip().startswith("cuda") or d.strip() == "all" for d in value.split(",")) and not num_gpus:
            raise ValueError(
                f"glm-api: {name} {value!r} needs GPUs in each replica: set ray_actor_options: "
                "{num_gpus: 1} (Ray hides GPUs from actors that reserve none)"
            )
    listed = {d.strip() for d in settings.device.split(",") if d.strip().startswith("cuda")}
    if len(listed) > num_gpus:
        raise ValueError(
            f"glm-api: device {settings.device!r} names {len(listed)} GPUs but each replica reserves "
            f"ray_actor_options.num_gpus {num_gpus:g}; inside a replica its GPUs are cuda:0, cuda:1, ..."
        )


def _refuse_unknown(args: dict[str, Any]) -> None:
    for key in args:
        if key in PROXY_SETTINGS:
            raise ValueError(f"glm-api: {key!r} is not a replica setting under Ray Serve: {PROXY_SETTINGS[key]}")
        if key not in Settings.model_fields:
            known = [*Settings.model_fields, *SERVE_OPTIONS]
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"glm-api: unknown argument {key!r}{hint} Arguments are the server's settings by name "
                f"(python api.py --help, GLM_API_<NAME>) and the Serve options {', '.join(SERVE_OPTIONS)}."
            )


def _describe(exc: ValidationError) -> str:
    return "\n".join(
        f"  {'.'.join(str(part) for part in error['loc']) or 'settings'}: {error['msg']} (got {error.get('input')!r})"
        for error in exc.errors()
    )


@serve.deployment
@serve.ingress()
class GlmApiReplica:
    """One replica: its own settings, models and engines, serving glm-api's FastAPI app."""

    async def __init__(self, settings_args: dict[str, Any], torch_threads: int) -> None:
        import torch

        from glm_api.registry import StartupError, build_registry, resolve_model_sources

        torch.set_num_threads(torch_threads)
        self._settings = Settings(**settings_args)
        _log_through_serve(self._settings.log_level)
        # A missing path or a folder no family serves fails the replica with that message
        # (Serve shows it as the deployment's status); loading runs off the replica's loop.
        sources = resolve_model_sources(self._settings)
        if self._settings.api_key_file is not None and not self._settings.api_key_file.is_file():
            raise StartupError(f"API key file {self._settings.api_key_file} does not exist on this host")
        # loaded in a thread that ends with it (glm_api/passing_thread.py)
        self._registry = await asyncio.to_thread(run_in_passing_thread, build_registry, self._settings, sources)
        log.info("replica ready with %d torch threads", torch.get_num_threads())

    def __serve_build_asgi_app__(self):
        from glm_api.app import create_app

        # With the registry given, the app's lifespan (which Serve runs) starts and stops it.
        app = create_app(self._settings, self._registry)
        app.add_middleware(_ProxySetsTheRequestId)
        return app

    def check_health(self) -> None:
        """Serve's periodic health check: a dead engine restarts the replica."""
        self._registry.check_health()


def _log_through_serve(level: str) -> None:
    """glm-api's log lines (the access log with request ids, model loading) into the replica's
    Serve log, with Serve's own handlers (file under the session's logs/serve/, and stderr)."""
    serve_logger = logging.getLogger("ray.serve")
    ours = logging.getLogger("glm_api")
    ours.setLevel(level.upper())
    if serve_logger.handlers:
        ours.handlers = list(serve_logger.handlers)
        ours.propagate = False


class _ProxySetsTheRequestId:
    """Serve's proxy gives each request an ``x-request-id`` (the client's, else a new one), which
    the app logs and echoes, and puts it on every response itself: drop the app's copy of that
    same value so a client sees the header once, as from the single-process server."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        given = dict(scope.get("headers") or []).get(b"x-request-id") if scope["type"] == "http" else None
        if given is None:
            await self.app(scope, receive, send)
            return

        async def send_once(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    (name, value) for name, value in message.get("headers", [])
                    if not (name.lower() == b"x-request-id" and value == given)
                ]
            await send(message)

        await self.app(scope, receive, send_once)


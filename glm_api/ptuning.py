"""P-Tuning v2 checkpoints at start-up: which to serve, checked against the base, and pinned.

Two ways to serve one (README "P-Tuning v2 prefixes"):

- the chat model folder itself declares ``pre_seq_len`` (a whole P-tuned checkpoint): the base
  weights load from it and its prefix is the engine's default, under the chat model's name;
- ``--ptuning NAME=PATH`` (``GLM_API_PTUNING``): a prefix over the shared chat model, served
  as ``NAME`` (``/v1/models`` lists it with the chat model as ``parent``). Only the folder's
  prefix encoder is read: P-Tuning v2 trains the prefix alone, over frozen base weights.

:func:`ptuning_sources` checks configs only (cheap, before the server starts); :func:`pin_prefixes`
encodes each prefix on the engine's device in its dtype and pins it in the engine's KV pool
(every replica its own), :func:`prefixed_views` makes the named engines the registry routes to.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from glm_api.model_sources import ModelSource, StartupError

if TYPE_CHECKING:
    import torch

    from glm_api.config import Settings
    from glm_api.engines.base import ChatEngine
    from glm_api.engines.chat_engine import TransformersChatEngine

log = logging.getLogger(__name__)


def ptuning_sources(settings: Settings, chat: ModelSource | None, taken: set[str]) -> tuple[ModelSource, ...]:
    """The ``--ptuning`` prefixes, each checked against the chat model (a ChatGLM3 of the same
    layers, kv groups and head width); ``taken``: names other models already use."""
    from glm_api.families.chatglm3.checkpoint import is_chatglm3_folder, read_chatglm3_config
    from glm_api.families.chatglm3.prefix_encoder import check_compatible, read_ptuning_config
    from glm_api.model_sources import _existing

    if not settings.ptuning:
        return ()
    if chat is None:
        raise StartupError("--ptuning needs a chat model to put the prefixes over (chat is disabled)")
    if not is_chatglm3_folder(chat.path):
        raise StartupError(
            f"--ptuning: P-Tuning v2 prefixes are served over a ChatGLM3 chat model; {chat.path} "
            f"(the chat model {chat.name!r}) is not a ChatGLM3 checkpoint folder"
        )
    try:
        base = read_chatglm3_config(chat.path)
    except ValueError as exc:
        raise StartupError(f"cannot serve {chat.path} as the chat model {chat.name!r}: {exc}") from None
    sources = []
    for name, path in settings.ptuning.items():
        if name in taken:
            raise StartupError(f"--ptuning {name}=...: the name {name!r} is already the name of another model")
        folder = _existing(Path(path), f"P-Tuning v2 checkpoint {name!r}", "GLM_API_PTUNING / --ptuning")
        try:
            check_compatible(read_ptuning_config(folder), base, folder)
        except ValueError as exc:
            raise StartupError(f"cannot serve {folder} as the P-Tuning v2 prefix {name!r}: {exc}") from None
        sources.append(ModelSource(name, folder))
    return tuple(sources)


def pin_prefixes(
    engine: TransformersChatEngine, chat: ModelSource, prefixes: tuple[ModelSource, ...], dtype: torch.dtype
) -> None:
    """Encode and pin the chat folder's own prefix (the default, when it has one) and each
    ``--ptuning`` prefix in ``engine``'s pool; StartupError for weights that do not fit."""
    from glm_api.families.chatglm3.prefix_encoder import (
        is_ptuning_folder,
        load_prefix_weights,
        prefix_key_values,
        read_ptuning_config,
    )

    own = [(chat, True)] if is_ptuning_folder(chat.path) else []
    for source, default in [*own, *((p, False) for p in prefixes)]:
        try:
            cfg = read_ptuning_config(source.path)
            key_values = prefix_key_values(load_prefix_weights(source.path, cfg), cfg, dtype, engine.device)
            engine.pin_prefix(source.name, key_values, default=default)
        except (ValueError, MemoryError) as exc:
            raise StartupError(f"cannot serve {source.path} as the P-Tuning v2 prefix {source.name!r}: {exc}") from None
        log.info(
            "P-Tuning v2 prefix %s (%s): %d positions%s, %s",
            source.name, source.path, cfg.pre_seq_len, " through its MLP" if cfg.prefix_projection else "",
            "served as the chat model itself" if default else f"served over {chat.name}",
        )


def prefixed_views(chat: ChatEngine, prefixes: tuple[ModelSource, ...]) -> dict[str, ChatEngine]:
    """The engine each ``--ptuning`` name routes to: the chat engine with that prefix."""
    from glm_api.engines.prefixed_engine import PrefixedChatEngine

    return {
        p.name: PrefixedChatEngine(chat, p.name, prefix=p.name, parent=chat.model_name, source=str(p.path))
        for p in prefixes
    }

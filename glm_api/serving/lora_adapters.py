"""Runtime LoRA loading and unloading (vLLM's routes), when ``--allow-runtime-lora`` is set.

Reading and fitting an adapter is blocking work (a file read, tensors stacked per module), so
it runs in a thread; the engine waits only for the step in progress. The replies are vLLM's
plain-text ones, so scripts written for vLLM read them the same way.
"""

from __future__ import annotations

import asyncio
import logging

from glm_api.config import Settings
from glm_api.errors import ForbiddenError
from glm_api.passing_thread import run_in_passing_thread
from glm_api.protocol.lora import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from glm_api.registry import ModelRegistry

log = logging.getLogger(__name__)


def _allowed(settings: Settings) -> None:
    if not settings.allow_runtime_lora:
        raise ForbiddenError(
            "loading and unloading LoRA adapters at run time is off on this server; start it with "
            "--allow-runtime-lora (GLM_API_ALLOW_RUNTIME_LORA=1), or list adapters with --lora NAME=PATH"
        )


async def load_adapter(registry: ModelRegistry, settings: Settings, req: LoadLoraAdapterRequest) -> str:
    _allowed(settings)
    # torch work in a thread that ends with it (glm_api/passing_thread.py)
    await asyncio.to_thread(run_in_passing_thread, registry.load_adapter, req.lora_name, req.lora_path)
    log.info("LoRA adapter %s loaded at run time from %s", req.lora_name, req.lora_path)
    return f"Success: LoRA adapter '{req.lora_name}' added successfully."


async def unload_adapter(registry: ModelRegistry, settings: Settings, req: UnloadLoraAdapterRequest) -> str:
    _allowed(settings)
    await asyncio.to_thread(registry.unload_adapter, req.lora_name)
    log.info("LoRA adapter %s unloaded at run time", req.lora_name)
    return f"Success: LoRA adapter '{req.lora_name}' removed successfully."

"""vLLM's runtime LoRA routes: parse, call serving, return (see glm_api/serving/lora_adapters.py)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from glm_api.deps import AppStateDep, ServicesDep
from glm_api.protocol.common import ERROR_RESPONSES, ErrorResponse
from glm_api.protocol.lora import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from glm_api.serving import lora_adapters as serving

_RESPONSES: dict[int | str, dict] = {
    **ERROR_RESPONSES,
    # vLLM's replies are plain text; the errors stay JSON (so no response_class: it would label them text too).
    200: {"description": "done", "content": {"text/plain": {"schema": {"type": "string"}}}},
    403: {"model": ErrorResponse, "description": "runtime LoRA loading is off (--allow-runtime-lora)"},
    409: {"model": ErrorResponse, "description": "the name is taken, or the adapter has requests in flight"},
}
router = APIRouter(prefix="/v1", tags=["LoRA adapters"], responses=_RESPONSES)


@router.post("/load_lora_adapter", response_model=None)
async def load_lora_adapter(body: LoadLoraAdapterRequest, services: ServicesDep, state: AppStateDep) -> PlainTextResponse:
    return PlainTextResponse(await serving.load_adapter(services.registry, state.settings, body))


@router.post("/unload_lora_adapter", response_model=None)
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, services: ServicesDep, state: AppStateDep) -> PlainTextResponse:
    return PlainTextResponse(await serving.unload_adapter(services.registry, state.settings, body))

"""Bodies of vLLM's runtime LoRA routes (``POST /v1/load_lora_adapter``, ``/v1/unload_lora_adapter``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # vLLM's clients may send load_inplace and others

    lora_name: str = Field(min_length=1, max_length=256, description="the model name requests will use")
    lora_path: str = Field(min_length=1, description="a peft adapter folder on the server's disk")


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # vLLM's lora_int_id is accepted and not needed

    lora_name: str = Field(min_length=1, max_length=256)

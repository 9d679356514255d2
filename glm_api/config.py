"""Settings, read once at start-up from ``GLM_API_*`` environment variables and CLI flags.

Nothing reads the environment at import time: ``Settings()`` is built by the entry point (or
a test) and passed down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: The seed's model folders, looked for under ``model_dir`` when nothing is configured.
SEED_CHAT_MODEL = "chatglm3-6b-32k"
SEED_EMBEDDING_MODELS = ("text2vec-large-chinese", "text2vec-base-chinese-paraphrase")
#: Reranker folders looked for under ``model_dir`` when no ``rerank_models`` are configured.
SEED_RERANK_MODELS = ("bge-reranker-large", "bge-reranker-base", "bge-reranker-v2-m3")


def parse_name_paths(value: object, what: str = "embedding model") -> dict[str, str]:
    """``"a=/p/a,b=/p/b"`` (env) or ``["a=/p/a", ...]`` (CLI) or a dict -> ``{name: path}``."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    items = value.split(",") if isinstance(value, str) else list(value)
    out: dict[str, str] = {}
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"{what} {item!r} is not NAME=PATH")
        out[name.strip()] = path.strip()
    return out


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GLM_API_", extra="ignore")

    host: str = "0.0.0.0"
    port: int = Field(8100, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # Models. Unset paths fall back to the seed's ./model/<name> folders, then to the small
    # models that ship inside PyPI packages (see DESIGN.md, "Models").
    model_dir: Path = Path("model")
    chat_model: str | None = None
    chat_model_name: str | None = None
    embedding_models: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    disable_chat: bool = False
    cache_dir: Path = Path(".cache/glm-api")
    # One device, or a comma-separated list (one chat replica per entry), or "all" GPUs.
    device: str = "auto"
    device_map: Literal["none", "auto", "balanced"] = Field(
        "none", description="split one chat model by layers over the --device list instead of one replica each"
    )
    embedding_device: str | None = Field(None, description="where embedding models load (default: the first --device)")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    quantize: Literal["none", "int8", "w8a8", "int4"] = Field(
        "none", description="chat model decoder weights: int8 (weight-only), w8a8 (int8 activations too on wide steps), int4"
    )
    embedding_max_seq_length: int | None = Field(None, ge=1)
    # Cross-encoder rerankers, NAME=PATH (default: ./model/bge-reranker-*). Without one, /rerank
    # and /score use an embedding model's cosine similarity.
    rerank_models: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    # P-Tuning v2 checkpoints of the (ChatGLM3) chat model, NAME=PATH: each served as NAME, its
    # prefix's keys/values pinned in the chat model's KV cache.
    ptuning: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    # LoRA adapters of the chat model, NAME=PATH (peft folders): a request whose model is NAME
    # runs under that adapter. Loading/unloading them over HTTP is off unless allowed.
    lora: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    allow_runtime_lora: bool = Field(
        False, description="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's routes)"
    )

    # Chat scheduling and limits.
    max_running: int = Field(32, ge=1, description="sequences decoded together in one batch")
    max_waiting: int = Field(256, ge=0, description="requests queued beyond the running batch; more get 429")
    prefix_cache_tokens: int = Field(
        4096, ge=0, description="tokens of finished rows' KV blocks kept findable for later prompts (0: off)"
    )
    kv_cache_tokens: int | None = Field(
        None, ge=1, description="KV pool size in tokens (default: 65536 on CPU; on GPU what memory allows)"
    )
    kv_block_size: int = Field(16, ge=1, le=1024, description="tokens per KV block")
    prefill_chunk_tokens: int = Field(512, ge=1, description="prompt tokens prefilled per engine step, all rows together")
    prefill_time_share: float = Field(
        0.15, gt=0.0, le=1.0, description="while other requests decode or wait, the share of engine time long prompts' chunks get"
    )
    prefill_step_ms: float = Field(
        500.0, gt=0.0, description="a step with a long prompt's chunk aims to last at most this (a newcomer's wait)"
    )
    compile_decode: Literal["auto", "on", "off"] = Field(
        "auto", description="decode steps through torch.compile, warmed up at start-up (auto: on for CUDA, off on CPU)"
    )
    cpu_kernels: Literal["auto", "off"] = Field(
        "auto",
        description="CPU float32: projections through oneDNN's packed linear where it times faster at start-up "
        "(auto; costs a second copy of the weights), or F.linear everywhere (off)",
    )
    kernel_timings: Literal["cached", "fresh"] = Field(
        "cached",
        description="start-up kernel timings (--cpu-kernels, --quantize): reused from --cache-dir when taken on this "
        "machine with this torch and thread count (cached), or taken again at every start (fresh)",
    )
    cuda_graphs: Literal["auto", "on", "off"] = Field(
        "auto", description="CUDA: decode steps captured as CUDA graphs per batch bucket (auto: on; no effect on CPU)"
    )
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="share of GPU memory for weights + KV pool")
    max_prompt_tokens: int | None = Field(None, ge=1, description="cap below the model's context")
    default_max_tokens: int = Field(4096, ge=1, description="the seed's default max_tokens")
    max_tokens_limit: int | None = Field(None, ge=1, description="larger max_tokens are refused with 400")
    max_n: int = Field(8, ge=1, description="largest n (choices) per request")
    json_max_depth: int = Field(
        16, ge=1, description="most levels of arrays and objects in constrained JSON a schema leaves open (json_object)"
    )

    # Embedding batching and limits.
    embedding_batch_size: int = Field(32, ge=1)
    embedding_batch_wait_ms: float = Field(
        2.0, ge=0, description="a batch waits this long for more texts after each arrival (10x in all at most)"
    )
    max_embedding_inputs: int = Field(2048, ge=1)
    max_embedding_tokens: int | None = Field(
        None, ge=1, description="tokens of all inputs of one embedding request (after truncation); more get 400"
    )
    max_embedding_queue: int = Field(4096, ge=1, description="texts waiting to be embedded; more get 429")

    # Access and hardening.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False)
    api_key_file: Path | None = None
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Names of chat models whose folders may run their own Python code (off for all by default).
    trust_remote_code: Annotated[list[str], NoDecode] = Field(default_factory=list)
    cors_allow_credentials: bool = False
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    shutdown_grace_seconds: float = Field(30.0, ge=0, description="time running streams get to finish on SIGTERM")

    # The Batch API (/v1/files, /v1/batches): what it stores lives under data_dir.
    data_dir: Path = Field(Path(".data/glm-api"), description="the Batch API's database and files")
    batch_max_file_bytes: int = Field(
        100 * 1024 * 1024, ge=1, description="largest file /v1/files takes (its uploads may exceed max_body_bytes)"
    )
    batch_max_lines: int = Field(50_000, ge=1, description="most lines of one batch input file")
    batch_max_running: int | None = Field(
        None, ge=1,
        description="chat slots batch lines keep while interactive requests are present (default: a quarter of max_running)",
    )

    # The Responses API (/v1/responses): responses stored with store: true.
    responses_db: Path | None = Field(
        None, description="SQLite database of stored responses (default: <data_dir>/responses.sqlite3)"
    )
    responses_max_bytes: int = Field(
        1024**3, ge=1024, description="stored responses' JSON kept in all; beyond it the oldest are evicted"
    )
    responses_max_age_hours: float = Field(
        720.0, gt=0, description="stored responses older than this are evicted (OpenAI keeps them 30 days)"
    )

    # The web playground at / (glm_api/static): a browser client of the /v1 API.
    playground: bool = True

    @field_validator("api_keys", "cors_origins", "trust_remote_code", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> list[str]:
        if value is None:
            return []
        items = value.split(",") if isinstance(value, str) else list(value)
        return [str(item).strip() for item in items if str(item).strip()]

    @model_validator(mode="after")
    def _no_wildcard_with_credentials(self) -> Settings:
        if self.cors_allow_credentials and "*" in self.cors_origins:
            raise ValueError("CORS: origin '*' together with credentials would let any site act as the user; list the origins")
        return self

    def responses_db_path(self) -> Path:
        return self.responses_db if self.responses_db is not None else self.data_dir / "responses.sqlite3"

    def batch_slots(self) -> int:
        """Chat lines of all batches kept while interactive requests are present (idle: max_running)."""
        return self.batch_max_running or max(1, self.max_running // 4)

    def all_api_keys(self) -> list[str]:
        """Keys from the settings plus one per line of ``api_key_file`` (blank lines and # comments skipped)."""
        keys = list(self.api_keys)
        if self.api_key_file is not None:
            for line in self.api_key_file.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(line)
        return keys

    @field_validator("embedding_models", mode="before")
    @classmethod
    def _parse_embedding_models(cls, value: object) -> dict[str, str]:
        return parse_name_paths(value)

    @field_validator("rerank_models", mode="before")
    @classmethod
    def _parse_rerank_models(cls, value: object) -> dict[str, str]:
        return parse_name_paths(value, "rerank model")

    @field_validator("ptuning", mode="before")
    @classmethod
    def _parse_ptuning(cls, value: object) -> dict[str, str]:
        return parse_name_paths(value, "P-Tuning v2 checkpoint")

    @field_validator("lora", mode="before")
    @classmethod
    def _parse_lora(cls, value: object) -> dict[str, str]:
        return parse_name_paths(value, "LoRA adapter")

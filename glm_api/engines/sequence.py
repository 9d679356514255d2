"""A sequence's place in the KV cache: every token it knows and the blocks that hold them.

Torch-free plain data (nano-vllm's ``Sequence``, vLLM's ``Request`` bookkeeping): the
:mod:`scheduler` and the :mod:`kv_cache_manager` read and change it under the engine's lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from glm_api.engines.pinned_prefix import PinnedPrefix


@dataclass(eq=False)
class Sequence:
    token_ids: list[int]  # the prompt, then the output so far
    block_table: list[int] = field(default_factory=list)  # its blocks of the pool, in order
    num_computed_tokens: int = 0  # tokens whose keys/values are in the pool
    num_hashed_blocks: int = 0  # leading blocks in the prefix cache (full, digested)
    last_digest: bytes | None = None  # digest of the last of those: the parent of the next block
    num_cached_tokens: int | None = None  # prompt tokens found in the pool at first admission
    # Its prompt's log-probabilities are wanted and not all taken yet: it takes nothing from the
    # prefix cache (those positions are computed) and every position it computes returns logits.
    scores_prompt: bool = False
    # Keys/values attended before its own (a P-Tuning v2 prefix pinned in the pool), and the
    # root of its prefix-cache digest chain (None: the base model's): rows whose KV differ for
    # the same tokens never share cached blocks.
    prefix: PinnedPrefix | None = None
    cache_salt: bytes | None = None
    adapter: str | None = None  # the LoRA adapter its tokens are computed with (None: the base model)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

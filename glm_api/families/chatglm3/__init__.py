"""Native ChatGLM3 support: THUDM checkpoints served by transformers' ``GlmForCausalLM``.

The tokenizer, template and tool parsing import without torch; the loader (which needs
torch and transformers) is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from glm_api.families.chatglm3.template import ChatGLM3Template
from glm_api.families.chatglm3.tokenizer import ChatGLM3Tokenizer
from glm_api.families.chatglm3.tools import format_seed_function_call, parse_tool_call

if TYPE_CHECKING:
    from glm_api.families.chatglm3.checkpoint import is_chatglm3_folder, load_chatglm3

__all__ = [
    "ChatGLM3Template",
    "ChatGLM3Tokenizer",
    "format_seed_function_call",
    "is_chatglm3_folder",
    "load_chatglm3",
    "parse_tool_call",
]


def __getattr__(name: str) -> Any:
    if name in ("is_chatglm3_folder", "load_chatglm3"):
        from glm_api.families.chatglm3 import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""GLM-4-9B-chat as THUDM publishes it: ChatGLM3's weight layout (loaded by
:mod:`glm_api.families.chatglm3.checkpoint`) with GLM-4's own tiktoken tokenizer, chat
format and tool-call syntax. Imports without torch."""

from __future__ import annotations

from pathlib import Path

from glm_api.families.glm4_chat.template import Glm4ChatTemplate
from glm_api.families.glm4_chat.tokenizer import Glm4Tokenizer, is_tiktoken_file
from glm_api.families.json_file import read_json

__all__ = ["Glm4ChatTemplate", "Glm4Tokenizer", "is_glm4_tokenizer", "load_glm4_template"]


def is_glm4_tokenizer(folder: Path) -> bool:
    """Whether a ChatGLM-layout folder holds GLM-4's tokenizer (``ChatGLM4Tokenizer`` in its
    tokenizer_config.json, or a tiktoken ``tokenizer.model``) rather than ChatGLM3's."""
    try:
        tokenizer_config = read_json(folder / "tokenizer_config.json", "tokenizer config")
    except ValueError:
        tokenizer_config = {}
    if isinstance(tokenizer_config, dict) and "ChatGLM4" in str(tokenizer_config.get("tokenizer_class", "")):
        return True
    return is_tiktoken_file(folder / "tokenizer.model")


def load_glm4_template(folder: Path) -> Glm4ChatTemplate:
    """GLM-4's template over the folder's ``tokenizer.model``; ValueError for what it cannot serve."""
    config = read_json(folder / "config.json", "config")
    if isinstance(config, dict) and "vision_config" in config:
        raise ValueError(
            f"{folder}: GLM-4V (vision) checkpoints are not supported: only text models of the ChatGLM layout"
        )
    return Glm4ChatTemplate(Glm4Tokenizer(folder / "tokenizer.model"))

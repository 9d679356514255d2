"""The one reader of a model folder's JSON files (config, tokenizer config, weight index, modules)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: Path, what: str) -> Any:
    """``path`` parsed, or a ValueError naming ``what`` it should have held and why it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: {what} is not readable JSON ({exc})") from exc

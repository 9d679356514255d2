"""GLM-4-9B-chat's tokenizer: a tiktoken byte-level BPE followed by GLM-4's special tokens.

``tokenizer.model`` is not sentencepiece here but a tiktoken rank file: one ``base64(token)
rank`` line per BPE token. The special tokens get the ids right after the last rank, in a fixed
order (THUDM's ``ChatGLM4Tokenizer``), and plain ``encode`` never produces them: role markers a
user types stay text.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

import tiktoken

#: GLM-4's pre-tokenizer split (cl100k's, except that letters may follow one non-newline mark).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: In this order, with ids n, n+1, ... after the n BPE ranks.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet (byte -> printable character): how BPE tokens are spelled
    as strings, as transformers spells glm-4-9b-chat-hf's same tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def is_tiktoken_file(path: Path) -> bool:
    """Whether ``path`` starts like a tiktoken rank file (ChatGLM3's is a sentencepiece protobuf)."""
    try:
        with path.open("rb") as f:
            head = f.read(256)
    except OSError:
        return False
    parts = head.split(b"\n", 1)[0].split()
    if len(parts) != 2 or not parts[1].isdigit():
        return False
    try:
        base64.b64decode(parts[0], validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def read_ranks(path: Path) -> dict[bytes, int]:
    """The BPE ranks of a tiktoken file; ValueError naming the file and what is wrong."""
    ranks: dict[bytes, int] = {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the tokenizer ({exc})") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected 'base64-token rank'")
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"{path}: line {number} is not a tiktoken rank line ({exc})") from None
        if token in ranks:
            raise ValueError(f"{path}: line {number} repeats a token")
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        # The special tokens take the ids after the last rank: gaps or repeats would clash.
        raise ValueError(f"{path}: ranks must be 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path}: {len(missing)} single bytes have no token (e.g. {missing[0]}): not a byte-level BPE")
    return ranks


class Glm4Tokenizer:
    """tiktoken encode/decode plus GLM-4's special ids."""

    def __init__(self, model_file: str | Path) -> None:
        path = Path(model_file)
        if not path.is_file():
            raise ValueError(f"{path}: tokenizer file not found (GLM-4 needs its tiktoken tokenizer.model)")
        ranks = read_ranks(path)
        self.source = path
        self.bpe_size = len(ranks)
        self.special_ids: dict[str, int] = {tok: self.bpe_size + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._special_by_id: dict[int, str] = {i: tok for tok, i in self.special_ids.items()}
        self._encoding = tiktoken.Encoding(
            name=f"glm4:{path}", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=self.special_ids
        )
        self.eos_id: int = self.special_ids["<|endoftext|>"]
        self.pad_id: int = self.eos_id  # glm-4-9b-chat's config pads with <|endoftext|>
        self._alphabet = _byte_level_alphabet()

    @property
    def vocab_size(self) -> int:
        """BPE tokens plus special tokens (the model's embedding may be padded beyond this)."""
        return self.bpe_size + len(SPECIAL_TOKENS)

    @property
    def prefix_ids(self) -> list[int]:
        """``[gMASK] <sop>``: what starts every prompt (THUDM's tokenizer's default framing)."""
        return [self.special_ids["[gMASK]"], self.special_ids["<sop>"]]

    def special_id(self, token: str) -> int:
        return self.special_ids[token]

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_by_id

    def encode(self, text: str) -> list[int]:
        """BPE ids of the text; special tokens' text is encoded as the characters it is."""
        return self._encoding.encode_ordinary(text)

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes of a BPE token; None for special tokens and ids past the vocabulary."""
        if 0 <= token_id < self.bpe_size:
            return self._encoding.decode_single_token_bytes(token_id)
        return None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ids. Special tokens are left out (or named, without ``skip_special_tokens``);
        ids past the vocabulary (the embedding's padding rows) are dropped. Bytes that do not
        make a whole character become U+FFFD, as THUDM's decode gives them."""
        text: list[str] = []
        run: list[int] = []
        for token_id in map(int, ids):
            if 0 <= token_id < self.bpe_size:
                run.append(token_id)
                continue
            special = self._special_by_id.get(token_id)
            if special is not None and not skip_special_tokens:
                text.append(self._encoding.decode_bytes(run).decode("utf-8", errors="replace"))
                run = []
                text.append(special)
        text.append(self._encoding.decode_bytes(run).decode("utf-8", errors="replace"))
        return "".join(text)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        """One token string per id: specials by name, BPE tokens in GPT-2's byte-level spelling,
        "" for ids outside the tokenizer (padding rows of the embedding)."""
        tokens: list[str] = []
        for token_id in map(int, ids):
            raw = self.token_bytes(token_id)
            if raw is not None:
                tokens.append("".join(self._alphabet[b] for b in raw))
            else:
                tokens.append(self._special_by_id.get(token_id, ""))
        return tokens

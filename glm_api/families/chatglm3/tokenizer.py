"""ChatGLM3's tokenizer: a sentencepiece model followed by nine special tokens.

The special tokens are not sentencepiece pieces: they get the ids right after the last
piece, in a fixed order, and plain ``encode`` can never produce them. That is what keeps
role markers typed by a user as text (THUDM's ``SPTokenizer`` does the same).
"""

from __future__ import annotations

from pathlib import Path

from sentencepiece import SentencePieceProcessor

#: In this order, with ids n, n+1, ... after the n sentencepiece pieces.
SPECIAL_TOKENS: tuple[str, ...] = (
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "sop",
    "eop",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)


class ChatGLM3Tokenizer:
    """Sentencepiece encode/decode plus ChatGLM3's special ids."""

    def __init__(self, model_file: str | Path) -> None:
        path = Path(model_file)
        if not path.is_file():
            raise ValueError(f"{path}: tokenizer file not found (ChatGLM3 needs its sentencepiece tokenizer.model)")
        try:
            self.sp = SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as exc:
            raise ValueError(f"{path}: not a sentencepiece model ({exc})") from exc
        self.source = path
        self.sp_size: int = self.sp.vocab_size()
        self.special_ids: dict[str, int] = {tok: self.sp_size + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._special_by_id: dict[int, str] = {i: tok for tok, i in self.special_ids.items()}
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        # ChatGLM3 has no pad piece: it pads with unk (id 0 in the real model).
        self.unk_id: int = self.sp.unk_id()
        self.pad_id: int = self.unk_id

    @property
    def vocab_size(self) -> int:
        """Pieces plus special tokens (the model's embedding may be padded beyond this)."""
        return self.sp_size + len(SPECIAL_TOKENS)

    @property
    def prefix_ids(self) -> list[int]:
        """``[gMASK] sop``: what THUDM's tokenizer puts before every text it encodes by default,
        and what starts every prompt."""
        return [self.special_ids["[gMASK]"], self.special_ids["sop"]]

    def special_id(self, token: str) -> int:
        return self.special_ids[token]

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_by_id

    def encode(self, text: str) -> list[int]:
        """Plain sentencepiece ids: starts with the dummy-prefix piece, never a special id."""
        return self.sp.encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of ids. Specials render as their names (as THUDM's decode does) unless skipped;
        eos and ids past the vocabulary (the embedding's padding rows) are dropped."""
        text: list[str] = []
        run: list[int] = []
        for token_id in ids:
            token_id = int(token_id)
            special = self._special_by_id.get(token_id)
            if special is not None:
                # Each run of pieces is decoded on its own, like THUDM's SPTokenizer.decode:
                # the dummy-prefix space after a special is dropped, as it was added per piece.
                if run:
                    text.append(self.sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    text.append(special)
            elif 0 <= token_id < self.sp_size and token_id != self.eos_id:
                run.append(token_id)
        if run:
            text.append(self.sp.decode(run))
        return "".join(text)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        """One token string per id: specials by name, pieces as sentencepiece spells them,
        "" for ids outside the tokenizer (padding rows of the embedding)."""
        tokens: list[str] = []
        for token_id in ids:
            token_id = int(token_id)
            special = self._special_by_id.get(token_id)
            if special is not None:
                tokens.append(special)
            elif 0 <= token_id < self.sp_size:
                tokens.append(self.sp.id_to_piece(token_id))
            else:
                tokens.append("")
        return tokens

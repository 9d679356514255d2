"""Incremental detokenization with stop strings, for one request.

Decoding each new id alone breaks multi-byte characters and sentencepiece spacing, and
decoding the whole output each step is quadratic. So, as TGI does, we decode a short window
(``prefix_offset:read_offset`` vs ``prefix_offset:``) and append the difference once it no
longer ends in an incomplete character. Text that could be the start of a stop string is held
back until it is clear, so a stop string never reaches the client.
"""

from __future__ import annotations

from collections.abc import Callable

_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()) -> None:
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""  # all output text so far (cut at a stop string once one is seen)
        self._emitted = 0
        self.stopped = False

    def push(self, token_id: int) -> bool:
        """Add one generated id; True when a stop string has now appeared."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(_INCOMPLETE):
            self.text += full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return self._check_stop()
        return False

    def _check_stop(self) -> bool:
        if not self._stop:
            return False
        # Only the new tail can hold a stop string that was not there before.
        start = max(0, self._emitted - max(len(s) for s in self._stop))
        hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
        return self.stopped

    def _flush(self) -> None:
        """At the end, ids still waiting for the rest of a character are text all the same (with
        U+FFFD where bytes are missing), as the whole output decodes: never silently dropped."""
        if self.stopped or self._read_offset >= len(self._ids):
            return
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        if len(full) > len(prefix):
            self.text += full[len(prefix) :]
            self._check_stop()

    def take(self, final: bool = False) -> str:
        """Text not yet handed out that is safe to show now (all of it when ``final``)."""
        if final:
            self._flush()
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._held_back()
        if end <= self._emitted:
            return ""
        out = self.text[self._emitted : end]
        self._emitted = end
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

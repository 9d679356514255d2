"""The incremental detokenizer hands out all of the text by the end, incomplete characters too."""

from __future__ import annotations

from glm_api.engines.detokenizer import IncrementalDetokenizer


def _decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")  # one id per byte, as byte-level vocabularies


def test_a_character_split_over_ids_waits_for_its_last_byte():
    detok = IncrementalDetokenizer(_decode)
    euro = list("€".encode())
    shown = []
    for i in [*b"a", *euro]:
        detok.push(i)
        shown.append(detok.take())
    assert shown == ["a", "", "", "€"]


def test_bytes_that_never_complete_a_character_still_come_out_at_the_end():
    """A random model writing stray continuation bytes: its text is U+FFFD, never dropped."""
    detok = IncrementalDetokenizer(_decode)
    shown = []
    for i in [*b"ok", 0xE2, 0x82, 0xE2]:
        detok.push(i)
        shown.append(detok.take())
    shown.append(detok.take(final=True))
    assert "".join(shown) == _decode([*b"ok", 0xE2, 0x82, 0xE2])
    assert detok.take(final=True) == ""

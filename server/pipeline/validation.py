"""The input rules every request shares, before any text reaches a tokenizer."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import InvalidInput

__all__ = ["check_pairs", "check_texts"]


def check_texts(texts: Sequence[str], max_texts: int, max_chars: int,
                max_total_chars: int | None = None) -> None:
    """The input rules every request shares, with messages that name the offending text.

    `max_total_chars` bounds one message's work: tokenizing runs at about half a million
    characters a second per thread, so 256 texts at the per-text limit would hold a tokenizer
    thread for most of a minute."""
    if not texts:
        raise InvalidInput("texts is empty: send at least one text")
    if len(texts) > max_texts:
        raise InvalidInput(f"{len(texts)} texts in one message, over the limit of {max_texts}")
    for i, text in enumerate(texts):
        if len(text) > max_chars:
            raise InvalidInput(
                f"texts[{i}] has {len(text)} characters, over the limit of {max_chars}"
            )
        if not text or text.isspace():  # what strip() would empty, without a copy
            raise InvalidInput(f"texts[{i}] is empty or only whitespace")
    total = sum(len(text) for text in texts)
    if max_total_chars is not None and total > max_total_chars:
        raise InvalidInput(f"{total} characters in one message, over the limit of "
                           f"{max_total_chars}: split it into several messages")


def check_pairs(texts: Sequence[str], pairs: Sequence[str], max_chars: int,
                max_total_chars: int | None = None) -> None:
    """Second segments: one per text, none empty, within the same character limits as the
    texts (both halves count towards the message's total)."""
    if len(pairs) != len(texts):
        raise InvalidInput(f"{len(pairs)} text_pairs for {len(texts)} texts: send one second "
                           "text per text, or none")
    for i, text in enumerate(pairs):
        if len(text) > max_chars:
            raise InvalidInput(
                f"text_pairs[{i}] has {len(text)} characters, over the limit of {max_chars}")
        if not text or text.isspace():
            raise InvalidInput(f"text_pairs[{i}] is empty or only whitespace")
    total = sum(len(text) for text in texts) + sum(len(text) for text in pairs)
    if max_total_chars is not None and total > max_total_chars:
        raise InvalidInput(f"{total} characters in one message, over the limit of "
                           f"{max_total_chars}: split it into several messages")

"""The text policy for news articles: the title, a newline, then the lead of the body.

Articles run to tens of thousands of characters; a BERT model sees at most 512 tokens, and a
classifier only answers well for texts shaped like the ones its head was trained on. So the
news head of `news-zh` is trained, evaluated and meant to be called on `news_text(title, body)`:
the title (which carries most of the signal) followed by the first `lead_chars` characters of
the body, cut back to the last sentence end when one lies in the second half of that span, so
the model sees whole sentences. It is a character rule on purpose: any caller, in any
language, can reproduce it without a tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

DEFAULT_LEAD_CHARS = 160
TEXT_KEYS = ("text", "sentence", "content")
BODY_KEYS = ("body", "content")
_SENTENCE_END = re.compile(r"[。！？!?；;…]")
_SPACES = re.compile(r"\s+")


def lead(body: str, lead_chars: int = DEFAULT_LEAD_CHARS) -> str:
    """The first `lead_chars` characters of `body` (whitespace runs collapsed), ending at a
    sentence end when one falls in the second half of the span."""
    body = _SPACES.sub(" ", body or "").strip()
    if len(body) <= lead_chars:
        return body
    span = body[:lead_chars]
    ends = [m.end() for m in _SENTENCE_END.finditer(span)]
    if ends and ends[-1] >= lead_chars // 2:
        return span[: ends[-1]]
    return span


def news_text(title: str, body: str = "", lead_chars: int = DEFAULT_LEAD_CHARS) -> str:
    """`title` + newline + lead of `body`; either part may be empty (not both)."""
    title = _SPACES.sub(" ", title or "").strip()
    parts = [part for part in (title, lead(body, lead_chars)) if part]
    return "\n".join(parts)


def record_text(fields: Mapping[str, object], text_keys: Sequence[str] = TEXT_KEYS,
                lead_chars: int = DEFAULT_LEAD_CHARS) -> str | None:
    """The text of one JSON record, the same for head training and bulk feeds: a record with a
    title is `news_text(title, body)`; otherwise its first `text_keys` field holding a string;
    None when it has neither."""
    title = fields.get("title")
    if isinstance(title, str):
        body = next((fields[k] for k in BODY_KEYS if isinstance(fields.get(k), str)), "")
        return news_text(title, str(body), lead_chars)
    return next((str(fields[k]) for k in text_keys if isinstance(fields.get(k), str)), None)

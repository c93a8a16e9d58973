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

DEFAULT_LEAD_CHARS = 160
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

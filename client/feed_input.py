"""The feed's input and resume: records read from the JSONL input (checked whole before
anything is sent), and the ids an earlier run already answered in the output.

An id is compared as canonical JSON (`id_key`), so 1 and "1" are two ids and a resumed output
matches the input whatever its key order."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .feed_options import FeedError, FeedOptions
from .news import record_text

__all__ = ["Item", "check_input", "id_key", "read_items", "resume"]


@dataclass
class Item:
    key: str  # the id as canonical JSON: what exactly-once is about
    id: Any
    text: str
    attempts: int = 0  # failed attempts so far (retry.py counts them)
    solo: bool = False  # send alone: it may be the text that made its message fail


def id_key(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def read_items(options: FeedOptions) -> Iterator[Item]:
    """The input's items, in file order; FeedError names the line of any bad one. A record
    with a "title" is title + lead of "body" by the news policy, exactly as head training
    reads it (news.py `record_text`); otherwise the text field. Without the id field, the id
    is the line number."""
    path, id_field, text_field = options.input, options.id_field, options.text_field
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FeedError(f"{path}:{number}: not JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise FeedError(f"{path}:{number}: not a JSON object")
            item_id = record.get(id_field, number)
            if isinstance(item_id, (dict, list)) or item_id is None:
                raise FeedError(f"{path}:{number}: id must be a string or a number")
            text = record_text(record, (text_field,))
            if text is None:
                raise FeedError(f"{path}:{number}: no {text_field!r} string "
                                "(nor a title, with an optional body)")
            yield Item(id_key(item_id), item_id, text)


def check_input(options: FeedOptions, done: set[str]) -> tuple[int, int]:
    """Read the whole input once before sending: every line valid, every id unique.
    Returns (items, items not yet answered)."""
    seen: dict[str, int] = {}
    for count, item in enumerate(read_items(options), 1):
        if item.key in seen:
            raise FeedError(f"{options.input}: id {item.key} appears twice "
                            f"(items {seen[item.key]} and {count})")
        seen[item.key] = count
    return len(seen), len(seen.keys() - done)


def resume(path: Path) -> set[str]:
    """Ids already answered in `path`. A last line cut off mid-write (no newline) is truncated
    away; blank lines are skipped; any other line that is not an answer stops the feed, so a
    damaged output is never silently half-redone."""
    done: set[str] = set()
    if not path.exists():
        return done
    end = 0
    with path.open("rb+") as f:
        for number, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                f.truncate(end)
                break
            end += len(raw)
            if not raw.strip():
                continue
            try:
                done.add(id_key(json.loads(raw)["id"]))
            except (ValueError, KeyError, TypeError):
                raise FeedError(f"{path}:{number}: not an answer line; fix or delete it, then "
                                "rerun") from None
    return done

"""The feed's output: one JSONL line per id, never two, whatever the servers send.

An answer line is {"id", "embedding" | "labels", "version"}; an error line is {"id", "error":
{"code", "message"}} and is an answer too (delete it to retry it). Lines are flushed batch by
batch, so a crash loses at most a line cut in half, which feed_input.resume removes. The
report's counts, the progress bar and the watchdog's clock move with the lines written."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from .feed_input import Item
from .feed_options import FeedOptions, FeedReport
from .messages import parse_classify, parse_embed

__all__ = ["Output", "progress_bar"]


class Output:
    def __init__(self, file: TextIO, embed: bool, done: set[str], report: FeedReport,
                 bar: Any = None) -> None:
        self._file = file
        self._embed = embed
        self._done = done  # ids answered, by this run or an earlier one
        self._report = report
        self._bar = bar
        self._last_write = time.monotonic()

    def idle_s(self) -> float:
        """Seconds since the last line was written (the start, before the first)."""
        return time.monotonic() - self._last_write

    def answers(self, items: list[Item], response: Any) -> None:
        """One line per item from a message's response (EmbedResponse or ClassifyResponse)."""
        if self._embed:
            for item, vector in zip(items, parse_embed(response), strict=True):
                self._write(item, {"embedding": vector.tolist(), "version": response.version})
        else:
            for item, labels in zip(items, parse_classify(response), strict=True):
                self._write(item, {"labels": [{"label": x.label, "index": x.index,
                                               "probability": x.probability} for x in labels],
                                   "version": response.version})
        self.flush()

    def error(self, item: Item, code: str, message: str) -> None:
        """An error line: the id's answer is this failure (flush after the batch)."""
        self._write(item, {"error": {"code": code, "message": message}})

    def flush(self) -> None:
        self._file.flush()

    def _write(self, item: Item, line: dict[str, Any]) -> None:
        if item.key in self._done:  # answered before (an earlier stream or run): drop it
            self._report.duplicates_dropped += 1
            return
        self._done.add(item.key)
        self._file.write(json.dumps({"id": item.id, **line}, ensure_ascii=False) + "\n")
        self._report.answered += 1
        self._report.errors += "error" in line
        self._last_write = time.monotonic()
        if self._bar is not None:
            self._bar.update(1)


def progress_bar(options: FeedOptions, total: int, initial: int) -> Any:
    """tqdm on stderr (stdout carries the JSON summary); None without --progress."""
    if not options.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="item", desc=options.task,
                file=sys.stderr, dynamic_ncols=True, smoothing=0.1)

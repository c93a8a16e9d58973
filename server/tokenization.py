"""Text -> token ids with Hugging Face `tokenizers`, from the version's own tokenizer.json.

No silent truncation: a text whose encoding exceeds the model's limit raises InputTooLong
unless the caller asked to truncate, and then the result says by how many tokens. Encoding
runs batched on a worker thread (`tokenizers` releases the GIL), never on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

from .errors import InputTooLong, InvalidInput
from .stages import CLOCK

__all__ = ["Encoded", "TextTokenizer", "check_texts"]


@dataclass(frozen=True)
class Encoded:
    """One text as the model will see it."""

    ids: np.ndarray  # int64 [tokens]
    type_ids: np.ndarray  # int64 [tokens]
    truncated_tokens: int
    encoding: Encoding | None = None  # tokens and offsets, kept only for the Tokenize rpc

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])


class TextTokenizer:
    """The tokenizer of one model version, with its length limit."""

    def __init__(self, path: Path, max_length: int) -> None:
        self.max_length = max_length
        self._truncating = {}
        for side in ("right", "left"):
            tok = self._load(path)
            tok.enable_truncation(max_length, direction=side)
            self._truncating[side] = tok

    @staticmethod
    def _load(path: Path) -> Tokenizer:
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise ValueError(f"{path.name} is not a valid tokenizer: {exc}") from None
        tok.no_truncation()
        tok.no_padding()
        return tok

    def encode(
        self, texts: Sequence[str], truncate: bool, direction: str = "right",
        keep_encoding: bool = False,
    ) -> list[Encoded]:
        """Encode a batch in one pass; raise InputTooLong naming the first text over the limit.

        The truncating tokenizer keeps what it cut in `overflowing` (each piece with its own
        special tokens), so the full length comes from the same pass: texts over the limit
        are not tokenized twice (at 128 tokens, three news texts in four are). Unless the
        caller wants tokens and offsets (`keep_encoding`), `encode_batch_fast` skips the
        offsets and the Encoding objects are freed here, on the tokenizer thread: freeing
        them later on the event loop cost it a quarter of its time at high rates.
        """
        tokenizer = self._truncating[direction]
        encode_batch = tokenizer.encode_batch if keep_encoding else tokenizer.encode_batch_fast
        started = CLOCK.start()
        encodings = encode_batch(list(texts))
        started = CLOCK.stop("tokenize_native", started)
        try:
            return self._encoded(encodings, truncate, keep_encoding)
        finally:
            CLOCK.stop("tokenize_python", started)

    def _encoded(self, encodings: list[Encoding], truncate: bool,
                 keep_encoding: bool) -> list[Encoded]:
        cut = [sum(len(piece.ids) - sum(piece.special_tokens_mask) for piece in enc.overflowing)
               for enc in encodings]
        if not truncate:
            over = next((i for i, n in enumerate(cut) if n), None)
            if over is not None:
                raise InputTooLong(
                    f"texts[{over}] is {len(encodings[over].ids) + cut[over]} tokens, over this "
                    f"model's limit of {self.max_length}; shorten it or set truncate"
                )
        return [
            Encoded(
                ids=np.asarray(enc.ids, dtype=np.int64),
                type_ids=np.asarray(enc.type_ids, dtype=np.int64),
                truncated_tokens=n,
                encoding=enc if keep_encoding else None,
            )
            for enc, n in zip(encodings, cut, strict=True)
        ]

    async def encode_async(
        self, executor: Executor, texts: Sequence[str], truncate: bool, direction: str = "right",
        keep_encoding: bool = False,
    ) -> list[Encoded]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, self.encode, texts, truncate, direction,
                                          keep_encoding)


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
        if not text.strip():
            raise InvalidInput(f"texts[{i}] is empty or only whitespace")
    total = sum(len(text) for text in texts)
    if max_total_chars is not None and total > max_total_chars:
        raise InvalidInput(f"{total} characters in one message, over the limit of "
                           f"{max_total_chars}: split it into several messages")

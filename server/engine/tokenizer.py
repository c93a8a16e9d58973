"""Text -> token ids with Hugging Face `tokenizers`, from the version's own tokenizer.json.

No silent truncation: a text whose encoding exceeds the model's limit raises InputTooLong
unless the caller asked to truncate, and then the result says by how many tokens. Encoding
runs batched on a worker thread (`tokenizers` releases the GIL), never on the event loop.

Pairs (`texts[i]`, `pairs[i]`) go through the tokenizer's own pair template (BERT's
`[CLS] a [SEP] b [SEP]` with type ids 0 then 1, XLM-R's `<s> a </s></s> b </s>`), truncated
by Hugging Face's strategies (`longest_first`, `only_first`, `only_second`) when asked.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

from ..errors import InputTooLong
from ..stages import CLOCK
from .batch import Encoded
from .workers import Workers

__all__ = ["STRATEGIES", "TextTokenizer"]

# Hugging Face's names for how a pair over the limit is cut.
STRATEGIES = ("longest_first", "only_first", "only_second")


class TextTokenizer:
    """The tokenizer of one model version, with its length limit."""

    def __init__(self, path: Path, max_length: int) -> None:
        self.max_length = max_length
        tok = self._load(path)
        # Left truncation gets a tokenizer of its own (truncation is a tokenizer's setting,
        # and several threads encode at once), built on its first use from the JSON kept
        # here: a large vocabulary's tokenizer takes hundreds of MB (e5's: ~280), and most
        # versions never truncate on the left. The JSON, not the file: the folder may be
        # gone by then (a retired version still answering).
        self._json = tok.to_str()
        tok.enable_truncation(max_length, direction="right")
        # Keyed by (direction, pair strategy); the first serves single texts and the
        # default longest_first pairs alike.
        self._truncating = {("right", "longest_first"): tok}
        self._lock = threading.Lock()
        # Special tokens the template adds to each piece ([CLS] x [SEP]: 2); overflowing
        # pieces get them too, so they are not part of what truncation cut.
        self._specials = tok.num_special_tokens_to_add(is_pair=False)
        self._pair_specials = tok.num_special_tokens_to_add(is_pair=True)
        # Single texts get one type id per template piece; BERT's, RoBERTa's and XLM-R's are
        # all 0, and then no type ids need converting at all.
        probe = tok.encode_batch_fast(["a", "今天 b"])
        self._zero_types = all(t == 0 for enc in probe for t in enc.type_ids)
        pair = tok.encode("a", "b")
        self._zero_pair_types = all(t == 0 for t in pair.type_ids)

    def _truncating_on(self, direction: str, strategy: str = "longest_first") -> Tokenizer:
        key = (direction, strategy)
        with self._lock:  # encode runs on several threads
            tok = self._truncating.get(key)
            if tok is None:
                tok = Tokenizer.from_str(self._json)
                tok.enable_truncation(self.max_length, strategy=strategy, direction=direction)
                self._truncating[key] = tok
            return tok

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
        keep_encoding: bool = False, pairs: Sequence[str] | None = None,
        strategy: str = "longest_first",
    ) -> Encoded:
        """Encode a batch in one pass; raise InputTooLong naming the first text over the limit.

        The truncating tokenizer keeps what it cut in `overflowing` (each piece with its own
        special tokens), so the full length comes from the same pass: texts over the limit
        are not tokenized twice (at 128 tokens, three news texts in four are). Unless the
        caller wants tokens and offsets (`keep_encoding`), `encode_batch_fast` skips the
        offsets and the Encoding objects are freed here, on the tokenizer thread: freeing
        them later on the event loop cost it a quarter of its time at high rates.
        """
        if pairs is not None:
            return self._encode_pairs(texts, pairs, truncate, direction, keep_encoding, strategy)
        tokenizer = (self._truncating.get((direction, "longest_first"))
                     or self._truncating_on(direction))
        encode_batch = tokenizer.encode_batch if keep_encoding else tokenizer.encode_batch_fast
        started = CLOCK.start()
        encodings = encode_batch(list(texts))
        started = CLOCK.stop("tokenize_native", started)
        try:
            return self._encoded(encodings, truncate, keep_encoding)
        finally:
            CLOCK.stop("tokenize_python", started)

    def _encode_pairs(
        self, texts: Sequence[str], pairs: Sequence[str], truncate: bool, direction: str,
        keep_encoding: bool, strategy: str,
    ) -> Encoded:
        """Pairs: each half's full length from one pass over the halves as single texts (a
        pair's tokens are its halves' plus the pair template's specials, and pair overflow
        cannot say what was cut), then the pairs through the template, cut by `strategy`
        only where they are over the limit."""
        if len(pairs) != len(texts):
            raise ValueError(f"{len(pairs)} pairs for {len(texts)} texts")
        if strategy not in STRATEGIES:
            raise InputTooLong(f"unknown truncation strategy {strategy!r}; one of {STRATEGIES}")
        single = self._truncating[("right", "longest_first")]
        started = CLOCK.start()
        halves = single.encode_batch_fast([*texts, *pairs])
        full = [len(enc) + sum(len(piece) - self._specials for piece in enc.overflowing)
                - self._specials for enc in halves]
        n = len(texts)
        lengths = [full[i] + full[n + i] + self._pair_specials for i in range(n)]
        over = [i for i, length in enumerate(lengths) if length > self.max_length]
        if over and not truncate:
            i = over[0]
            raise InputTooLong(
                f"pair {i} (texts[{i}] + text_pairs[{i}]) is {lengths[i]} tokens, over this "
                f"model's limit of {self.max_length}; shorten it or set truncate")
        tokenizer = (self._truncating.get((direction, strategy))
                     or self._truncating_on(direction, strategy))
        encode_batch = tokenizer.encode_batch if keep_encoding else tokenizer.encode_batch_fast
        try:
            encodings = encode_batch(list(zip(texts, pairs, strict=True)))
        except Exception as exc:  # tokenizers: a bare Exception when a strategy cannot fit
            i = over[0] if over else 0
            raise InputTooLong(
                f"pair {i} cannot be cut to {self.max_length} tokens by truncation strategy "
                f"{strategy} ({exc}): the half it may not cut is too long on its own; use "
                "longest_first or shorten it") from None
        started = CLOCK.stop("tokenize_native", started)
        try:
            cut = [max(0, full_length - len(enc))
                   for full_length, enc in zip(lengths, encodings, strict=True)]
            return self._pack(encodings, cut, keep_encoding, self._zero_pair_types)
        finally:
            CLOCK.stop("tokenize_python", started)

    def _encoded(self, encodings: list[Encoding], truncate: bool,
                 keep_encoding: bool) -> Encoded:
        specials = self._specials
        cut = [sum(len(piece) for piece in enc.overflowing) - specials * len(enc.overflowing)
               if enc.overflowing else 0 for enc in encodings]
        if not truncate:
            over = next((i for i, n in enumerate(cut) if n), None)
            if over is not None:
                raise InputTooLong(
                    f"texts[{over}] is {len(encodings[over]) + cut[over]} tokens, over this "
                    f"model's limit of {self.max_length}; shorten it or set truncate"
                )
        return self._pack(encodings, cut, keep_encoding, self._zero_types)

    @staticmethod
    def _pack(encodings: list[Encoding], cut: list[int], keep_encoding: bool,
              zero_types: bool) -> Encoded:
        lengths = [len(enc) for enc in encodings]
        starts = list(itertools.accumulate(lengths, initial=0))[:-1]
        # One list, one array: a numpy conversion per text cost more than the ids themselves.
        ids = np.array(list(itertools.chain.from_iterable(enc.ids for enc in encodings)),
                       dtype=np.int64)
        type_ids = None if zero_types else np.array(
            list(itertools.chain.from_iterable(enc.type_ids for enc in encodings)),
            dtype=np.int64)
        return Encoded(ids, lengths, starts, cut, type_ids,
                       encodings if keep_encoding else None)

    async def encode_async(
        self, workers: Workers, texts: Sequence[str], truncate: bool, direction: str = "right",
        keep_encoding: bool = False, pairs: Sequence[str] | None = None,
        strategy: str = "longest_first",
    ) -> Encoded:
        return await workers.run(self.encode, texts, truncate, direction, keep_encoding,
                                 pairs, strategy)


"""Text -> token ids with Hugging Face `tokenizers`, from the version's own tokenizer.json.

No silent truncation: a text whose encoding exceeds the model's limit raises InputTooLong
unless the caller asked to truncate, and then the result says by how many tokens. Encoding
runs batched on a worker thread (`tokenizers` releases the GIL), never on the event loop.
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

__all__ = ["TextTokenizer"]


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
        self._truncating = {"right": tok}
        self._lock = threading.Lock()
        # Special tokens the template adds to each piece ([CLS] x [SEP]: 2); overflowing
        # pieces get them too, so they are not part of what truncation cut.
        self._specials = tok.num_special_tokens_to_add(is_pair=False)
        # Single texts get one type id per template piece; BERT's, RoBERTa's and XLM-R's are
        # all 0, and then no type ids need converting at all.
        probe = tok.encode_batch_fast(["a", "今天 b"])
        self._zero_types = all(t == 0 for enc in probe for t in enc.type_ids)

    def _truncating_on(self, direction: str) -> Tokenizer:
        with self._lock:  # encode runs on several threads
            tok = self._truncating.get(direction)
            if tok is None:
                tok = Tokenizer.from_str(self._json)
                tok.enable_truncation(self.max_length, direction=direction)
                self._truncating[direction] = tok
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
        keep_encoding: bool = False,
    ) -> Encoded:
        """Encode a batch in one pass; raise InputTooLong naming the first text over the limit.

        The truncating tokenizer keeps what it cut in `overflowing` (each piece with its own
        special tokens), so the full length comes from the same pass: texts over the limit
        are not tokenized twice (at 128 tokens, three news texts in four are). Unless the
        caller wants tokens and offsets (`keep_encoding`), `encode_batch_fast` skips the
        offsets and the Encoding objects are freed here, on the tokenizer thread: freeing
        them later on the event loop cost it a quarter of its time at high rates.
        """
        tokenizer = self._truncating.get(direction) or self._truncating_on(direction)
        encode_batch = tokenizer.encode_batch if keep_encoding else tokenizer.encode_batch_fast
        started = CLOCK.start()
        encodings = encode_batch(list(texts))
        started = CLOCK.stop("tokenize_native", started)
        try:
            return self._encoded(encodings, truncate, keep_encoding)
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
        lengths = [len(enc) for enc in encodings]
        starts = list(itertools.accumulate(lengths, initial=0))[:-1]
        # One list, one array: a numpy conversion per text cost more than the ids themselves.
        ids = np.array(list(itertools.chain.from_iterable(enc.ids for enc in encodings)),
                       dtype=np.int64)
        type_ids = None if self._zero_types else np.array(
            list(itertools.chain.from_iterable(enc.type_ids for enc in encodings)),
            dtype=np.int64)
        return Encoded(ids, lengths, starts, cut, type_ids,
                       encodings if keep_encoding else None)

    async def encode_async(
        self, workers: Workers, texts: Sequence[str], truncate: bool, direction: str = "right",
        keep_encoding: bool = False,
    ) -> Encoded:
        return await workers.run(self.encode, texts, truncate, direction, keep_encoding)


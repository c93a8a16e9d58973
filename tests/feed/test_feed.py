"""Bulk feeds through the real CLI and real server processes: exactly once, through replica
failures, client crashes and bad items."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from feedlib import (
    feed_command,
    news_items,
    read_jsonl,
    run_feed_cli,
    texts_answered,
    write_jsonl,
)

if TYPE_CHECKING:
    from conftest import ServerProcess

FEED_ITEMS = 20_000


def _line_count(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as f:
        return sum(1 for _ in f)


def _wait_lines(path: Path, count: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = _line_count(path)
        if lines >= count or proc.poll() is not None:
            return lines
        time.sleep(0.05)
    raise AssertionError(f"{path} stayed under {count} lines for {timeout} s")


def _vectors(path: Path) -> dict[str, np.ndarray]:
    return {r["id"]: np.asarray(r["embedding"], np.float32) for r in read_jsonl(path)}


def _assert_exactly_once(path: Path, items: list[dict[str, object]]) -> list[dict[str, object]]:
    lines = read_jsonl(path)
    ids = [line["id"] for line in lines]
    assert len(ids) == len(items), f"{len(ids)} lines for {len(items)} items"
    assert len(set(ids)) == len(ids), "an id was answered twice"
    assert set(ids) == {item["id"] for item in items}
    return lines


@pytest.fixture(scope="module")
def news_feed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, object]]]:
    items = news_items(FEED_ITEMS)
    path = tmp_path_factory.mktemp("feed") / "news.jsonl"
    return write_jsonl(path, items), items


def test_feed_through_three_replicas_with_one_killed(
    model_repository: Path, start_server: Callable[..., ServerProcess],
    news_feed: tuple[Path, list[dict[str, object]]], tmp_path: Path,
) -> None:
    """20,000 news items over 3 replicas; one is killed (SIGKILL) mid-feed and restarted on
    its port. Every id comes back once, equal to what a single healthy server returns, and the
    two survivors answered while the third was down."""
    input_path, items = news_feed
    replicas = [start_server(model_repository, "--metrics-port", "0") for _ in range(3)]
    servers = ",".join(r.address for r in replicas)
    output = tmp_path / "out.jsonl"
    start = time.perf_counter()
    feed = subprocess.Popen(feed_command("embed", servers, input_path, output),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_lines(output, 4000, feed)
        victim, survivors = replicas[1], [replicas[0], replicas[2]]
        victim.proc.kill()
        victim.proc.wait(10)
        before = sum(texts_answered(s.lines) for s in survivors)
        killed_at = _line_count(output)
        reached = _wait_lines(output, killed_at + 3000, feed)
        after = sum(texts_answered(s.lines) for s in survivors)
        assert reached >= killed_at + 3000, "the feed stalled while a replica was down"
        # Answers the victim sent just before it died may still be written after killed_at:
        # at most one window of its streams (4 messages of 32 texts each).
        in_flight = 4 * 4 * 32
        assert after - before >= reached - killed_at - in_flight, "the survivors took no load"
        port = victim.address.rsplit(":", 1)[1]
        restarted = start_server(model_repository, "--port", port, "--metrics-port", "0")
        stdout, stderr = feed.communicate(timeout=300)
    finally:
        if feed.poll() is None:
            feed.kill()
    seconds = time.perf_counter() - start
    assert feed.returncode == 0, stderr
    report = json.loads(stdout)
    assert report["answered"] == FEED_ITEMS and report["errors"] == 0
    _assert_exactly_once(output, items)
    rejoined = texts_answered(restarted.lines)

    # The same feed through one healthy replica: the reference, and the no-failure speed.
    reference = tmp_path / "reference.jsonl"
    code, ref_report, stderr = run_feed_cli(*feed_command("embed", replicas[0].address,
                                                          input_path, reference))
    assert code == 0, stderr
    got, want = _vectors(output), _vectors(reference)
    assert got.keys() == want.keys()
    worst = max(float(np.abs(got[k] - want[k]).max()) for k in want)
    assert worst < 1e-4, worst
    print(f"\nfeed of {FEED_ITEMS} items over 3 replicas, one killed at line {killed_at}: "
          f"{FEED_ITEMS / seconds:.0f} items/s ({report['stream_retries']} streams reopened, "
          f"{report['duplicates_dropped']} duplicate answers dropped, restarted replica "
          f"answered {rejoined:.0f} texts); one healthy replica: "
          f"{ref_report['items_per_s']} items/s; max |diff| {worst:.2e}")


def test_feed_resumes_after_the_client_is_killed(
    server_address: str, news_feed: tuple[Path, list[dict[str, object]]], tmp_path: Path,
) -> None:
    """kill -9 of the client mid-feed, plus a last line cut in half: the rerun skips what
    was answered, drops the partial line, and ends with every id once."""
    _, all_items = news_feed
    items = all_items[:6000]
    input_path = write_jsonl(tmp_path / "in.jsonl", items)
    output = tmp_path / "out.jsonl"
    first = subprocess.Popen(feed_command("embed", server_address, input_path, output,
                                          "--batch-size", "16"))
    lines = _wait_lines(output, 1500, first)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert lines < len(items), "the first run finished before it could be killed"
    with output.open("a", encoding="utf-8") as f:
        f.write('{"id": "n0000')  # a write cut off by the crash
    kept = output.read_bytes().rsplit(b"\n", 1)[0]
    code, report, stderr = run_feed_cli(*feed_command("embed", server_address, input_path,
                                                      output))
    assert code == 0, stderr
    assert report["already_done"] == kept.count(b"\n") + 1
    assert report["already_done"] + report["answered"] == len(items)
    _assert_exactly_once(output, items)
    assert output.read_bytes().startswith(kept)  # answers of the first run are untouched
    # A third run has nothing left to do.
    code, report, _ = run_feed_cli(*feed_command("embed", server_address, input_path, output))
    assert code == 0 and report["answered"] == 0 and report["already_done"] == len(items)


def test_feed_records_bad_items_and_goes_on(server_address: str, tmp_path: Path) -> None:
    """A text over the model's limit gets an error line for its id alone; classify feeds
    write ranked labels; title/body records use the news policy."""
    items: list[dict[str, object]] = [{"id": i, "text": f"第{i}条新闻：股市今日小幅上涨"}
                                      for i in range(40)]
    items[17] = {"id": 17, "text": "长" * 500}
    items[30] = {"id": 30, "title": "央行宣布降准", "body": "市场普遍预期流动性将更加充裕。"}
    input_path = write_jsonl(tmp_path / "in.jsonl", items)
    output = tmp_path / "embed.jsonl"
    code, report, stderr = run_feed_cli(*feed_command("embed", server_address, input_path,
                                                      output, "--model", "tiny-embed"))
    assert code == 0, stderr
    assert report["answered"] == 40 and report["errors"] == 1
    lines = {line["id"]: line for line in _assert_exactly_once(output, items)}
    assert lines[17]["error"]["code"] == "INVALID_ARGUMENT"
    assert "token" in lines[17]["error"]["message"]
    assert all(len(lines[i]["embedding"]) == 64 for i in lines if i != 17)

    output = tmp_path / "classify.jsonl"
    code, report, stderr = run_feed_cli(*feed_command(
        "classify", server_address, input_path, output, "--model", "tiny-news", "--truncate",
        "--top-k", "2"))
    assert code == 0, stderr
    assert report["errors"] == 0
    for line in _assert_exactly_once(output, items):
        labels = line["labels"]
        assert len(labels) == 2 and labels[0]["probability"] >= labels[1]["probability"]
        assert {label["label"] for label in labels} <= {"positive", "neutral", "negative"}


@pytest.mark.parametrize(("lines", "message"), [
    (['{"id": 1, "text": "一"}', '{"id": 1, "text": "二"}'], "id 1 appears twice"),
    (['{"id": 1, "text": "一"}', "not json"], "in.jsonl:2: not JSON"),
    (['{"id": 1, "txt": "一"}'], "no 'text' string"),
    (['{"id": [1], "text": "一"}'], "id must be a string or a number"),
])
def test_feed_refuses_a_bad_input_file_before_sending(
    server_address: str, tmp_path: Path, lines: list[str], message: str,
) -> None:
    input_path = tmp_path / "in.jsonl"
    input_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    output = tmp_path / "out.jsonl"
    code, _, stderr = run_feed_cli(*feed_command("embed", server_address, input_path, output))
    assert code == 1
    assert message in json.loads(stderr)["error"]["message"]
    assert not output.exists() or output.stat().st_size == 0


def test_feed_stops_cleanly_on_a_fatal_answer(server_address: str, tmp_path: Path) -> None:
    input_path = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "text": "一"}])
    code, _, stderr = run_feed_cli(*feed_command("embed", server_address, input_path,
                                                 tmp_path / "out.jsonl", "--model", "nope"))
    assert code == 1
    error = json.loads(stderr)["error"]
    assert "NOT_FOUND" in error["message"] and "Traceback" not in stderr


def test_feed_gives_up_when_no_server_answers(tmp_path: Path) -> None:
    """Nothing listens: the feed waits for a replica, then stops with a clear message."""
    input_path = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "text": "一"}])
    start = time.monotonic()
    code, _, stderr = run_feed_cli(*feed_command("embed", "127.0.0.1:9", input_path,
                                                 tmp_path / "out.jsonl", "--give-up-after", "2"),
                                   timeout=60)
    assert code == 1 and "rerun to resume" in json.loads(stderr)["error"]["message"]
    assert time.monotonic() - start < 30


@pytest.fixture(scope="module")
def server_address(model_repository: Path,
                   start_server: Callable[..., ServerProcess]) -> Iterator[str]:
    proc = start_server(model_repository)
    yield proc.address
    assert proc.stop() == 0
    assert "Traceback" not in "".join(proc.lines), "".join(proc.lines[-40:])



def test_feed_goes_on_across_connection_ageing(
    model_repository: Path, start_server: Callable[..., ServerProcess],
    news_feed: tuple[Path, list[dict[str, object]]], tmp_path: Path,
) -> None:
    """A server that ages connections after 3 s (plus 1 s of grace) cuts the feed's streams
    again and again (server/api/grpc_connections.py); the client reconnects and resumes, and
    every id comes back once. (The fake device's 40 ms a batch measures ~57 ms on a loaded
    machine, over the default max_batch_duration of 50 ms: stream batches were then cut to
    one text, and the feed could not finish a message within a connection's life. A flat
    cost no longer cuts batches: costmodel.longest_batch.)"""
    _, all_items = news_feed
    items = all_items[:6000]
    input_path = write_jsonl(tmp_path / "in.jsonl", items)
    output = tmp_path / "out.jsonl"
    server = start_server(model_repository, "--grpc-max-connection-age", "3",
                          "--grpc-max-connection-age-grace", "1",
                          "--fake-device", "custom,a_ms=40,b_us=0")
    started = time.perf_counter()
    code, report, stderr = run_feed_cli(*feed_command("embed", server.address, input_path,
                                                      output, "--batch-size", "16"))
    seconds = time.perf_counter() - started
    assert code == 0, stderr
    assert report["answered"] == len(items) and report["errors"] == 0, report
    _assert_exactly_once(output, items)
    assert seconds > 5, "the feed ended before a connection could age; slow the fake device"
    assert report["stream_retries"] >= 1, report  # a stream was cut, and resumed
    assert server.stop() == 0

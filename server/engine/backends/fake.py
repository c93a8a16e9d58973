"""A fake accelerator for benchmarks: GPU timing on a machine with no GPU.

A batch "computes" by sleeping (no GIL held, no CPU used, as a CUDA kernel would) for
`a + b x padded_tokens` seconds, the cost model of a named profile fitted to real runs on a
card, and returns outputs with the graph's names, widths and dtypes. One device per process
runs one batch at a time, as one CUDA stream does; a pool keeps `slots` batches in flight so
the next one is padded and waiting while the device runs (what IO binding's two slots per
session do on a real card).

The outputs are a deterministic function of each row's real tokens, never of its batch, so
tests can check that every caller gets its own rows back whatever it was batched with.

Only benchmarks and tests use it (`bertstream-server --fake-device SPEC`, a hidden flag).
SPEC is a profile name with optional overrides: `h100-bert-base-fp16`,
`h100-bert-base-fp16,speed=0.25` (a quarter as fast), `custom,a_ms=1,b_us=0.1,slots=3`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ...stages import CLOCK
from ...version_format import PROBABILITIES
from .. import costmodel
from ..batch import Batch

__all__ = ["PROFILES", "FakeDevicePool", "Profile", "fit", "parse_spec"]


@dataclass(frozen=True)
class Point:
    """One measured batch shape on a real card: `batch` texts of `tokens` padded tokens at
    `texts_per_s`."""

    batch: int
    tokens: int
    texts_per_s: float

    @property
    def seconds(self) -> float:
        return self.batch / self.texts_per_s

    @property
    def padded_tokens(self) -> int:
        return self.batch * self.tokens


def fit(points: Sequence[Point]) -> tuple[float, float]:
    """(a, b) of `seconds = a + b x padded_tokens` (costmodel.fit: the form every engine's
    measured cost model takes too)."""
    return costmodel.fit([costmodel.Point(p.batch, p.tokens, p.seconds) for p in points])


@dataclass(frozen=True)
class Profile:
    name: str
    source: str  # where the points were measured
    points: tuple[Point, ...] = ()
    a_s: float = 0.0  # fixed cost per batch (launches, copies, sync)
    b_s: float = 0.0  # cost per padded token
    slots: int = 2  # batches in flight per instance
    speed: float = 1.0  # multiplies throughput (0.25: four times slower)

    @classmethod
    def fitted(cls, name: str, source: str, points: Sequence[Point]) -> Profile:
        a, b = fit(points)
        return cls(name, source, tuple(points), a, b)

    def seconds(self, padded_tokens: int) -> float:
        return (self.a_s + self.b_s * padded_tokens) / self.speed

    def capacity(self, batch: int, tokens: int) -> float:
        """Texts per second the device sustains at this batch shape."""
        return batch / self.seconds(batch * tokens)


# The project's H100 reference run (2026-11-25): onnxruntime-gpu 1.31.1, fused fp16, IO binding
# (batch x 128 tokens at 10,919 and 11,034 /s; x 64 at 24,486; x 32 at 51,595), and plain
# session.run on one 32-token text (394 /s).
_H100_BERT_BASE = (Point(128, 128, 10_919), Point(256, 128, 11_034), Point(256, 64, 24_486),
                   Point(512, 32, 51_595), Point(1, 32, 394))
# The e5-small shape (12 x 384) on the same card; single text: the same kernel launches as
# BERT-base, so the same 32-token point.
_H100_E5_SMALL = (Point(128, 128, 18_114), Point(256, 64, 44_426), Point(512, 32, 100_742),
                  Point(1, 32, 394))
# benchmarks/results/20261126-h200-bert-base-fp16*.json: raw onnxruntime in arrival order,
# batch 256 at up to 128 tokens, 10,941 to 11,289 /s; one short text (~16 tokens) 2.1 to
# 2.8 ms p50. Those graphs had no fused attention.
_H200_BERT_BASE_UNFUSED = (Point(256, 128, 11_105), Point(1, 16, 1 / 0.0024))

PROFILES: dict[str, Profile] = {
    p.name: p for p in (
        Profile.fitted("h100-bert-base-fp16", "H100 reference run, fused fp16, IO binding",
                       _H100_BERT_BASE),
        Profile.fitted("h100-e5-small-fp16", "H100 reference run, e5-small shape fp16",
                       _H100_E5_SMALL),
        Profile.fitted("h200-bert-base-fp16-unfused",
                       "benchmarks/results/20261126-h200-bert-base-fp16*.json",
                       _H200_BERT_BASE_UNFUSED),
    )
}


def parse_spec(spec: str) -> Profile:
    """`name[,key=value...]` with keys speed, slots, a_ms, b_us; `custom` starts from zero."""
    name, *pairs = [part.strip() for part in spec.split(",")]
    if name == "custom":
        profile = Profile("custom", "command line")
    elif name in PROFILES:
        profile = PROFILES[name]
    else:
        raise ValueError(f"unknown fake device profile {name!r}; known: custom, "
                         f"{', '.join(sorted(PROFILES))}")
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"fake device: {pair!r} is not key=number") from None
        if key == "speed" and number > 0:
            profile = replace(profile, speed=number)
        elif key == "slots" and number >= 1:
            profile = replace(profile, slots=int(number))
        elif key == "a_ms" and number >= 0:
            profile = replace(profile, a_s=number / 1e3)
        elif key == "b_us" and number >= 0:
            profile = replace(profile, b_s=number / 1e6)
        else:
            raise ValueError(f"fake device: bad setting {pair!r} (speed > 0, slots >= 1, "
                             "a_ms >= 0, b_us >= 0)")
    return profile


class _Device:
    """One fake card: a lock makes batches run one at a time; busy time is summed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.busy_s = 0.0

    def run(self, seconds: float) -> None:
        with self.lock:
            start = time.perf_counter()
            time.sleep(seconds)
            self.busy_s += time.perf_counter() - start


_DEVICES: dict[int, _Device] = {}
_DEVICES_LOCK = threading.Lock()


def _device(device_id: int) -> _Device:
    with _DEVICES_LOCK:
        return _DEVICES.setdefault(device_id, _Device())


_TABLE_ROWS = 1021  # prime: rows of the lookup tables that outputs are drawn from


class FakeDevicePool:
    """RuntimePool's interface (run, provider, output_dims, concurrency, busy_seconds) over
    the fake device; the graph is opened only to read its outputs' names, widths and dtypes."""

    provider = "FakeDevice"

    def __init__(self, model_path: Path, profile: Profile, count: int = 1,
                 device_id: int = 0) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(model_path), options,
                                       providers=["CPUExecutionProvider"])
        self.output_dims: dict[str, tuple[int | None, ...]] = {}
        self._tables: dict[str, np.ndarray] = {}
        rng = np.random.default_rng(0)
        for output in session.get_outputs():
            dims = tuple(d if isinstance(d, int) else None for d in output.shape[1:])
            self.output_dims[output.name] = dims
            width = dims[-1] if dims and dims[-1] is not None else 1
            table = rng.standard_normal((_TABLE_ROWS, width)).astype(np.float32)
            if output.name == PROBABILITIES:
                table = np.exp(table) / np.exp(table).sum(axis=1, keepdims=True)
            self._tables[output.name] = table.astype(_DTYPES.get(output.type, np.float32))
        del session
        self.profile = profile
        self.concurrency = max(1, count) * profile.slots
        self._device = _device(device_id)

    def busy_seconds(self) -> float:
        return self._device.busy_s

    def run(self, batch: Batch, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        started = CLOCK.start()
        self._device.run(self.profile.seconds(batch.padded_tokens))
        real = batch.input_ids * batch.attention_mask
        row_keys = (real.sum(axis=1) * 7 + batch.attention_mask.sum(axis=1)) % _TABLE_ROWS
        arrays = {}
        for name in outputs:
            table = self._tables[name]
            if len(self.output_dims[name]) == 2:  # token vectors [batch, seq, width]
                arrays[name] = table[real % _TABLE_ROWS]
            else:
                arrays[name] = table[row_keys]
        CLOCK.stop("device", started)
        return arrays


_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
           "tensor(double)": np.float64}

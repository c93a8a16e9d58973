"""A model version on OpenVINO's CPU plugin: the same `run(Batch, outputs) -> arrays` as
onnxruntime's RuntimePool, so the batcher, the stage clocks, swaps and leases do not change.

Why a second engine: on a CPU the graph is the ceiling, and OpenVINO runs the same model.onnx
faster (this 2-core EPYC, news-zh, batches of 32: 1.18x onnxruntime at f32, 2.13x at bf16,
FACTS.md). bf16 is used only where the processor has it natively (OpenVINO reports BF16 among
its capabilities) and only after a check at load: the check batch through bf16 and f32, every
pooled output at cosine >= 0.999 and the same top label, else the version serves f32 and says
why (log, and GetModel's execution_provider).

Options are Triton's OpenVINO backend `parameters` in config.pbtxt: INFERENCE_PRECISION_HINT
(auto | bf16 | f32; auto: bf16 where native), INFERENCE_NUM_THREADS (default: the cores this
process may use), NUM_STREAMS (infer requests run at once; default 1), PERFORMANCE_HINT
(LATENCY | THROUGHPUT). Synchronous and thread-safe: each concurrent `run` borrows its own
infer request.
"""

from __future__ import annotations

import queue
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...stages import CLOCK
from ...version_format import PROBABILITIES, TOKEN_OUTPUT_PREFIX
from ..batch import Batch
from .base import BusyMeter, usable_cores

__all__ = ["PARAMETERS", "OpenVinoPool", "check_parameters"]

PRECISION = "INFERENCE_PRECISION_HINT"
THREADS = "INFERENCE_NUM_THREADS"
STREAMS = "NUM_STREAMS"
HINT = "PERFORMANCE_HINT"
PARAMETERS = {
    PRECISION: ("auto", "bf16", "f32"),
    THREADS: None,  # a positive integer
    STREAMS: None,
    HINT: ("LATENCY", "THROUGHPUT"),
}
MIN_COSINE = 0.999  # bf16 against f32, every pooled output of the check batch
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def check_parameters(parameters: Mapping[str, str]) -> list[str]:
    """Problems with a config's OpenVINO parameters, in words an operator can act on."""
    problems = []
    for key, value in parameters.items():
        if key not in PARAMETERS:
            problems.append(f"parameter {key!r} is not an OpenVINO option bertstream knows "
                            f"({', '.join(PARAMETERS)})")
        elif PARAMETERS[key] is None:
            if not value.isdigit() or int(value) < 1:
                problems.append(f"parameter {key} must be a positive integer, got {value!r}")
        elif value not in PARAMETERS[key]:  # type: ignore[operator]
            problems.append(f"parameter {key} must be one of {PARAMETERS[key]}, got {value!r}")
    return problems


class OpenVinoPool:
    """RuntimePool's interface (run, provider, output_dims, concurrency, busy_seconds)."""

    def __init__(self, model_path: Path, parameters: Mapping[str, str], threads: int = 0,
                 check: Batch | None = None) -> None:
        import openvino as ov  # only versions that run on OpenVINO need it

        core = ov.Core()
        model = core.read_model(str(model_path))
        streams = int(parameters.get(STREAMS, "1"))
        config: dict[str, Any] = {
            THREADS: int(parameters.get(THREADS, 0)) or threads or usable_cores(),
            STREAMS: streams,
        }
        if HINT in parameters:
            config[HINT] = parameters[HINT]
        wanted = parameters.get(PRECISION, "auto")
        native = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        self.precision, self.note = "f32", ""
        if wanted in ("auto", "bf16") and not native:
            self.note = "this CPU has no native bf16" if wanted == "bf16" else ""
        elif wanted in ("auto", "bf16"):
            self.precision = "bf16"
        expected = None
        if check is not None and self.precision == "bf16":
            # The f32 reference runs and is dropped before bf16 is compiled: two compiled
            # models (weights and run buffers) never live at once, which kept the load's peak
            # memory ~150 MB higher on e5-small.
            expected = _infer(core.compile_model(model, "CPU", {**config, PRECISION: "f32"}),
                              check)
        compiled = core.compile_model(model, "CPU", {**config, PRECISION: self.precision})
        if expected is not None:
            why = _compare(_infer(compiled, check), expected)
            if why:
                del compiled
                compiled = core.compile_model(model, "CPU", {**config, PRECISION: "f32"})
                self.precision, self.note = "f32", f"bf16 failed: {why}"
        self._inputs = _input_names(compiled)
        self.compiled = compiled
        self.output_dims: dict[str, tuple[int | None, ...]] = {}
        for output in compiled.outputs:  # by every name: a graph may alias its outputs
            shape = output.get_partial_shape()
            dims = tuple(d.get_length() if d.is_static else None for d in list(shape)[1:])
            self.output_dims.update(dict.fromkeys(output.get_names(), dims))
        self.concurrency = max(1, streams)
        self._free: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(self.concurrency):
            self._free.put(compiled.create_infer_request())
        self._busy = BusyMeter()

    @property
    def provider(self) -> str:
        """What GetModel reports as the execution provider: engine, precision and why."""
        return f"OpenVINO CPU {self.precision}" + (f" ({self.note})" if self.note else "")

    def busy_seconds(self) -> float:
        return self._busy.seconds()

    def run(self, batch: Batch, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        started = CLOCK.start()
        request = self._free.get()
        self._busy.enter()
        try:
            request.infer(_feeds(batch, self._inputs))
            # Copies: the request's output tensors are reused by its next batch.
            return {name: np.array(request.get_tensor(name).data) for name in outputs}
        finally:
            self._busy.leave()
            self._free.put(request)
            CLOCK.stop("device", started)


def _feeds(batch: Batch, inputs: set[str]) -> dict[str, np.ndarray]:
    arrays = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "token_type_ids": batch.token_type_ids}
    return {name: arrays[name] for name in inputs}


def _input_names(compiled: Any) -> set[str]:
    return {i.get_any_name() for i in compiled.inputs} & set(_INPUTS)


def _infer(compiled: Any, batch: Batch) -> dict[str, np.ndarray]:
    request = compiled.create_infer_request()
    request.infer(_feeds(batch, _input_names(compiled)))
    arrays = {}
    for output in compiled.outputs:
        array = np.array(request.get_tensor(output).data, dtype=np.float32)
        arrays.update(dict.fromkeys(output.get_names(), array))
    return arrays


def _compare(low: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> str:
    """'' when every pooled output agrees at MIN_COSINE and the top labels match; else why."""
    for name, expected in reference.items():
        got = low[name]
        if name == PROBABILITIES:
            if not np.array_equal(got.argmax(axis=1), expected.argmax(axis=1)):
                return "a different top label on the check texts"
            continue
        if name.startswith(TOKEN_OUTPUT_PREFIX):
            continue
        dots = (got * expected).sum(axis=1)
        norms = np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1)
        cosine = float((dots / np.maximum(norms, 1e-12)).min())
        if cosine < MIN_COSINE:
            return f"{name} at cosine {cosine:.5f} to f32 (< {MIN_COSINE})"
    return ""

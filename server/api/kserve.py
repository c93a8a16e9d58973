"""The KServe v2 / Triton gRPC protocol (`inference.GRPCInferenceService`) over the same core.

So tritonclient, Triton's perf_analyzer and other KServe clients can call bertstream unchanged.
Translation only, as in servicer.py: a ModelInferRequest's BYTES tensor "TEXT" (and, for
pairs, a second BYTES tensor "TEXT_PAIR" of the same length) becomes an EmbedQuery or
ClassifyQuery for the shared `Pipeline`; the result goes back as FP32 / BYTES
tensors in `raw_output_contents` (what tritonclient reads by default). Failures map through
`errors.to_status`, as for BertService; in ModelStreamInfer a failed request gets a response
with its `error_message` and the stream goes on. The calls are module functions over these
messages, which the HTTP form of the protocol (http/kserve.py) shares.

Import this module only in the server process: its stubs register `inference.*` in protobuf's
default descriptor pool, as tritonclient's do, and one process cannot hold both.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from bertstream.kserve.v2 import grpc_service_pb2 as pb
from bertstream.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from bertstream.v1.model_config_pb2 import ModelConfig, Pooling, Task

from .. import server_version
from ..errors import (
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Unsupported,
    check_explicit,
)
from ..metrics import Metrics, RequestRecord
from ..pipeline.inference import (
    STRATEGIES,
    ClassifyQuery,
    EmbedQuery,
    Pipeline,
    Result,
    Schedule,
    TextOptions,
    Who,
    check_timeout,
)
from ..repository import folders
from ..repository.models import Models
from ..repository.snapshot import wire_state
from ..repository.versions import ModelVersion, State
from ..version_format import POOLING_NAMES, PROBABILITIES
from .servicer import caller, unary
from .streams import ordered_stream

__all__ = [
    "TEXT_INPUT",
    "TEXT_PAIR_INPUT",
    "KServeServicer",
    "add_to_server",
    "infer",
    "load_model",
    "model_metadata",
    "repository_index",
    "resolve",
    "server_metadata",
    "unload_model",
]

TEXT_INPUT = "TEXT"
TEXT_PAIR_INPUT = "TEXT_PAIR"  # second segments: one per TEXT element
EMBEDDING, LABEL = "embedding", "label"  # and PROBABILITIES: the graph's own output name
# "parameters": the request parameters below; "model_repository": index, load, unload.
EXTENSIONS = ("model_repository", "parameters", "schedule_policy")
_POOLINGS = {name: value for value, name in POOLING_NAMES.items()}
_LENGTH = struct.Struct("<I")
_UNAVAILABLE = wire_state(State.UNAVAILABLE)[1]  # a model-level row


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]

    def metadata(self) -> pb.ModelMetadataResponse.TensorMetadata:
        return pb.ModelMetadataResponse.TensorMetadata(
            name=self.name, datatype=self.datatype, shape=list(self.shape))


def model_outputs(config: ModelConfig, labels: Sequence[str]) -> list[Tensor]:
    """What a model offers, in the order a request with no `outputs` gets them."""
    width = config.embedding_dimension
    if config.default_pooling == Pooling.POOLING_MEAN_MAX:
        width *= 2
    per_text = (-1, width) if config.default_pooling == Pooling.POOLING_TOKENS else (width,)
    embedding = Tensor(EMBEDDING, "FP32", (-1, *per_text))
    if config.task != Task.TASK_CLASSIFY:
        return [embedding]
    return [Tensor(PROBABILITIES, "FP32", (-1, len(labels))), Tensor(LABEL, "BYTES", (-1,)),
            embedding]


def request_version(version: str) -> int:
    """A KServe request's version string as bertstream's number: "" is the policy's default
    (0); anything else must be a positive integer. (Folder names follow a stricter rule:
    version_format.parse_version.)"""
    if not version:
        return 0
    if not (version.isascii() and version.isdigit()) or int(version) <= 0:
        raise InvalidInput(f"model version must be a positive integer or empty, got {version!r}")
    return int(version)


def unpack_bytes(raw: bytes) -> list[bytes]:
    """A BYTES tensor's raw contents: each element a 4-byte little-endian length, then it."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput("raw BYTES tensor ends inside an element's 4-byte length")
        (size,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidInput(f"raw BYTES tensor element {len(items)} claims {size} bytes, "
                               f"only {len(raw) - offset} follow")
        items.append(raw[offset:offset + size])
        offset += size
    return items


def pack_bytes(items: Iterable[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(item)) + item for item in items)


def read_texts(request: pb.ModelInferRequest) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    """The texts of the BYTES input TEXT, and of TEXT_PAIR when the request sends pairs, from
    raw_input_contents (one per input, in the inputs' order) or contents.bytes_contents."""
    names = [i.name for i in request.inputs]
    if sorted(names) not in ([TEXT_INPUT], sorted([TEXT_INPUT, TEXT_PAIR_INPUT])):
        raise InvalidInput(f"expected an input named {TEXT_INPUT!r} (BYTES, shape [N] or "
                           f"[N, 1]), and {TEXT_PAIR_INPUT!r} beside it for pairs; got {names}")
    if request.raw_input_contents and len(request.raw_input_contents) != len(names):
        raise InvalidInput(f"{len(request.raw_input_contents)} raw_input_contents for "
                           f"{len(names)} inputs")
    read = {tensor.name: _read_bytes(request, i, tensor) for i, tensor in enumerate(request.inputs)}
    texts, pairs = read[TEXT_INPUT], read.get(TEXT_PAIR_INPUT)
    if pairs is not None and len(pairs) != len(texts):
        raise InvalidInput(f"input {TEXT_PAIR_INPUT!r} holds {len(pairs)} elements for "
                           f"{len(texts)} in {TEXT_INPUT!r}: one second text per text")
    return texts, pairs


def _read_bytes(request: pb.ModelInferRequest, index: int,
                tensor: pb.ModelInferRequest.InferInputTensor) -> tuple[str, ...]:
    name = tensor.name
    if tensor.datatype != "BYTES":
        raise InvalidInput(f"input {name!r} must have datatype BYTES (UTF-8 text), "
                           f"got {tensor.datatype or 'none'}")
    shape = list(tensor.shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 0:
        raise InvalidInput(f"input {name!r} must have shape [N] or [N, 1], got {shape}")
    if request.raw_input_contents:
        items = unpack_bytes(request.raw_input_contents[index])
    else:
        items = list(tensor.contents.bytes_contents)
    if len(items) != shape[0]:
        raise InvalidInput(f"input {name!r} has shape {shape} but holds {len(items)} elements")
    try:
        return tuple(item.decode("utf-8") for item in items)
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"input {name!r} holds bytes that are not UTF-8: {exc}") from None


def _param(params: Any, name: str, kind: str) -> Any:
    """A request parameter of the given kind (bool, int64, string), None when absent."""
    if name not in params:
        return None
    value = params[name]
    if value.WhichOneof("parameter_choice") != f"{kind}_param":
        raise InvalidInput(f"parameter {name!r} must be a {kind}")
    return getattr(value, f"{kind}_param")


def _count_param(params: Any, name: str) -> int:
    """An integer parameter sent as int64 or uint64 (tritonclient sends `priority` as
    uint64, `timeout` as int64); 0 when absent."""
    if name not in params:
        return 0
    value = params[name]
    kind = value.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidInput(f"parameter {name!r} must be an integer")
    return int(getattr(value, kind))


def embed_query(request: pb.ModelInferRequest, texts: tuple[str, ...],
                who: Who | None = None, pairs: tuple[str, ...] | None = None) -> EmbedQuery:
    """Parameters bertstream understands (others are ignored, as KServe servers do):
    truncate, truncation_direction ("right" / "left"), truncation_strategy for pairs
    ("longest_first", "only_first", "only_second"), pooling, pooling_layer, normalize, and
    Triton's schedule policy: priority (1 the highest level) and timeout (microseconds)."""
    p = request.parameters
    direction = _param(p, "truncation_direction", "string") or "right"
    if direction not in ("right", "left"):
        raise InvalidInput(f"truncation_direction must be 'right' or 'left', got {direction!r}")
    strategy = _param(p, "truncation_strategy", "string") or "longest_first"
    if strategy not in STRATEGIES:
        raise InvalidInput(f"truncation_strategy must be one of {list(STRATEGIES)}, "
                           f"got {strategy!r}")
    pooling_name = _param(p, "pooling", "string")
    pooling = Pooling.POOLING_UNSPECIFIED
    if pooling_name is not None:
        if pooling_name not in _POOLINGS or pooling_name == "tokens":
            raise InvalidInput(f"pooling must be one of {sorted(set(_POOLINGS) - {'tokens'})}, "
                               f"got {pooling_name!r}")
        pooling = _POOLINGS[pooling_name]
    return EmbedQuery(
        model=request.model_name, version=request_version(request.model_version), texts=texts,
        pooling=pooling, pooling_layer=_param(p, "pooling_layer", "int64"),
        normalize=bool(_param(p, "normalize", "bool")),
        text=TextOptions(truncate=bool(_param(p, "truncate", "bool")), direction=direction,
                         strategy=strategy),
        pairs=pairs,
        schedule=Schedule(priority=_count_param(p, "priority"),
                          timeout_s=check_timeout(_count_param(p, "timeout") / 1e6),
                          caller=who.turn if who else None,
                          client=who.client if who else ""),
    )


def _requested(request: pb.ModelInferRequest, offered: list[Tensor], model: str) -> list[Tensor]:
    by_name = {t.name: t for t in offered}
    names = [o.name for o in request.outputs] or list(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise InvalidInput(f"model {model!r} has no output {unknown[0]!r}; it offers "
                           f"{list(by_name)}")
    return [by_name[n] for n in names]


def _output_data(tensor: Tensor, result: Result) -> tuple[list[int], bytes]:
    if tensor.name == LABEL:
        assert result.probabilities is not None
        labels = [result.labels[i] for i in np.argmax(result.probabilities, axis=1).tolist()]
        return [len(labels)], pack_bytes(label.encode() for label in labels)
    rows = result.probabilities if tensor.name == PROBABILITIES else result.vectors
    if rows is None:
        raise RuntimeError(f"the pipeline returned no {tensor.name}")
    if isinstance(rows, list):  # token pooling: one vector per token
        if len({row.shape for row in rows}) > 1:
            raise InvalidInput("token vectors differ in length between texts: send one text "
                               "per request, or use bertstream.v1 Embed for token pooling")
        rows = np.stack(rows)
    array = rows.astype("<f4", copy=False)
    return list(array.shape), array.tobytes()


# The protocol's calls as functions of the core, so gRPC (KServeServicer) and HTTP
# (http/kserve.py) answer alike: each takes and returns this protocol's messages.

def resolve(models: Models, name: str, version: str) -> ModelVersion:
    """The READY version a request names; ModelNotFound / ModelNotReady / InvalidInput."""
    mv: ModelVersion = models.resolve(name, request_version(version))
    assert mv.loaded is not None
    return mv


def server_metadata() -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(name="bertstream", version=server_version(),
                                     extensions=list(EXTENSIONS))


def model_metadata(models: Models, name: str, version: str) -> pb.ModelMetadataResponse:
    mv = resolve(models, name, version)
    assert mv.loaded is not None
    config = mv.loaded.config
    ready = [str(v) for v in models.snapshot.ready_versions(mv.model)]
    return pb.ModelMetadataResponse(
        name=mv.model, versions=ready, platform=config.platform or "onnxruntime_onnx",
        inputs=[Tensor(name, "BYTES", (-1,)).metadata() for name in
                ((TEXT_INPUT, TEXT_PAIR_INPUT) if config.text_pairs else (TEXT_INPUT,))],
        outputs=[t.metadata() for t in model_outputs(config, mv.loaded.labels)],
    )


async def infer(pipeline: Pipeline, request: pb.ModelInferRequest, wait: bool,
                record: RequestRecord, who: Who | None = None) -> pb.ModelInferResponse:
    """One inference request; `record` learns the model, version and texts for metrics."""
    mv = resolve(pipeline.models, request.model_name, request.model_version)
    assert mv.loaded is not None
    texts, pairs = read_texts(request)
    query = embed_query(request, texts, who, pairs)
    outputs = _requested(request, model_outputs(mv.loaded.config, mv.loaded.labels), mv.model)
    names = {t.name for t in outputs}
    if mv.loaded.config.task == Task.TASK_CLASSIFY:
        result = await pipeline.classify(ClassifyQuery(
            model=query.model, version=query.version, texts=texts, text=query.text,
            embed=query if EMBEDDING in names else None, schedule=query.schedule,
            pairs=pairs), wait=wait)
    else:
        result = await pipeline.embed(query, wait=wait)
    record.served(result.model, result.version, len(texts))
    response = pb.ModelInferResponse(model_name=result.model,
                                     model_version=str(result.version), id=request.id)
    for tensor in outputs:
        shape, raw = _output_data(tensor, result)
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
        response.raw_output_contents.append(raw)
    return response


async def repository_index(models: Models, ready_only: bool) -> pb.RepositoryIndexResponse:
    """Every model the server knows, version by version, plus (unless `ready_only`) the
    model folders on disk it has not loaded, as Triton lists them."""
    Index = pb.RepositoryIndexResponse.ModelIndex
    rows: list[pb.RepositoryIndexResponse.ModelIndex] = []
    on_disk: set[str] = set()
    if not ready_only:
        on_disk = set(await asyncio.to_thread(folders.scan, models.root))
    snapshot = models.snapshot
    for name in sorted({m.name for m in snapshot.models} | on_disk):
        model = snapshot.model(name)
        error = model.error if model is not None else ""
        versions = model.versions if model is not None else ()
        if not ready_only and (error or not versions):
            rows.append(Index(name=name, state=_UNAVAILABLE, reason=error or "not loaded"))
        rows += [Index(name=name, version=str(v.version), state=wire_state(v.state)[1],
                       reason=v.reason)
                 for v in versions if not ready_only or v.state is State.READY]
    return pb.RepositoryIndexResponse(models=rows)


async def load_model(models: Models, control_mode: str, name: str,
                     parameters: Iterable[str]) -> None:
    """Explicit mode only; by name from the repository folder (no config or file overrides:
    `parameters` are the names the request sent)."""
    check_explicit(control_mode, "RepositoryModelLoad")
    names = sorted(parameters)
    if names:
        raise Unsupported("loading with a config override or files is not supported "
                          f"(parameters {names}); put the model in the repository folder "
                          "and load it by name")
    await models.load_model(name)


async def unload_model(models: Models, control_mode: str, name: str) -> None:
    """`unload_dependents` (which tritonclient always sends) means nothing here: no
    ensembles."""
    check_explicit(control_mode, "RepositoryModelUnload")
    await models.unload_model(name)


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, pipeline: Pipeline, stream_window: int = 32,
                 control_mode: str = "none", metrics: Metrics | None = None,
                 draining: asyncio.Event | None = None) -> None:
        self.pipeline = pipeline
        self.models = pipeline.models
        self.metrics = metrics or Metrics()
        self.stream_window = stream_window
        self.control_mode = control_mode
        self.draining = draining  # set on SIGTERM (see streams.py)

    @unary
    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @unary
    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: Any) -> pb.ServerReadyResponse:
        """Ready once it answers (the server starts serving only after its initial loads)
        until it drains on SIGTERM. Per-model readiness is ModelReady's."""
        draining = self.draining is not None and self.draining.is_set()
        # A front end whose engine process is down serves nothing: not ready either.
        return pb.ServerReadyResponse(ready=not draining and self.models.connected)

    @unary
    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: Any) -> pb.ModelReadyResponse:
        """False, not an error, for a model that is unknown or not serving: probes want a bool."""
        try:
            resolve(self.models, request.name, request.version)
        except (ModelNotFound, ModelNotReady):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @unary
    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: Any) -> pb.ServerMetadataResponse:
        return server_metadata()

    @unary
    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: Any) -> pb.ModelMetadataResponse:
        return model_metadata(self.models, request.name, request.version)

    async def _infer(self, request: pb.ModelInferRequest, wait: bool,
                     rpc: str, who: Who) -> pb.ModelInferResponse:
        with self.metrics.request(rpc, request.model_name) as record:
            return await infer(self.pipeline, request, wait, record, who)

    @unary
    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: Any) -> pb.ModelInferResponse:
        return await self._infer(request, wait=False, rpc="ModelInfer",
                                 who=caller(context, stream=False))

    async def ModelStreamInfer(self, requests: AsyncIterator[pb.ModelInferRequest],
                               context: Any) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """One response per request, in request order (ordered_stream's contract)."""

        who = caller(context, stream=True)

        async def handle(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            return pb.ModelStreamInferResponse(infer_response=await self._infer(
                request, wait=True, rpc="ModelStreamInfer", who=who))

        def on_error(request: pb.ModelInferRequest, code: int,
                     message: str) -> pb.ModelStreamInferResponse:
            return pb.ModelStreamInferResponse(
                error_message=message,
                infer_response=pb.ModelInferResponse(model_name=request.model_name,
                                                     model_version=request.model_version,
                                                     id=request.id))

        async for response in ordered_stream(requests, handle, on_error, self.stream_window,
                                             context, self.draining):
            yield response

    @unary
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest,
                              context: Any) -> pb.RepositoryIndexResponse:
        """One repository: its name is not checked."""
        return await repository_index(self.models, request.ready)

    @unary
    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: Any) -> pb.RepositoryModelLoadResponse:
        await load_model(self.models, self.control_mode, request.model_name,
                         request.parameters)
        return pb.RepositoryModelLoadResponse()

    @unary
    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: Any) -> pb.RepositoryModelUnloadResponse:
        await unload_model(self.models, self.control_mode, request.model_name)
        return pb.RepositoryModelUnloadResponse()


def add_to_server(servicer: KServeServicer, server: grpc.aio.Server) -> str:
    """Register the servicer; return its full service name, for reflection."""
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    return str(pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name)

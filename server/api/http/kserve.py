"""KServe v2 over HTTP (Triton's HTTP/REST protocol), with its binary tensor data extension.

So tritonclient.http, perf_analyzer over HTTP and KServe's REST clients call bertstream
unchanged. Translation only: an infer request's JSON (and the binary tensors after it) becomes
the same `ModelInferRequest` the gRPC servicer gets, answered by server/api/kserve.py's functions,
so both transports accept, refuse and answer alike; the response's tensors go back as JSON
`data` or, where the request asks (`binary_data_output`, an output's `binary_data`), as raw
bytes after the JSON header, which is what tritonclient asks for by default.

server/api/kserve.py and its protobuf stubs are imported when the routes are built, in the server
process only: app.py imports this module, and a test process that imports app.py may hold
tritonclient's stubs of the same `inference.*` names (see server/api/kserve.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ...errors import EngineUnavailable, ModelNotFound, ModelNotReady, Unsupported
from ..security import ADMIN, OPEN
from .common import Dialect, HttpContext, HttpError, caller, json_response, read_body

if TYPE_CHECKING:
    from bertstream.kserve.v2 import grpc_service_pb2 as pb

__all__ = ["HEADER_LENGTH", "routes"]

HEADER_LENGTH = "Inference-Header-Content-Length"  # the JSON part of a binary-data body
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")

DIALECT = Dialect("kserve", lambda status, message: {"error": message})


def _split(body: bytes, header_length: str | None) -> tuple[Any, bytes]:
    """The JSON header and the binary tensor data that follows it (none without the header)."""
    size = len(body)
    if header_length is not None:
        if not (header_length.isascii() and header_length.isdigit()) or \
                int(header_length) > size:
            raise HttpError(400, f"{HEADER_LENGTH} must be the JSON header's size, 0 to {size} "
                                 f"bytes, got {header_length!r}")
        size = int(header_length)
    try:
        return orjson.loads(body[:size]), body[size:]
    except orjson.JSONDecodeError as exc:
        raise HttpError(400, f"the inference request is not valid JSON: {exc}") from None


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise HttpError(400, f"{where} must be a JSON object")
    if any(key in value for key in _SHARED_MEMORY):
        raise HttpError(400, f"{where}: shared memory is not supported; send the data in "
                             "the body")
    return value


def _set_parameters(target: Any, given: dict[str, Any], where: str) -> None:
    """JSON parameters as the protocol's typed ones, which the gRPC path checks by kind."""
    for key, value in given.items():
        if isinstance(value, bool):
            target[key].bool_param = value
        elif isinstance(value, int) and -2**63 <= value < 2**63:
            target[key].int64_param = value
        elif isinstance(value, float):
            target[key].double_param = value
        elif isinstance(value, str):
            target[key].string_param = value
        else:
            raise HttpError(400, f"{where}.{key} must be a bool, a 64-bit integer, a number "
                                 "or a string")


def _flat(data: Any) -> Iterator[Any]:
    """A tensor's `data`, flat or nested as its shape (both are the protocol's)."""
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            yield item
        else:
            stack.pop()


def _add_input(request: pb.ModelInferRequest, entry: Any, where: str, binary: bytes,
               offset: int) -> int:
    """Add one input tensor; return the offset of the next one's binary data."""
    entry = _object(entry, where)
    name, datatype, shape = entry.get("name"), entry.get("datatype"), entry.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise HttpError(400, f"{where} needs a string name and datatype")
    if not isinstance(shape, list) or not all(type(d) is int and abs(d) < 2**63 for d in shape):
        raise HttpError(400, f"{where}.shape must be a list of integers")
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    parameters = _object(entry.get("parameters", {}), f"{where}.parameters")
    size = parameters.pop("binary_data_size", None)
    _set_parameters(tensor.parameters, parameters, f"{where}.parameters")
    if size is not None:
        if type(size) is not int or size < 0 or offset + size > len(binary):
            raise HttpError(400, f"{where}.parameters.binary_data_size must be a byte count "
                                 f"within the {len(binary)} bytes after the JSON header, got "
                                 f"{size!r} at offset {offset}")
        if "data" in entry:
            raise HttpError(400, f"{where} has both data and binary_data_size")
        request.raw_input_contents.append(binary[offset:offset + size])
        return offset + size
    data = entry.get("data")
    if not isinstance(data, list):
        raise HttpError(400, f"{where}.data must be a list (or send binary_data_size)")
    if datatype == "BYTES":  # other datatypes: the core refuses the input by its datatype
        items = list(_flat(data))
        if not all(isinstance(item, str) for item in items):
            raise HttpError(400, f"{where}.data: BYTES elements must be strings")
        tensor.contents.bytes_contents.extend(item.encode() for item in items)
    return offset


def _add_outputs(request: pb.ModelInferRequest, outputs: Any, default: Any) -> dict[str, bool]:
    """Add the requested outputs; return which go back as binary data (`""`: the others)."""
    if not isinstance(default, bool):
        raise HttpError(400, "parameters.binary_data_output must be a bool")
    binary = {"": default}
    if not isinstance(outputs, list):
        raise HttpError(400, "outputs must be a list")
    for i, entry in enumerate(outputs):
        entry = _object(entry, f"outputs[{i}]")
        if not isinstance(entry.get("name"), str):
            raise HttpError(400, f"outputs[{i}].name must be a string")
        request.outputs.add(name=entry["name"])
        wanted = _object(entry.get("parameters", {}), f"outputs[{i}].parameters").get(
            "binary_data", default)
        if not isinstance(wanted, bool):
            raise HttpError(400, f"outputs[{i}].parameters.binary_data must be a bool")
        binary[entry["name"]] = wanted
    return binary


def infer_request(model: str, version: str, header: Any, binary: bytes
                  ) -> tuple[pb.ModelInferRequest, dict[str, bool]]:
    """The gRPC form of an HTTP infer request, and which outputs go back as binary data."""
    from ..kserve import pb  # see the module's docstring

    header = _object(header, "the inference request")
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    if not isinstance(header.get("id", ""), str):
        raise HttpError(400, "id must be a string")
    request.id = header.get("id", "")
    parameters = dict(_object(header.get("parameters", {}), "parameters"))
    binary_outputs = _add_outputs(request, header.get("outputs", []),
                                  parameters.pop("binary_data_output", False))
    _set_parameters(request.parameters, parameters, "parameters")
    inputs = header.get("inputs")
    if not isinstance(inputs, list):
        raise HttpError(400, "inputs must be a list of tensors")
    offset = 0
    for i, entry in enumerate(inputs):
        offset = _add_input(request, entry, f"inputs[{i}]", binary, offset)
    if offset != len(binary):
        raise HttpError(400, f"{len(binary)} bytes follow the JSON header but the inputs' "
                             f"binary_data_size add up to {offset}")
    return request, binary_outputs


def _json_data(datatype: str, raw: bytes) -> Any:
    if datatype == "BYTES":
        from ..kserve import unpack_bytes  # see the module's docstring

        return [item.decode() for item in unpack_bytes(raw)]
    return np.frombuffer(raw, "<f4")  # FP32, the only other datatype the core answers


def infer_response(response: pb.ModelInferResponse, binary: dict[str, bool]) -> Response:
    """JSON, or the JSON header then the binary outputs in order (its size in a header)."""
    outputs, chunks = [], []
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype,
                                 "shape": list(tensor.shape)}
        if binary.get(tensor.name, binary[""]):
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _json_data(tensor.datatype, raw)
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": response.model_name,
                            "model_version": response.model_version, "outputs": outputs}
    if response.id:
        body["id"] = response.id
    if not chunks:
        return json_response(body)
    header = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(header + b"".join(chunks), headers={HEADER_LENGTH: str(len(header))},
                    media_type="application/octet-stream")


def _tensors(tensors: Any) -> list[dict[str, Any]]:
    return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in tensors]


def _index_row(row: pb.RepositoryIndexResponse.ModelIndex) -> dict[str, str]:
    """As Triton writes a row: no version for a model with none loaded, no empty reason."""
    fields = {"name": row.name, "version": row.version, "state": row.state,
              "reason": row.reason}
    return {key: value for key, value in fields.items() if value or key == "name"}


async def _optional_json(request: Request, context: HttpContext) -> dict[str, Any]:
    """A repository call's body: empty (as tritonclient sends the index) or a JSON object."""
    body = await read_body(request, context)
    if not body.strip():
        return {}
    header, _ = _split(body, None)
    return _object(header, "the request")


def routes(context: HttpContext) -> list[Route]:
    from .. import kserve as core  # see the module's docstring

    def version_of(request: Request) -> str:
        return str(request.path_params.get("version", ""))

    async def live(request: Request) -> Response:
        """
        summary: KServe v2 liveness (200 while the process answers; no token)
        """
        return json_response({"live": True})

    @DIALECT.handler(context, "ServerReady", OPEN)
    async def ready(request: Request) -> Response:
        """
        summary: KServe v2 readiness (200; 503 once the server drains or its engine is down)
        """
        if not context.models.connected:
            raise EngineUnavailable()
        return json_response({"ready": True})

    @DIALECT.handler(context, "ServerMetadata")
    async def server_metadata(request: Request) -> Response:
        """
        summary: KServe v2 server metadata (name, version, extensions)
        """
        meta = core.server_metadata()
        return json_response({"name": meta.name, "version": meta.version,
                              "extensions": list(meta.extensions)})

    @DIALECT.handler(context, "ModelMetadata")
    async def model_metadata(request: Request) -> Response:
        """
        summary: KServe v2 model metadata (its READY versions, input TEXT, outputs)
        """
        meta = core.model_metadata(context.models, request.path_params["model"],
                                   version_of(request))
        return json_response({"name": meta.name, "versions": list(meta.versions),
                              "platform": meta.platform, "inputs": _tensors(meta.inputs),
                              "outputs": _tensors(meta.outputs)})

    @DIALECT.handler(context, "ModelReady", OPEN)
    async def model_ready(request: Request) -> Response:
        """
        summary: KServe v2 model readiness (200, else 503; no token)
        Unknown and not serving answer alike, as gRPC's ModelReady says false for both: an
        open route must not tell a caller without a token which model names exist.
        """
        model = request.path_params["model"]
        try:
            mv = core.resolve(context.models, model, version_of(request))
        except (ModelNotFound, ModelNotReady):
            raise ModelNotReady(f"model {model!r} is not ready") from None
        return json_response({"name": mv.model, "ready": True})

    @DIALECT.handler(context, "ModelConfig")
    async def unsupported(request: Request) -> Response:
        """
        summary: Triton's model config and statistics (not served, as over gRPC)
        """
        raise Unsupported(f"{request.url.path} is not supported by bertstream")

    @DIALECT.handler(context, "ModelInfer")
    async def infer(request: Request) -> Response:
        """
        summary: KServe v2 inference (BYTES input TEXT; JSON or binary tensor data)
        """
        body = await read_body(request, context)
        header, binary = _split(body, request.headers.get(HEADER_LENGTH))
        query, binary_outputs = infer_request(request.path_params["model"],
                                              version_of(request), header, binary)
        response = await core.infer(context.pipeline, query, False, request.state.record,
                                    caller(request))
        return infer_response(response, binary_outputs)

    @DIALECT.handler(context, "RepositoryIndex", ADMIN)
    async def index(request: Request) -> Response:
        """
        summary: Triton's model repository index (admin token)
        """
        ready = (await _optional_json(request, context)).get("ready", False)
        if not isinstance(ready, bool):
            raise HttpError(400, "ready must be a bool")
        rows = (await core.repository_index(context.models, ready)).models
        return json_response([_index_row(row) for row in rows])

    @DIALECT.handler(context, "RepositoryModelLoad", ADMIN)
    async def load(request: Request) -> Response:
        """
        summary: Load a model from the repository folder (explicit mode; admin token)
        """
        body = await _optional_json(request, context)
        parameters = _object(body.get("parameters", {}), "parameters")
        await core.load_model(context.models, context.control_mode,
                              request.path_params["model"], parameters)
        return Response(status_code=200)

    @DIALECT.handler(context, "RepositoryModelUnload", ADMIN)
    async def unload(request: Request) -> Response:
        """
        summary: Unload a model (explicit mode; admin token)
        """
        await _optional_json(request, context)
        await core.unload_model(context.models, context.control_mode,
                                request.path_params["model"])
        return Response(status_code=200)

    model, versioned = "/v2/models/{model}", "/v2/models/{model}/versions/{version}"
    return [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
        *[Route(prefix + suffix, endpoint, methods=[method])
          for prefix in (model, versioned)
          for suffix, endpoint, method in (("", model_metadata, "GET"),
                                           ("/ready", model_ready, "GET"),
                                           ("/config", unsupported, "GET"),
                                           ("/stats", unsupported, "GET"),
                                           ("/infer", infer, "POST"))],
        Route("/v2/repository/index", index, methods=["POST"]),
        Route("/v2/repository/models/{model}/load", load, methods=["POST"]),
        Route("/v2/repository/models/{model}/unload", unload, methods=["POST"]),
    ]

from bertstream.v1 import model_config_pb2 as _model_config_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TruncationDirection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRUNCATION_DIRECTION_UNSPECIFIED: _ClassVar[TruncationDirection]
    TRUNCATION_DIRECTION_RIGHT: _ClassVar[TruncationDirection]
    TRUNCATION_DIRECTION_LEFT: _ClassVar[TruncationDirection]

class TruncationStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRUNCATION_STRATEGY_UNSPECIFIED: _ClassVar[TruncationStrategy]
    TRUNCATION_STRATEGY_LONGEST_FIRST: _ClassVar[TruncationStrategy]
    TRUNCATION_STRATEGY_ONLY_FIRST: _ClassVar[TruncationStrategy]
    TRUNCATION_STRATEGY_ONLY_SECOND: _ClassVar[TruncationStrategy]

class RerankMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RERANK_METHOD_UNSPECIFIED: _ClassVar[RerankMethod]
    RERANK_METHOD_CROSS_ENCODER: _ClassVar[RerankMethod]
    RERANK_METHOD_COSINE: _ClassVar[RerankMethod]

class VersionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERSION_STATE_UNKNOWN: _ClassVar[VersionState]
    VERSION_STATE_LOADING: _ClassVar[VersionState]
    VERSION_STATE_READY: _ClassVar[VersionState]
    VERSION_STATE_UNLOADING: _ClassVar[VersionState]
    VERSION_STATE_UNAVAILABLE: _ClassVar[VersionState]
TRUNCATION_DIRECTION_UNSPECIFIED: TruncationDirection
TRUNCATION_DIRECTION_RIGHT: TruncationDirection
TRUNCATION_DIRECTION_LEFT: TruncationDirection
TRUNCATION_STRATEGY_UNSPECIFIED: TruncationStrategy
TRUNCATION_STRATEGY_LONGEST_FIRST: TruncationStrategy
TRUNCATION_STRATEGY_ONLY_FIRST: TruncationStrategy
TRUNCATION_STRATEGY_ONLY_SECOND: TruncationStrategy
RERANK_METHOD_UNSPECIFIED: RerankMethod
RERANK_METHOD_CROSS_ENCODER: RerankMethod
RERANK_METHOD_COSINE: RerankMethod
VERSION_STATE_UNKNOWN: VersionState
VERSION_STATE_LOADING: VersionState
VERSION_STATE_READY: VersionState
VERSION_STATE_UNLOADING: VersionState
VERSION_STATE_UNAVAILABLE: VersionState

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("tokenize_us", "queue_us", "inference_us", "total_us")
    TOKENIZE_US_FIELD_NUMBER: _ClassVar[int]
    QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_US_FIELD_NUMBER: _ClassVar[int]
    TOTAL_US_FIELD_NUMBER: _ClassVar[int]
    tokenize_us: int
    queue_us: int
    inference_us: int
    total_us: int
    def __init__(self, tokenize_us: _Optional[int] = ..., queue_us: _Optional[int] = ..., inference_us: _Optional[int] = ..., total_us: _Optional[int] = ...) -> None: ...

class TextUsage(_message.Message):
    __slots__ = ("token_count", "truncated", "truncated_tokens")
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    token_count: int
    truncated: bool
    truncated_tokens: int
    def __init__(self, token_count: _Optional[int] = ..., truncated: _Optional[bool] = ..., truncated_tokens: _Optional[int] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("request_id", "model", "version", "texts", "pooling", "pooling_layer", "normalize", "truncate", "truncation_direction", "raw_values", "priority", "timeout_us", "text_pairs", "truncation_strategy")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    POOLING_LAYER_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_DIRECTION_FIELD_NUMBER: _ClassVar[int]
    RAW_VALUES_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_US_FIELD_NUMBER: _ClassVar[int]
    TEXT_PAIRS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    version: int
    texts: _containers.RepeatedScalarFieldContainer[str]
    pooling: _model_config_pb2.Pooling
    pooling_layer: int
    normalize: bool
    truncate: bool
    truncation_direction: TruncationDirection
    raw_values: bool
    priority: int
    timeout_us: int
    text_pairs: _containers.RepeatedScalarFieldContainer[str]
    truncation_strategy: TruncationStrategy
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., texts: _Optional[_Iterable[str]] = ..., pooling: _Optional[_Union[_model_config_pb2.Pooling, str]] = ..., pooling_layer: _Optional[int] = ..., normalize: _Optional[bool] = ..., truncate: _Optional[bool] = ..., truncation_direction: _Optional[_Union[TruncationDirection, str]] = ..., raw_values: _Optional[bool] = ..., priority: _Optional[int] = ..., timeout_us: _Optional[int] = ..., text_pairs: _Optional[_Iterable[str]] = ..., truncation_strategy: _Optional[_Union[TruncationStrategy, str]] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values", "shape", "usage", "raw")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    shape: _containers.RepeatedScalarFieldContainer[int]
    usage: TextUsage
    raw: bytes
    def __init__(self, values: _Optional[_Iterable[float]] = ..., shape: _Optional[_Iterable[int]] = ..., usage: _Optional[_Union[TextUsage, _Mapping]] = ..., raw: _Optional[bytes] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("request_id", "model", "version", "embeddings", "pooling", "pooling_layer", "timings", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    POOLING_LAYER_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    version: int
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    pooling: _model_config_pb2.Pooling
    pooling_layer: int
    timings: Timings
    error: Error
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., pooling: _Optional[_Union[_model_config_pb2.Pooling, str]] = ..., pooling_layer: _Optional[int] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("request_id", "model", "version", "texts", "top_k", "return_embedding", "pooling", "pooling_layer", "normalize", "truncate", "truncation_direction", "raw_values", "priority", "timeout_us", "text_pairs", "truncation_strategy")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    RETURN_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    POOLING_LAYER_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_DIRECTION_FIELD_NUMBER: _ClassVar[int]
    RAW_VALUES_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_US_FIELD_NUMBER: _ClassVar[int]
    TEXT_PAIRS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    version: int
    texts: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    return_embedding: bool
    pooling: _model_config_pb2.Pooling
    pooling_layer: int
    normalize: bool
    truncate: bool
    truncation_direction: TruncationDirection
    raw_values: bool
    priority: int
    timeout_us: int
    text_pairs: _containers.RepeatedScalarFieldContainer[str]
    truncation_strategy: TruncationStrategy
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., texts: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ..., return_embedding: _Optional[bool] = ..., pooling: _Optional[_Union[_model_config_pb2.Pooling, str]] = ..., pooling_layer: _Optional[int] = ..., normalize: _Optional[bool] = ..., truncate: _Optional[bool] = ..., truncation_direction: _Optional[_Union[TruncationDirection, str]] = ..., raw_values: _Optional[bool] = ..., priority: _Optional[int] = ..., timeout_us: _Optional[int] = ..., text_pairs: _Optional[_Iterable[str]] = ..., truncation_strategy: _Optional[_Union[TruncationStrategy, str]] = ...) -> None: ...

class LabelScore(_message.Message):
    __slots__ = ("label", "index", "probability")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    label: str
    index: int
    probability: float
    def __init__(self, label: _Optional[str] = ..., index: _Optional[int] = ..., probability: _Optional[float] = ...) -> None: ...

class Classification(_message.Message):
    __slots__ = ("labels", "embedding", "usage")
    LABELS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedCompositeFieldContainer[LabelScore]
    embedding: Embedding
    usage: TextUsage
    def __init__(self, labels: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ..., embedding: _Optional[_Union[Embedding, _Mapping]] = ..., usage: _Optional[_Union[TextUsage, _Mapping]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("request_id", "model", "version", "results", "timings", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    version: int
    results: _containers.RepeatedCompositeFieldContainer[Classification]
    timings: Timings
    error: Error
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., results: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("model", "version", "texts", "truncate", "truncation_direction", "task", "text_pairs", "truncation_strategy")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_DIRECTION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    TEXT_PAIRS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    texts: _containers.RepeatedScalarFieldContainer[str]
    truncate: bool
    truncation_direction: TruncationDirection
    task: _model_config_pb2.Task
    text_pairs: _containers.RepeatedScalarFieldContainer[str]
    truncation_strategy: TruncationStrategy
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., texts: _Optional[_Iterable[str]] = ..., truncate: _Optional[bool] = ..., truncation_direction: _Optional[_Union[TruncationDirection, str]] = ..., task: _Optional[_Union[_model_config_pb2.Task, str]] = ..., text_pairs: _Optional[_Iterable[str]] = ..., truncation_strategy: _Optional[_Union[TruncationStrategy, str]] = ...) -> None: ...

class TokenizedText(_message.Message):
    __slots__ = ("tokens", "ids", "offset_starts", "offset_ends", "usage", "type_ids")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_STARTS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_ENDS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TYPE_IDS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    ids: _containers.RepeatedScalarFieldContainer[int]
    offset_starts: _containers.RepeatedScalarFieldContainer[int]
    offset_ends: _containers.RepeatedScalarFieldContainer[int]
    usage: TextUsage
    type_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, tokens: _Optional[_Iterable[str]] = ..., ids: _Optional[_Iterable[int]] = ..., offset_starts: _Optional[_Iterable[int]] = ..., offset_ends: _Optional[_Iterable[int]] = ..., usage: _Optional[_Union[TextUsage, _Mapping]] = ..., type_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("model", "version", "results", "max_sequence_length")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    results: _containers.RepeatedCompositeFieldContainer[TokenizedText]
    max_sequence_length: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., results: _Optional[_Iterable[_Union[TokenizedText, _Mapping]]] = ..., max_sequence_length: _Optional[int] = ...) -> None: ...

class RerankRequest(_message.Message):
    __slots__ = ("request_id", "model", "version", "query", "texts", "raw_scores", "return_text", "truncate", "truncation_strategy", "priority", "timeout_us", "top_n", "truncation_direction")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    RAW_SCORES_FIELD_NUMBER: _ClassVar[int]
    RETURN_TEXT_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_US_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_DIRECTION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    version: int
    query: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    raw_scores: bool
    return_text: bool
    truncate: bool
    truncation_strategy: TruncationStrategy
    priority: int
    timeout_us: int
    top_n: int
    truncation_direction: TruncationDirection
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., query: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ..., raw_scores: _Optional[bool] = ..., return_text: _Optional[bool] = ..., truncate: _Optional[bool] = ..., truncation_strategy: _Optional[_Union[TruncationStrategy, str]] = ..., priority: _Optional[int] = ..., timeout_us: _Optional[int] = ..., top_n: _Optional[int] = ..., truncation_direction: _Optional[_Union[TruncationDirection, str]] = ...) -> None: ...

class RerankResult(_message.Message):
    __slots__ = ("index", "score", "text", "usage")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    index: int
    score: float
    text: str
    usage: TextUsage
    def __init__(self, index: _Optional[int] = ..., score: _Optional[float] = ..., text: _Optional[str] = ..., usage: _Optional[_Union[TextUsage, _Mapping]] = ...) -> None: ...

class RerankResponse(_message.Message):
    __slots__ = ("request_id", "model", "version", "results", "method", "timings")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    version: int
    results: _containers.RepeatedCompositeFieldContainer[RerankResult]
    method: RerankMethod
    timings: Timings
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., results: _Optional[_Iterable[_Union[RerankResult, _Mapping]]] = ..., method: _Optional[_Union[RerankMethod, str]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class ModelVersionStatus(_message.Message):
    __slots__ = ("model", "version", "state", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    state: VersionState
    reason: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[_Union[VersionState, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("ready_only",)
    READY_ONLY_FIELD_NUMBER: _ClassVar[int]
    ready_only: bool
    def __init__(self, ready_only: _Optional[bool] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelVersionStatus]
    default_model: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelVersionStatus, _Mapping]]] = ..., default_model: _Optional[str] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("model", "version", "ready_versions", "default_version", "task", "embedding_dimension", "labels", "max_sequence_length", "poolings", "default_pooling", "pooling_layers", "default_pooling_layer", "max_texts_per_request", "max_text_chars", "platform", "execution_provider", "batch_cost", "priority_levels", "text_pairs")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    READY_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIMENSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    POOLINGS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_POOLING_FIELD_NUMBER: _ClassVar[int]
    POOLING_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_POOLING_LAYER_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXTS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    BATCH_COST_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_LEVELS_FIELD_NUMBER: _ClassVar[int]
    TEXT_PAIRS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    ready_versions: _containers.RepeatedScalarFieldContainer[int]
    default_version: int
    task: _model_config_pb2.Task
    embedding_dimension: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    max_sequence_length: int
    poolings: _containers.RepeatedScalarFieldContainer[_model_config_pb2.Pooling]
    default_pooling: _model_config_pb2.Pooling
    pooling_layers: _containers.RepeatedScalarFieldContainer[int]
    default_pooling_layer: int
    max_texts_per_request: int
    max_text_chars: int
    platform: str
    execution_provider: str
    batch_cost: BatchCost
    priority_levels: int
    text_pairs: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., ready_versions: _Optional[_Iterable[int]] = ..., default_version: _Optional[int] = ..., task: _Optional[_Union[_model_config_pb2.Task, str]] = ..., embedding_dimension: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., max_sequence_length: _Optional[int] = ..., poolings: _Optional[_Iterable[_Union[_model_config_pb2.Pooling, str]]] = ..., default_pooling: _Optional[_Union[_model_config_pb2.Pooling, str]] = ..., pooling_layers: _Optional[_Iterable[int]] = ..., default_pooling_layer: _Optional[int] = ..., max_texts_per_request: _Optional[int] = ..., max_text_chars: _Optional[int] = ..., platform: _Optional[str] = ..., execution_provider: _Optional[str] = ..., batch_cost: _Optional[_Union[BatchCost, _Mapping]] = ..., priority_levels: _Optional[int] = ..., text_pairs: _Optional[bool] = ...) -> None: ...

class BatchCost(_message.Message):
    __slots__ = ("fixed_us", "per_token_us", "points")
    FIXED_US_FIELD_NUMBER: _ClassVar[int]
    PER_TOKEN_US_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    fixed_us: float
    per_token_us: float
    points: _containers.RepeatedCompositeFieldContainer[BatchCostPoint]
    def __init__(self, fixed_us: _Optional[float] = ..., per_token_us: _Optional[float] = ..., points: _Optional[_Iterable[_Union[BatchCostPoint, _Mapping]]] = ...) -> None: ...

class BatchCostPoint(_message.Message):
    __slots__ = ("batch_size", "tokens", "seconds")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    tokens: int
    seconds: float
    def __init__(self, batch_size: _Optional[int] = ..., tokens: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersionStatus]
    def __init__(self, versions: _Optional[_Iterable[_Union[ModelVersionStatus, _Mapping]]] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

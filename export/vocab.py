"""A Chinese BERT-wwm-style WordPiece vocabulary for random-init models.

No BERT-wwm weights ship in any package registry, so tests and the offline quick start build a
random model of the BERT-wwm shape. Its vocabulary must still behave like the real one on Chinese
news text (every common character, full-width punctuation, digits and mixed English tokenize to
known pieces), because the tokenizer path is what the server really exercises.

Layout (the ids of the specials match the real `vocab.txt` of hfl/chinese-bert-wwm):
[PAD] 0, [unused1..99] 1-99, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, then symbols, digits,
English words and `##` pieces, then CJK Unified Ideographs in code point order from U+4E00.

The basic CJK block holds 20,902 ideographs and only about 20,000 slots are left, so which
ideographs to drop matters: the tail of the block holds common characters (黑 黄 鼓 齐 龄 龙 龍).
Every ideograph that GB2312 (simplified) or Big5 (traditional) can encode is kept (15,441 of
them); the remaining slots go to the other ideographs from U+4E00 upward. The dropped ones are
rare characters that neither standard carries.
"""

from __future__ import annotations

import functools
import string
import unicodedata
from pathlib import Path

VOCAB_SIZE = 21_128
PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"

_CJK_FIRST, _CJK_LAST = 0x4E00, 0x9FA5

# Chinese and full-width punctuation and the symbols Chinese news uses.
_CHINESE_SYMBOLS = (
    "，。！？；：、“”‘’（）《》【】…—·％～「」『』〈〉〔〕〖〗﹏￥﹑﹒–―‖′″々〇"
    "°℃℉×÷±≈≠≤≥∞√→←↑↓↔●○■□▲△▼▽◆◇★☆※§№‰•¥£€¢©®™∶∵∴"
)
_CIRCLED_NUMBERS = "".join(chr(c) for c in range(0x2460, 0x2474))  # ①..⑳
_GREEK_LOWER = "".join(chr(c) for c in range(0x03B1, 0x03CA) if c != 0x03C2)  # α..ω
_FULL_WIDTH = "".join(chr(c) for c in range(0xFF01, 0xFF5F))  # ！..～, ０..９, ａ..ｚ
_KANA = "".join(chr(c) for c in (*range(0x3041, 0x3097), *range(0x30A1, 0x30FB), 0x30FC))

# Lowercase English words and abbreviations that show up in Chinese news.
_WORDS = """
the of and to in is for on with at by from as that this it be are was an or not new news
we you he she they his her our your their all more most about after over into out up one two
china chinese beijing shanghai shenzhen hong kong taiwan macau asia usa uk eu un who imf wto
nasa nba fifa cba gdp cpi ppi pmi ipo ceo cfo cto etf ai app apps apple iphone ipad mac macbook
ios android google microsoft windows office huawei xiaomi oppo vivo lenovo tesla amazon meta
facebook twitter youtube wechat weibo tiktok alibaba tencent baidu jd bytedance samsung sony
intel amd nvidia qualcomm arm covid sars 5g 4g wifi usb cpu gpu pc tv vr ar gps pm am km kg cm
mm mb gb tb ghz mhz http https www com cn org net html email online ok vs mr dr co ltd inc
group bank market world city data cloud chip chips pro max plus mini air ultra lite smart open
video music game games film show star sports team cup league open time day year home health
"""

# Frequent English word endings, so mixed text keeps to a few pieces.
_SUFFIXES = "s es ed ing er ers ly ion tion al le en on an in re ne ve te th ch st nt ic ity ment"

_NUMBERS = [str(n) for n in range(10, 100)] + ["100", "1000"]
_YEARS = [str(y) for y in range(1980, 2031)]


def _is_bert_punctuation(char: str) -> bool:
    """BERT's pre-tokenizer splits these off; anything else sticks to its neighbours."""
    code = ord(char)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _symbol_tokens() -> list[str]:
    """Single characters, then `##` forms of those that can sit inside a word (digits,
    letters, kana, and symbols such as ℃ or ￥ that are not punctuation): '30℃' is one
    pre-token and would become [UNK] as a whole without '##℃'."""
    ascii_chars = [c for c in string.printable if c.isprintable() and not c.isspace()]
    singles = _unique(
        ascii_chars + list(_CHINESE_SYMBOLS + _FULL_WIDTH + _CIRCLED_NUMBERS + _GREEK_LOWER + _KANA)
    )
    inner = [f"##{c}" for c in singles if not _is_bert_punctuation(c) and not c.isupper()]
    return singles + inner


def _word_tokens() -> list[str]:
    words = _WORDS.split()
    suffixes = [f"##{s}" for s in _SUFFIXES.split()]
    return _NUMBERS + _YEARS + words + suffixes


def _encodable(char: str, encoding: str) -> bool:
    try:
        char.encode(encoding)
    except UnicodeEncodeError:
        return False
    return True


def _ideographs(slots: int) -> list[str]:
    """`slots` ideographs in code point order: all common ones, then the rest from U+4E00."""
    block = [chr(c) for c in range(_CJK_FIRST, _CJK_LAST + 1)]
    common = {c for c in block if _encodable(c, "gb2312") or _encodable(c, "big5")}
    if len(common) > slots:
        raise ValueError(f"{len(common)} common ideographs do not fit in {slots} slots")
    spare = slots - len(common)
    chosen = set(common)
    for char in block:
        if spare == 0:
            break
        if char not in chosen:
            chosen.add(char)
            spare -= 1
    return sorted(chosen)


@functools.cache
def build_vocab() -> tuple[str, ...]:
    """The 21,128 tokens, index = token id."""
    specials = [PAD, *(f"[unused{i}]" for i in range(1, 100)), UNK, CLS, SEP, MASK]
    head = _unique(specials + _symbol_tokens() + _word_tokens())
    tokens = head + _ideographs(VOCAB_SIZE - len(head))
    if len(tokens) != VOCAB_SIZE or len(set(tokens)) != VOCAB_SIZE:
        raise AssertionError("generated vocabulary is not 21,128 unique tokens")
    return tuple(tokens)


def write_vocab(path: Path) -> Path:
    """Write `vocab.txt` (one token per line, the format BertTokenizer reads)."""
    path.write_text("".join(f"{token}\n" for token in build_vocab()), encoding="utf-8")
    return path

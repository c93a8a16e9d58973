"""One-pass truncation: lengths and ids equal to tokenizing in full, then truncating."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from bertstream.server.engine.tokenizer import TextTokenizer
from bertstream.server.errors import InputTooLong
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

WORDS = st.sampled_from(["央行", "宣布", "降准", "股市", "，", "iPhone", "15", "售价", "5999元",
                         "暴雨", "救援", "。", "the", "market", "\u200b", "😀", "龘",
                         "[SEP]", "[CLS]", "[PAD]", " "])
TEXTS = st.lists(WORDS, min_size=1, max_size=400).map("".join)


@pytest.fixture(scope="module")
def tokenizer_path(model_repository: Path) -> Path:
    return model_repository / "tiny-embed" / "1" / "tokenizer.json"


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(TEXTS, min_size=1, max_size=8), max_length=st.sampled_from([8, 16, 64]),
       direction=st.sampled_from(["right", "left"]), keep=st.booleans())
def test_one_pass_matches_full_then_truncated(tokenizer_path: Path, texts: list[str],
                                              max_length: int, direction: str,
                                              keep: bool) -> None:
    plain = Tokenizer.from_file(str(tokenizer_path))
    plain.no_truncation()
    reference = Tokenizer.from_file(str(tokenizer_path))
    reference.enable_truncation(max_length, direction=direction)
    encoded = TextTokenizer(tokenizer_path, max_length).encode(texts, True, direction, keep)
    assert len(encoded) == len(texts)
    assert encoded.ids.dtype == np.int64 and len(encoded.ids) == sum(encoded.lengths)
    if keep:  # the Tokenize rpc's tokens and offsets
        assert encoded.encodings is not None
    else:
        assert encoded.encodings is None
    for i, text in enumerate(texts):
        full = len(plain.encode(text).ids)
        expected = reference.encode(text)
        assert encoded.text_ids(i).tolist() == expected.ids
        types = [0] * encoded.lengths[i] if encoded.type_ids is None else \
            encoded.type_ids[encoded.starts[i]:encoded.starts[i] + encoded.lengths[i]].tolist()
        assert types == expected.type_ids
        if encoded.encodings is not None:
            assert encoded.encodings[i].offsets == expected.offsets
        assert encoded.lengths[i] == min(full, max_length)
        assert encoded.truncated_tokens[i] == max(0, full - max_length)


def test_too_long_without_truncate_names_the_full_length(tokenizer_path: Path) -> None:
    plain = Tokenizer.from_file(str(tokenizer_path))
    plain.no_truncation()
    text = "央行宣布降准，股市应声大涨。" * 40  # several overflow pieces at 16 tokens
    full = len(plain.encode(text).ids)
    tokenizer = TextTokenizer(tokenizer_path, 16)
    with pytest.raises(InputTooLong, match=rf"texts\[1\] is {full} tokens, over .* of 16"):
        tokenizer.encode(["短文本", text], False)
    assert tokenizer.encode(["短文本", text], True).truncated_tokens == [0, full - 16]


def test_the_left_truncating_tokenizer_is_built_on_first_use_even_without_the_file(
        tokenizer_path: Path, tmp_path: Path) -> None:
    """Most versions never truncate on the left: that tokenizer (hundreds of MB for a large
    vocabulary) is built when first asked for, from memory: a retired version's folder may be
    gone by then."""
    copy = tmp_path / "tokenizer.json"
    copy.write_bytes(tokenizer_path.read_bytes())
    tok = TextTokenizer(copy, 8)
    assert set(tok._truncating) == {("right", "longest_first")}
    copy.unlink()
    text = "央行宣布降准0.5个百分点，释放长期资金约1万亿元。"
    left = tok.encode([text], truncate=True, direction="left")
    right = tok.encode([text], truncate=True, direction="right")
    assert set(tok._truncating) == {("right", "longest_first"), ("left", "longest_first")}
    full = Tokenizer.from_file(str(tokenizer_path)).encode(text).ids
    assert list(left.text_ids(0)[1:-1]) == full[-7:-1]  # the end kept, specials around it
    assert list(right.text_ids(0)[1:-1]) == full[1:7]
    assert left.truncated_tokens == right.truncated_tokens == [len(full) - 8]


# -- pairs -----------------------------------------------------------------------------------

PAIR_HALVES = st.lists(WORDS, min_size=1, max_size=60).map("".join)


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_path: Path):  # type: ignore[no-untyped-def]
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_path))


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(PAIR_HALVES, PAIR_HALVES), min_size=1, max_size=6),
       max_length=st.sampled_from([24, 48, 64]),
       strategy=st.sampled_from(["longest_first", "only_second"]),
       direction=st.sampled_from(["right", "left"]))
def test_pairs_equal_hugging_face(tokenizer_path: Path, hf_tokenizer,  # type: ignore[no-untyped-def]
                                  pairs: list[tuple[str, str]], max_length: int, strategy: str,
                                  direction: str) -> None:
    """Ids and type ids as transformers' tokenizer pairs them ([CLS] a [SEP] b [SEP], types
    0 then 1), cut by the same strategy; the cut counted against the untruncated pair."""
    tokenizer = TextTokenizer(tokenizer_path, max_length)
    texts, seconds = [a for a, _ in pairs], [b for _, b in pairs]
    hf_tokenizer.truncation_side = direction
    try:
        expected = hf_tokenizer(texts, seconds, truncation=strategy, max_length=max_length,
                                return_token_type_ids=True)
    except Exception:  # only_second cannot fit a first half that is too long alone
        with pytest.raises(InputTooLong, match="truncation strategy only_second"):
            tokenizer.encode(texts, True, direction, pairs=seconds, strategy=strategy)
        return
    full = hf_tokenizer(texts, seconds)["input_ids"]
    encoded = tokenizer.encode(texts, True, direction, pairs=seconds, strategy=strategy)
    assert encoded.type_ids is not None
    for i in range(len(pairs)):
        ids = encoded.text_ids(i).tolist()
        types = encoded.type_ids[encoded.starts[i]:encoded.starts[i] + encoded.lengths[i]]
        assert ids == expected["input_ids"][i]
        assert types.tolist() == expected["token_type_ids"][i]
        assert encoded.truncated_tokens[i] == len(full[i]) - len(ids)
    over = [i for i, ids in enumerate(full) if len(ids) > max_length]
    if over:
        with pytest.raises(InputTooLong, match=rf"pair {over[0]} .* over this model's limit"):
            tokenizer.encode(texts, False, pairs=seconds)
    else:
        assert tokenizer.encode(texts, False, pairs=seconds).ids.tolist() == encoded.ids.tolist()


def test_a_pair_s_types_are_zero_and_one_around_the_separator(tokenizer_path: Path) -> None:
    encoded = TextTokenizer(tokenizer_path, 64).encode(["今天股市"], False, pairs=["大涨"])
    plain = Tokenizer.from_file(str(tokenizer_path))
    a, b = plain.encode("今天股市"), plain.encode("大涨")
    assert encoded.lengths == [len(a.ids) + len(b.ids) - 1]  # [CLS] a [SEP] b [SEP]
    assert encoded.type_ids is not None
    assert encoded.type_ids.tolist() == [0] * len(a.ids) + [1] * (len(b.ids) - 1)

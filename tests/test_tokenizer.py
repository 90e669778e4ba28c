import json
import unicodedata

import numpy as np
import pytest
from conftest import need_shared

from ernievil2.tokenizer import (SPECIAL_TOKENS, BasicTokenizer, ErnieTokenizer, VocabError,
                                 build_vocab, is_blank_text, load_vocab, write_vocab)

OFFICIAL_VOCAB = ("data", "vocab", "ernie-3.0-base-zh", "vocab.txt")

# A handmade vocab in the official `token\tid` layout, with the official special ids.
SMALL = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]", "hello", "world", ",", "!", "un", "##aff",
         "##able", "中", "文", "abc", "cafe", "a", "##a", "-", "##bc"]


@pytest.fixture
def small_vocab_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("".join(f"{t}\t{i}\n" for i, t in enumerate(SMALL)), encoding="utf-8")
    return path


@pytest.fixture
def tok(small_vocab_file):
    return ErnieTokenizer.from_file(small_vocab_file)


# ------------------------------------------------------------------------- official parity
@pytest.mark.shared
def test_reproduces_official_token_ids_exactly():
    vocab = need_shared(*OFFICIAL_VOCAB)
    rows = [json.loads(line) for line in need_shared("golden", "official_tokens_set1.jsonl")
            .read_text(encoding="utf-8").splitlines()]
    tok = ErnieTokenizer.from_file(vocab)
    got = tok.batch_encode([r["text"] for r in rows])
    assert got.dtype == np.int64 and got.shape == (len(rows), 48)
    for row, ids in zip(rows, got.tolist()):
        assert ids == row["input_ids"], row["text"]


@pytest.mark.shared
def test_official_vocab_specials_and_duplicate_dollar():
    vocab = load_vocab(need_shared(*OFFICIAL_VOCAB))
    assert vocab["$"] == 18005  # listed at 12084 and 18005: the later id wins
    tok = ErnieTokenizer(vocab)
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.unk_id) == (0, 1, 2, 3, 39979)
    assert tok.vocab_size == 39980 and len(vocab) == 39979


# ------------------------------------------------------------------------- basic tokenizer
def test_basic_lowercases_strips_accents_and_splits_punctuation():
    assert BasicTokenizer().tokenize("Héllo,  WORLD!") == ["hello", ",", "world", "!"]
    assert BasicTokenizer().tokenize("e\u0301\u0301 naïve") == ["e", "naive"]  # combining marks
    assert BasicTokenizer().tokenize("a$b^c`d") == ["a", "$", "b", "^", "c", "`", "d"]


def test_basic_spaces_cjk_but_not_kana_or_hangul():
    assert BasicTokenizer().tokenize("中文abc混合") == ["中", "文", "abc", "混", "合"]
    # Hangul/kana stay whole words (NFD, part of accent stripping, decomposes Hangul into jamo).
    nfd = [unicodedata.normalize("NFD", w) for w in ("한국어", "のテキスト")]
    assert BasicTokenizer().tokenize("한국어 のテキスト") == nfd


def test_basic_drops_control_chars_and_splits_on_unicode_spaces():
    assert BasicTokenizer().tokenize("a\x00b\u200bc\ufffd d\u3000e\tf\n") == ["abc", "d", "e", "f"]


# ------------------------------------------------------------------------------ wordpiece
def test_wordpiece_longest_match_and_unknowns(tok):
    assert tok.tokenize("unaffable") == ["un", "##aff", "##able"]
    assert tok.tokenize("unaffablex hello") == ["[UNK]", "hello"]  # one bad piece -> whole word
    assert tok.tokenize("aaaa") == ["a", "##a", "##a", "##a"]
    assert tok.tokenize("a" * 100) == ["a"] + ["##a"] * 99
    assert tok.tokenize("a" * 101) == ["[UNK]"]  # over 100 chars


def test_no_full_width_folding(tok):
    assert tok.tokenize("ＡＢＣ abc") == ["[UNK]", "abc"]


def test_encode_wraps_and_truncates(small_vocab_file):
    tok = ErnieTokenizer.from_file(small_vocab_file, max_seq_len=5)
    assert tok.encode("Hello, world!") == [1, 5, 7, 6, 2]
    assert tok.encode("hello hello hello hello") == [1, 5, 5, 5, 2]
    assert tok.encode("") == [1, 2]
    assert tok.encode("中 ? 文") == [1, 12, 4, 13, 2]  # "?" not in vocab -> [UNK]=4


def test_batch_encode_padding(small_vocab_file):
    tok = ErnieTokenizer.from_file(small_vocab_file, max_seq_len=8)
    fixed = tok.batch_encode(["hello", "hello world !"])
    assert fixed.dtype == np.int64 and fixed.tolist() == [[1, 5, 2, 0, 0, 0, 0, 0],
                                                          [1, 5, 6, 8, 2, 0, 0, 0]]
    longest = tok.batch_encode(["hello", "hello world !"], padding="longest")
    assert longest.tolist() == [[1, 5, 2, 0, 0], [1, 5, 6, 8, 2]]
    with pytest.raises(ValueError, match="padding"):
        tok.batch_encode(["x"], padding="left")


def test_special_tokens_by_id_must_match_the_vocab(small_vocab_file):
    tok = ErnieTokenizer.from_file(small_vocab_file, max_seq_len=6, pad_token=0, cls_token=1,
                                   sep_token=2, mask_token=3)
    assert tok.batch_encode(["hello"]).tolist() == [[1, 5, 2, 0, 0, 0]]
    # an id that is another token's: the config and the vocab disagree
    with pytest.raises(VocabError, match=r"^\S*vocab\.txt: \[CLS\] has id 1 but the config says "
                                         r"cls_token 7 "):
        ErnieTokenizer.from_file(small_vocab_file, cls_token=7)
    with pytest.raises(VocabError, match=r"vocab\.txt: mask_token '\[NOPE\]' is not in the vocab"):
        ErnieTokenizer.from_file(small_vocab_file, mask_token="[NOPE]")


def test_vocab_without_special_tokens_is_a_one_line_error(tmp_path):
    # one token a line, no [CLS]/[SEP]: ids 1 and 2 would be ordinary words and every other id
    # would be shifted by 2
    path = tmp_path / "plain.txt"
    path.write_text("[PAD]\n[MASK]\n[UNK]\nhello\nworld\n", encoding="utf-8")
    with pytest.raises(VocabError) as e:
        ErnieTokenizer.from_file(path, pad_token=0, cls_token=1, sep_token=2, mask_token=3)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == (f"{path}: no [CLS] token but the config says cls_token 1 "
                   "(a vocab for this model has [CLS] at id 1)")
    # the same tokens at other ids
    path.write_text("[PAD]\n[SEP]\n[CLS]\n[MASK]\n[UNK]\nhello\n", encoding="utf-8")
    with pytest.raises(VocabError, match=r"plain\.txt: \[CLS\] has id 2 but the config says cls_token 1"):
        ErnieTokenizer.from_file(path, pad_token=0, cls_token=1, sep_token=2, mask_token=3)
    # and with the defaults (tokens given by name) a missing special token is an error too
    path.write_text("[PAD]\n[MASK]\n[UNK]\nhello\n", encoding="utf-8")
    with pytest.raises(VocabError, match=r"plain\.txt: cls_token '\[CLS\]' is not in the vocab"):
        ErnieTokenizer.from_file(path)


def test_special_id_shared_with_another_token_is_an_error(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("[PAD]\t0\n[CLS]\t1\n[SEP]\t2\n[MASK]\t3\n[UNK]\t4\nhello\t1\n",
                    encoding="utf-8")
    with pytest.raises(VocabError, match=r"v\.txt: id 1 \(cls_token\) is shared by '\[CLS\]', 'hello'"):
        ErnieTokenizer.from_file(path, pad_token=0, cls_token=1, sep_token=2, mask_token=3)


def test_max_id_and_embedding_rows_check(tmp_path, small_vocab_file):
    tok = ErnieTokenizer.from_file(small_vocab_file)
    assert tok.max_id == len(SMALL) - 1 and tok.vocab_size == len(SMALL)
    tok.check_embedding_rows(len(SMALL))
    with pytest.raises(VocabError, match=rf"vocab\.txt: ids go up to {len(SMALL) - 1} but the text "
                                         rf"tower has only {len(SMALL) - 1} token embeddings"):
        tok.check_embedding_rows(len(SMALL) - 1)
    # an unk id given by number counts too (it is not checked against the vocab)
    assert ErnieTokenizer.from_file(small_vocab_file, unk_token=99).max_id == 99


def test_blank_text_covers_control_and_format_characters(tok):
    for text in ["", "   ", "\u3000\t", "\x01\x02\x1f", "\u200b\u200e\ufeff\u2060", "\x00\ufffd",
                 "\u0301\u0308", " \x7f\u00ad "]:
        assert is_blank_text(text), repr(text)
        assert tok.encode(text) == [1, 2], repr(text)  # what such a caption would embed as
    for text in ["a", ".", "中", "\u200bx", "ＡＢＣ", "\x01?"]:
        assert not is_blank_text(text), repr(text)
        assert tok.encode(text) != [1, 2], repr(text)


def test_unk_id_override_used_for_unknown_words(small_vocab_file):
    tok = ErnieTokenizer.from_file(small_vocab_file, unk_token=3)
    assert tok.encode("zzz") == [1, 3, 2]


# ---------------------------------------------------------------------------------- vocab files
def test_one_token_per_line_vocab(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("[PAD]\n[CLS]\n[SEP]\n[MASK]\n[UNK]\nhello\nx\nhello\n", encoding="utf-8")
    vocab = load_vocab(path)
    assert vocab["[UNK]"] == 4 and vocab["x"] == 6 and vocab["hello"] == 7  # later duplicate wins
    assert ErnieTokenizer(vocab).encode("Hello") == [1, 7, 2]


def test_tab_vocab_duplicate_later_id_wins_and_vocab_size_is_max_id_plus_1(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("[PAD]\t0\n[CLS]\t1\n[SEP]\t2\n[MASK]\t3\n[UNK]\t4\n$\t5\n$\t9\n", encoding="utf-8")
    tok = ErnieTokenizer.from_file(path)
    assert tok.vocab["$"] == 9 and tok.vocab_size == 10 and tok.encode("$") == [1, 9, 2]


@pytest.mark.parametrize("content, problem", [
    ("[PAD]\t0\nhello\tone\n", r"v\.txt:2: id 'one' is not an integer"),
    ("[PAD]\t0\nhello\n", r"v\.txt:2: expected `token<TAB>id`"),
    ("[PAD]\t0\na\t1\t2\n", r"v\.txt:2: expected `token<TAB>id`"),
    ("[PAD]\nhello\t1\n", r"v\.txt:2: expected one token"),
    ("[PAD]\n\nhello\n", r"v\.txt:2: empty token"),
    ("[PAD]\t0\nx\t-1\n", r"v\.txt:2: negative id"),
    ("", r"empty vocab"),
])
def test_malformed_vocab_names_file_and_line(tmp_path, content, problem):
    path = tmp_path / "v.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(VocabError, match=problem):
        load_vocab(path)


def test_non_utf8_vocab_names_line(tmp_path):
    path = tmp_path / "v.txt"
    path.write_bytes(b"[PAD]\t0\n\xff\xfe\t1\n")
    with pytest.raises(VocabError, match=r"v\.txt:2: not UTF-8"):
        load_vocab(path)


# ------------------------------------------------------------------------------- demo vocab
TEXTS = ["一只黑猫 on the sofa.", "Two dogs playing", "two cats, 两只猫", "the the the"]


def test_build_vocab_layout_and_order_independence():
    tokens = build_vocab(TEXTS)
    assert tokens[:5] == list(SPECIAL_TOKENS)
    assert len(tokens) == len(set(tokens))
    assert {"一", "只", "黑", "猫", "两", "two", "dogs", "the", ".", ",", "##o", "s"} <= set(tokens)
    assert build_vocab(list(reversed(TEXTS))) == tokens


def test_build_vocab_min_freq_keeps_chars_for_rare_words(tmp_path):
    tokens = build_vocab(TEXTS, min_freq=2)
    assert "the" in tokens and "two" in tokens and "sofa" not in tokens
    path = tmp_path / "demo_vocab.txt"
    write_vocab(tokens, path)
    tok = ErnieTokenizer.from_file(path)
    assert tok.tokenize("sofa") == ["s", "##o", "##f", "##a"]  # rebuilt from seen characters
    for text in TEXTS + ["dogs on two sofas"]:
        assert "[UNK]" not in tok.tokenize(text), text
    assert tok.tokenize("zebra") == ["[UNK]"]  # "z" never seen


def test_write_vocab_round_trips_and_is_atomic(tmp_path):
    path = tmp_path / "vocab.txt"
    tokens = build_vocab(TEXTS)
    write_vocab(tokens, path)
    assert load_vocab(path) == {t: i for i, t in enumerate(tokens)}
    before = path.read_bytes()
    with pytest.raises(ValueError, match="duplicated"):
        write_vocab(["a", "b", "a"], path)
    with pytest.raises(ValueError, match="tab"):
        write_vocab(["a", "b\tc"], path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.txt"]  # no temp files left behind

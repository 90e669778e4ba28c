"""ERNIE text tokenizer: BERT-style basic tokenization + WordPiece, identical to the official release.

Official behaviour (ERNIE-ViL2 `utils/tokenizer.py`, FullTokenizer with lower-casing): drop control
chars, put spaces around CJK ideographs, lower-case, strip accents (NFD, drop Mn), split
punctuation, then greedy longest-match WordPiece with `##` continuations; a word longer than 100
chars or with an unmatched piece becomes one [UNK]. No full-width folding ("ＡＢＣ" -> [UNK]).
Ids are `[CLS] + ids[:max_seq_len - 2] + [SEP]`, padded with [PAD] to exactly 48 by the official
reader.

Special ids come from the vocab ([PAD]=0 [CLS]=1 [SEP]=2 [MASK]=3 [UNK]=39979 in the official
vocab). The official config also lists `unk_token: 17963`; the official code never uses it (its
WordPiece emits the string "[UNK]", which the vocab maps to 39979), so we look [UNK] up in the
vocab as well. Do not pass 17963 as an override.
"""
from __future__ import annotations

import functools
import os
import tempfile
import unicodedata
from collections import Counter
from typing import Iterable, Mapping, Sequence

import numpy as np

PAD, CLS, SEP, MASK, UNK = "[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"
SPECIAL_TOKENS = (PAD, CLS, SEP, MASK, UNK)  # build_vocab puts them at ids 0..4
OFFICIAL_MAX_SEQ_LEN = 48
MAX_WORD_CHARS = 100  # longer words become one [UNK] (official max_input_chars_per_word)


class VocabError(ValueError):
    """A vocab file that cannot be read; the message names FILE:LINE."""


# ---------------------------------------------------------------------------------------- vocab
def load_vocab(path) -> dict[str, int]:
    """Read a vocab: `token\\tid` lines (official format) or one token per line (id = line index).

    The format is decided by the first line. A duplicate token keeps its later id, as the official
    loader does (`$` is listed twice in the official vocab).
    """
    path = os.fspath(path)
    vocab: dict[str, int] = {}
    with_ids = None
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise VocabError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
            fields = line.split("\t")
            if with_ids is None:
                with_ids = len(fields) == 2
            if len(fields) != (2 if with_ids else 1):
                want = "`token<TAB>id`" if with_ids else "one token (no tab), like line 1"
                raise VocabError(f"{where}: expected {want}, got {line!r}")
            token = fields[0].strip()
            if not token:
                raise VocabError(f"{where}: empty token in {line!r}")
            if with_ids:
                try:
                    idx = int(fields[1])
                except ValueError:
                    raise VocabError(f"{where}: id {fields[1]!r} is not an integer") from None
                if idx < 0:
                    raise VocabError(f"{where}: negative id {idx}")
            else:
                idx = lineno - 1
            vocab[token] = idx
    if not vocab:
        raise VocabError(f"{path}: empty vocab file")
    return vocab


def write_vocab(tokens: Sequence[str], path) -> None:
    """Write `token\\tid` lines (id = position), atomically: a temp file then os.replace."""
    seen = set()
    for i, t in enumerate(tokens):
        if not t or t != t.strip() or any(c in t for c in "\t\r\n"):
            raise ValueError(f"token #{i} {t!r}: empty, padded, or contains a tab/newline")
        if t in seen:
            raise ValueError(f"token #{i} {t!r} is duplicated")
        seen.add(t)
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp_vocab_")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(f"{t}\t{i}\n" for i, t in enumerate(tokens))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build_vocab(texts: Iterable[str], min_freq: int = 1) -> list[str]:
    """A small vocab for demos: specials at 0..4, every CJK char, then the other words.

    Words (non-CJK BasicTokenizer tokens) need `min_freq` occurrences; every character seen in a
    word is added both alone and as a `##` continuation, so any word spelled with seen characters
    still tokenizes without [UNK]. Sorted by code point within each group, so the result does not
    depend on the order of `texts`.
    """
    basic = BasicTokenizer()
    counts = Counter(tok for text in texts for tok in basic.tokenize(text))
    cjk = {t for t in counts if len(t) == 1 and _is_cjk(ord(t))}
    words = {t for t, n in counts.items() if t not in cjk and (n >= min_freq or len(t) == 1)}
    chars = {c for t in counts if t not in cjk for c in t}
    pieces = (words | chars) - set(SPECIAL_TOKENS)
    return [*SPECIAL_TOKENS, *sorted(cjk), *sorted(pieces), *sorted("##" + c for c in chars)]


# ------------------------------------------------------------------------------ basic tokenizer
def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    # \t \n \r are categorised Cc but count as whitespace.
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    # All non-alphanumeric ASCII counts ("$", "^", "`" are not Unicode P* but are split anyway).
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    """CJK Unified Ideographs blocks only (not Hangul, Hiragana, Katakana), as in BERT."""
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class BasicTokenizer:
    """Clean, split CJK chars, lower-case, strip accents, split punctuation; returns words."""

    def __init__(self, do_lower_case: bool = True):
        self.do_lower_case = do_lower_case

    def tokenize(self, text: str) -> list[str]:
        text = _as_str(text)
        out = []
        for ch in text:  # clean control chars, normalise whitespace, space out CJK chars
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or _is_control(ch):
                continue
            if _is_whitespace(ch):
                out.append(" ")
            elif _is_cjk(cp):
                out.append(f" {ch} ")
            else:
                out.append(ch)
        words = []
        for word in "".join(out).split():
            if self.do_lower_case:
                word = _strip_accents(word.lower())
            words.extend(_split_on_punctuation(word))
        # Stripping accents can leave an empty or whitespace-bearing word: re-split like BERT.
        return " ".join(words).split()


def _strip_accents(word: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")


def _split_on_punctuation(word: str) -> list[str]:
    pieces, current = [], []
    for ch in word:
        if _is_punctuation(ch):
            if current:
                pieces.append("".join(current))
                current = []
            pieces.append(ch)
        else:
            current.append(ch)
    if current:
        pieces.append("".join(current))
    return pieces


class WordpieceTokenizer:
    """Greedy longest-match-first WordPiece over one word; results cached per word."""

    def __init__(self, vocab: Mapping[str, int], unk_token: str = UNK,
                 max_input_chars_per_word: int = MAX_WORD_CHARS, cache_size: int = 1 << 16):
        self.vocab = vocab
        self.unk_token = unk_token
        self.max_input_chars_per_word = max_input_chars_per_word
        self.tokenize = functools.lru_cache(maxsize=cache_size)(self._tokenize)

    def _tokenize(self, word: str) -> tuple[str, ...]:
        if len(word) > self.max_input_chars_per_word:
            return (self.unk_token,)
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
            else:  # no prefix of the rest matches: the whole word is unknown
                return (self.unk_token,)
            pieces.append(piece)
            start = end
        return tuple(pieces)


# ---------------------------------------------------------------------------- full tokenizer
class ErnieTokenizer:
    """Text -> ids for the ERNIE text tower, exactly as the official reader makes them.

    Special tokens are given as strings (looked up in the vocab) or as ids (used as they are),
    e.g. `ErnieTokenizer(vocab, pad_token=0, cls_token=1, sep_token=2, mask_token=3)` as in the
    official config. See the module docstring about the official (unused) unk_token id.
    """

    def __init__(self, vocab: Mapping[str, int], max_seq_len: int = OFFICIAL_MAX_SEQ_LEN,
                 cls_token: str | int = CLS, sep_token: str | int = SEP, pad_token: str | int = PAD,
                 unk_token: str | int = UNK, mask_token: str | int = MASK, do_lower_case: bool = True):
        if not vocab:
            raise ValueError("empty vocab")
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2 (room for [CLS] and [SEP]), got {max_seq_len}")
        self.vocab = dict(vocab)
        self.max_seq_len = int(max_seq_len)
        self.cls_id = self._special_id("cls_token", cls_token)
        self.sep_id = self._special_id("sep_token", sep_token)
        self.pad_id = self._special_id("pad_token", pad_token)
        self.unk_id = self._special_id("unk_token", unk_token)
        self.mask_id = self._special_id("mask_token", mask_token)
        self.unk_token = unk_token if isinstance(unk_token, str) else UNK
        self.basic = BasicTokenizer(do_lower_case)
        self.wordpiece = WordpieceTokenizer(self.vocab, self.unk_token)
        self._word_ids = functools.lru_cache(maxsize=1 << 16)(self._word_ids_uncached)
        self._inv_vocab = None

    @classmethod
    def from_file(cls, path, **kw) -> "ErnieTokenizer":
        return cls(load_vocab(path), **kw)

    def _special_id(self, name: str, token: str | int) -> int:
        if isinstance(token, (int, np.integer)) and not isinstance(token, bool):
            if token < 0:
                raise ValueError(f"{name}: id must be >= 0, got {token}")
            return int(token)
        if token not in self.vocab:
            raise ValueError(f"{name} {token!r} is not in the vocab; give it as an id instead")
        return self.vocab[token]

    @property
    def vocab_size(self) -> int:
        """Rows the embedding needs: max id + 1 (duplicates can leave holes, so not len(vocab))."""
        return max(self.vocab.values()) + 1

    def tokenize(self, text: str) -> list[str]:
        return [p for w in self.basic.tokenize(text) for p in self.wordpiece.tokenize(w)]

    def _word_ids_uncached(self, word: str) -> tuple[int, ...]:
        return tuple(self.unk_id if p == self.unk_token else self.vocab[p]
                     for p in self.wordpiece.tokenize(word))

    def encode(self, text: str) -> list[int]:
        """[CLS] + wordpiece ids truncated to max_seq_len - 2 + [SEP]; no padding."""
        ids = [i for w in self.basic.tokenize(text) for i in self._word_ids(w)]
        return [self.cls_id, *ids[: self.max_seq_len - 2], self.sep_id]

    def batch_encode(self, texts: Sequence[str], padding: str = "max_length") -> np.ndarray:
        """int64 [B, L] padded with pad id; L = max_seq_len (official) or the longest in the batch."""
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
        encoded = [self.encode(t) for t in texts]
        width = self.max_seq_len if padding == "max_length" else max(map(len, encoded), default=0)
        out = np.full((len(encoded), width), self.pad_id, dtype=np.int64)
        for row, ids in zip(out, encoded):
            row[: len(ids)] = ids
        return out

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        if self._inv_vocab is None:
            self._inv_vocab = {i: t for t, i in self.vocab.items()}
        return [self._inv_vocab.get(int(i), self.unk_token) for i in ids]


def _as_str(text) -> str:
    if isinstance(text, str):
        return text
    if isinstance(text, bytes):  # the official reader decodes bytes as UTF-8, ignoring errors
        return text.decode("utf-8", "ignore")
    raise TypeError(f"text must be str or bytes, got {type(text).__name__}")

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
    """Write `token\\tid` lines (id = position), atomically."""
    # Imported here: this module is also copied alone into export folders, which never write one.
    from .fileio import atomic_write

    seen = set()
    for i, t in enumerate(tokens):
        if not t or t != t.strip() or any(c in t for c in "\t\r\n"):
            raise ValueError(f"token #{i} {t!r}: empty, padded, or contains a tab/newline")
        if t in seen:
            raise ValueError(f"token #{i} {t!r} is duplicated")
        seen.add(t)
    with atomic_write(path, newline="\n") as f:
        f.writelines(f"{t}\t{i}\n" for i, t in enumerate(tokens))


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


_BLANK_CHECK = BasicTokenizer()


def is_blank_text(text) -> bool:
    """True when the text has no word for the tokenizer: only spaces, control or format characters
    (zero-width spaces, bidi marks, NUL, U+FFFD...) or lone accents. Such a caption is embedded as
    bare [CLS][SEP], so it is as empty as a caption of only spaces."""
    return not _BLANK_CHECK.tokenize(text)


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

    Special tokens are given as strings (looked up in the vocab) or as ids, e.g.
    `ErnieTokenizer(vocab, pad_token=0, cls_token=1, sep_token=2, mask_token=3)` as in the
    official config. An id given for [PAD]/[CLS]/[SEP]/[MASK] must be that token's id in the
    vocab: a vocab without them (or with other ids) would shift every id and silently change the
    text embeddings. A special id may not be shared with another token. The unk id is not checked
    (see the module docstring). `source` names the vocab in errors (from_file gives the path).
    """

    def __init__(self, vocab: Mapping[str, int], max_seq_len: int = OFFICIAL_MAX_SEQ_LEN,
                 cls_token: str | int = CLS, sep_token: str | int = SEP, pad_token: str | int = PAD,
                 unk_token: str | int = UNK, mask_token: str | int = MASK, do_lower_case: bool = True,
                 source: str | None = None):
        self.source = os.fspath(source) if source is not None else "vocab"
        if not vocab:
            raise VocabError(f"{self.source}: empty vocab")
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2 (room for [CLS] and [SEP]), got {max_seq_len}")
        self.vocab = dict(vocab)
        self.max_seq_len = int(max_seq_len)
        self.cls_id = self._special_id("cls_token", cls_token, CLS)
        self.sep_id = self._special_id("sep_token", sep_token, SEP)
        self.pad_id = self._special_id("pad_token", pad_token, PAD)
        self.unk_id = self._special_id("unk_token", unk_token, None)
        self.mask_id = self._special_id("mask_token", mask_token, MASK)
        self._check_special_ids_unshared()
        self.unk_token = unk_token if isinstance(unk_token, str) else UNK
        self.basic = BasicTokenizer(do_lower_case)
        self.wordpiece = WordpieceTokenizer(self.vocab, self.unk_token)
        self._word_ids = functools.lru_cache(maxsize=1 << 16)(self._word_ids_uncached)
        self._inv_vocab = None

    @classmethod
    def from_file(cls, path, **kw) -> "ErnieTokenizer":
        return cls(load_vocab(path), source=os.fspath(path), **kw)

    def _special_id(self, name: str, token: str | int, expected: str | None) -> int:
        """The id of a special token; `expected` is the vocab token an id must belong to."""
        if isinstance(token, (int, np.integer)) and not isinstance(token, bool):
            if token < 0:
                raise ValueError(f"{name}: id must be >= 0, got {token}")
            token = int(token)
            if expected is not None and self.vocab.get(expected) != token:
                found = (f"{expected} has id {self.vocab[expected]}" if expected in self.vocab
                         else f"no {expected} token")
                raise VocabError(f"{self.source}: {found} but the config says {name} {token} "
                                 f"(a vocab for this model has {expected} at id {token})")
            return token
        if token not in self.vocab:
            raise VocabError(f"{self.source}: {name} {token!r} is not in the vocab")
        return self.vocab[token]

    def _check_special_ids_unshared(self) -> None:
        special = {self.pad_id: "pad_token", self.cls_id: "cls_token", self.sep_id: "sep_token",
                   self.mask_id: "mask_token"}
        owners = {}
        for token, idx in self.vocab.items():
            if idx in special:
                owners.setdefault(idx, []).append(token)
        for idx, tokens in owners.items():
            if len(tokens) > 1:
                raise VocabError(f"{self.source}: id {idx} ({special[idx]}) is shared by "
                                 f"{', '.join(map(repr, tokens[:3]))}")

    @property
    def vocab_size(self) -> int:
        """Rows the embedding needs: max id + 1 (duplicates can leave holes, so not len(vocab))."""
        return self.max_id + 1

    @property
    def max_id(self) -> int:
        """The largest id in the vocab or among the special ids."""
        return max(max(self.vocab.values()), self.cls_id, self.sep_id, self.pad_id, self.unk_id,
                   self.mask_id)

    def check_embedding_rows(self, rows: int, what: str = "the text tower") -> None:
        """VocabError unless every id fits an embedding table of `rows` rows."""
        if self.max_id >= rows:
            raise VocabError(f"{self.source}: ids go up to {self.max_id} but {what} has only "
                             f"{rows} token embeddings (vocab_size {rows}); wrong vocab or text config?")

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

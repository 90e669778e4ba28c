"""Read and write the retrieval embeddings file that inference writes and eval_retri.py reads.

Format (the official run_infer.py output): one line per input line, in input order::

    <D text floats, space-separated> \\t <D image floats> \\t <int>

The official writes the constant ``1`` in column 3; we write the 1-based input line number, so a
file can be mapped back to its TSV. The reader accepts both.

Floats are written exactly as ``str(np.float32(x))`` prints them (what the official does), and
parsed exactly as the official reads them: decimal -> float64 (correctly rounded, like
``float()``) -> float32. Parsing and formatting are vectorised with NumPy (no per-float Python
call on the common path), because a 10k-line file holds 15 million floats.

A binary sidecar ``FILE.npz`` (written next to the text file) holds the same arrays plus the text
file's size and a hash of its first and last 64 KiB; ``read_embeddings`` uses it only when both
still match, so a text file rewritten by another tool is never shadowed by a stale sidecar.
"""
from __future__ import annotations

import collections
import hashlib
import os
import threading
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

__all__ = [
    "EmbeddingFile",
    "EmbeddingFormatError",
    "StaleSidecarWarning",
    "read_embeddings",
    "write_embeddings",
    "write_sidecar",
    "sidecar_path",
    "format_float32_rows",
    "image_ids_from_tsv",
    "read_id_list",
]

SIDECAR_SUFFIX = ".npz"
SIDECAR_VERSION = 1
FINGERPRINT_BYTES = 64 * 1024  # hashed at each end of the text file
READ_BLOCK_BYTES = 1 << 20  # ~1 MiB of whole lines per vectorised parse (temporaries stay small)
WRITE_BLOCK_ROWS = 64  # rows formatted per vectorised call


class EmbeddingFormatError(ValueError):
    """A malformed embeddings (or id / TSV) file; the message starts with ``FILE:LINE:``."""


class StaleSidecarWarning(UserWarning):
    """A ``.npz`` sidecar exists but no longer matches its text file, so it was ignored."""


@dataclass(frozen=True)
class EmbeddingFile:
    text: np.ndarray  # float32 [N, D]
    image: np.ndarray  # float32 [N, D]
    line_numbers: np.ndarray  # int64 [N]: column 3 (official: all 1; ours: 1-based input line)
    source: str = "text"  # "text" (parsed) or "sidecar" (loaded from FILE.npz)

    @property
    def num_lines(self) -> int:
        return int(self.text.shape[0])

    @property
    def dim(self) -> int:
        return int(self.text.shape[1])

    @property
    def has_official_ids(self) -> bool:
        """True when column 3 is the official constant 1 on every line (no line numbers)."""
        return bool(self.num_lines) and bool(np.all(self.line_numbers == 1))


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------

def read_embeddings(path, use_sidecar: bool = True, workers: int | None = None) -> EmbeddingFile:
    """Read an embeddings file; use ``path + ".npz"`` instead when it matches the text file.

    ``workers``: parsing threads (default min(4, CPUs)).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such embeddings file")
    if use_sidecar:
        cached = _load_fresh_sidecar(path)
        if cached is not None:
            return cached
    return _parse_text_file(path, workers)


def _parse_text_file(path: str, workers: int | None = None) -> EmbeddingFile:
    """Parse blocks of lines on a few threads (NumPy releases the GIL inside its loops); blocks
    are read in order and each one is written straight into its rows of the output arrays."""
    size = os.path.getsize(path)
    workers = max(1, workers or min(4, os.cpu_count() or 1))
    local = threading.local()
    builder = None

    def parse_into(buf, row0, first_line_no, n_lines):
        parser = getattr(local, "parser", None)
        if parser is None:
            parser = local.parser = _TokenParser()
        parsed = _parse_block_fast(buf, builder.dim, n_lines, parser)
        if parsed is None:  # unusual layout or a bad line: the line-by-line path decides
            parsed = _parse_block_lines(buf, builder.dim, path, first_line_no)
        builder.write(row0, *parsed)

    line_no = 1  # 1-based number of the first line of the next block
    pending = collections.deque()
    with open(path, "rb") as f, ThreadPoolExecutor(workers) as pool:
        try:
            for buf in _line_blocks(f):
                if builder is None:
                    builder = _ArrayBuilder(_dim_from_first_line(buf, path),
                                            _estimate_lines(buf, size))
                n_lines = buf.count(b"\n")
                if not builder.fits(n_lines):  # grow only while no block is being written
                    _drain(pending, 0)
                row0 = builder.reserve(n_lines)
                pending.append(pool.submit(parse_into, buf, row0, line_no, n_lines))
                _drain(pending, 2 * workers)  # bounded read-ahead
                line_no += n_lines
            _drain(pending, 0)  # in file order, so the first bad line is the one reported
        finally:
            for fut in pending:
                fut.cancel()
    if builder is None:
        raise EmbeddingFormatError(f"{path}:1: empty file (no embedding lines)")
    return builder.result()


def _drain(pending, keep: int) -> None:
    while len(pending) > keep:
        pending.popleft().result()


def _line_blocks(f):
    """Yield ~READ_BLOCK_BYTES chunks of whole lines, each ending with b"\\n" (BOM removed)."""
    first = True
    while True:
        buf = f.read(READ_BLOCK_BYTES)
        if not buf:
            return
        if not buf.endswith(b"\n"):
            buf += f.readline()
            if not buf.endswith(b"\n"):  # last line without a newline
                buf += b"\n"
        if first:
            first = False
            if buf.startswith(b"\xef\xbb\xbf"):
                buf = buf[3:]
        yield buf


def _estimate_lines(first_block: bytes, file_size: int) -> int:
    n = max(first_block.count(b"\n"), 1)
    return int(file_size / (len(first_block) / n) * 1.02) + 8


class _ArrayBuilder:
    """Growable output arrays; blocks reserve their rows in file order, then fill them."""

    def __init__(self, dim: int, capacity: int):
        self.dim = dim
        self.n = 0
        self.text = np.empty((capacity, dim), np.float32)
        self.image = np.empty((capacity, dim), np.float32)
        self.ids = np.empty(capacity, np.int64)

    def fits(self, k: int) -> bool:
        return self.n + k <= len(self.ids)

    def reserve(self, k: int) -> int:
        if not self.fits(k):
            cap = max(int(len(self.ids) * 1.25), self.n + k)
            self.text = _grow(self.text, cap, self.n)
            self.image = _grow(self.image, cap, self.n)
            self.ids = _grow(self.ids, cap, self.n)
        row0 = self.n
        self.n += k
        return row0

    def write(self, row0: int, values: np.ndarray, ids: np.ndarray) -> None:
        k, d = len(ids), self.dim
        self.text[row0:row0 + k] = values[:, :d]  # float64 -> float32, like the official
        self.image[row0:row0 + k] = values[:, d:2 * d]
        self.ids[row0:row0 + k] = ids

    def result(self) -> EmbeddingFile:
        n = self.n
        trim = (lambda a: a[:n].copy()) if n < 0.95 * len(self.ids) else (lambda a: a[:n])
        return EmbeddingFile(trim(self.text), trim(self.image), trim(self.ids), "text")


def _grow(a: np.ndarray, cap: int, used: int) -> np.ndarray:
    out = np.empty((cap,) + a.shape[1:], a.dtype)
    out[:used] = a[:used]
    return out


def _dim_from_first_line(buf: bytes, path: str) -> int:
    line = buf[:buf.index(b"\n")]
    cols = line.rstrip(b"\r").split(b"\t")
    if len(cols) != 3:
        raise EmbeddingFormatError(_columns_problem(path, 1, cols))
    n_text, n_image = len(cols[0].split()), len(cols[1].split())
    if n_text == 0:
        raise EmbeddingFormatError(f"{path}:1: column 1 (text embedding) is empty")
    if n_text != n_image:
        raise EmbeddingFormatError(
            f"{path}:1: text embedding has {n_text} floats but image embedding has {n_image}")
    return n_text


def _columns_problem(path, line_no, cols) -> str:
    if len(cols) == 1 and not cols[0].strip():
        return f"{path}:{line_no}: empty line"
    return (f"{path}:{line_no}: expected 3 tab-separated columns (text floats, image floats, id), "
            f"found {len(cols)}")


def _parse_block_lines(buf: bytes, dim: int, path: str, first_line_no: int):
    """Line-by-line parse with precise errors; also handles CRLF, repeated spaces, exponents."""
    lines = buf.split(b"\n")[:-1]
    values = np.empty((len(lines), 2 * dim), np.float64)
    ids = np.empty(len(lines), np.int64)
    for i, line in enumerate(lines):
        line_no = first_line_no + i
        cols = line.rstrip(b"\r").split(b"\t")
        if len(cols) != 3:
            raise EmbeddingFormatError(_columns_problem(path, line_no, cols))
        for c, name in ((0, "text"), (1, "image")):
            toks = cols[c].split()
            if len(toks) != dim:
                raise EmbeddingFormatError(
                    f"{path}:{line_no}: column {c + 1} ({name} embedding) has {len(toks)} floats, "
                    f"expected {dim} like line 1")
            try:
                row = np.array([float(t) for t in toks], np.float64)
            except ValueError:
                j = _first_bad_float(toks)
                raise EmbeddingFormatError(
                    f"{path}:{line_no}: column {c + 1} value {j + 1}: "
                    f"{toks[j].decode('utf-8', 'replace')!r} is not a number") from None
            if not np.all(np.isfinite(row)):
                j = int(np.flatnonzero(~np.isfinite(row))[0])
                raise EmbeddingFormatError(
                    f"{path}:{line_no}: column {c + 1} value {j + 1}: "
                    f"{toks[j].decode('utf-8', 'replace')!r} is not a finite number")
            values[i, c * dim:(c + 1) * dim] = row
        try:
            ids[i] = int(cols[2])
        except ValueError:
            raise EmbeddingFormatError(
                f"{path}:{line_no}: column 3 must be an integer (the official writes 1, we write "
                f"the input line number), found {cols[2].decode('utf-8', 'replace')!r}") from None
    return values, ids


def _first_bad_float(toks) -> int:
    for j, t in enumerate(toks):
        try:
            float(t)
        except ValueError:
            return j
    return 0


# --- vectorised parsing -----------------------------------------------------------------------
# A token's last 16 bytes are loaded as two little-endian uint64 words (the last byte of the
# token is the top byte of the second word). Its digits, right-aligned and padded with ASCII '0',
# become an integer with the SWAR "eight digits at once" trick, and value = mantissa / 10**k is
# one correctly rounded float64 division of two exact numbers (mantissa < 10**15), i.e. exactly
# float(token). Embedding values are almost all "[-]0.ddddddd": for those the digits after the
# dot ARE the mantissa, so only the token bytes need masking. Other plain decimals go through a
# general path that squeezes the dot out with bit masks; anything else (exponents, 'nan',
# > 15 digits, garbage) through float() per token.

_U64 = np.uint64
_ALL = _U64(0xFFFFFFFFFFFFFFFF)
_ASCII_ZEROS = _U64(0x3030303030303030)
_M7F = _U64(0x7F7F7F7F7F7F7F7F)
_DOTS = _U64(0x2E2E2E2E2E2E2E2E)
_MF0 = _U64(0xF0F0F0F0F0F0F0F0)
_M06 = _U64(0x0606060606060606)
_M33 = _U64(0x3333333333333333)
_LOW_BYTES = _U64(0x000000FF000000FF)
_MUL_100 = _U64(100 + (1000000 << 32))
_MUL_1 = _U64(1 + (10000 << 32))
_ONE, _FOUR, _SEVEN, _EIGHT = _U64(1), _U64(4), _U64(7), _U64(8)
_TEN, _SIXTEEN, _THIRTYTWO, _FIFTYSIX = _U64(10), _U64(16), _U64(32), _U64(56)
_HUNDRED_MILLION = _U64(100000000)
_POW10 = 10.0 ** np.arange(23)  # exact in float64
_PAD = 16


def _word_views(padded: np.ndarray):
    """words[i] = the 8 bytes padded[i:i+8] as a little-endian uint64 (unaligned view)."""
    return np.ndarray(shape=(len(padded) - 7,), dtype="<u8", buffer=padded, strides=(1,))


def _top_bytes(j):
    """Mask of the top j bytes of a word (j: uint64 array in 0..8; shifts >= 64 give 0)."""
    return _ALL << ((_EIGHT - j) * _EIGHT)


def _digits_value(w0, w1, n_digits):
    """(value of the last n_digits bytes of the 16-byte window w0|w1, all those bytes digits)."""
    nd = np.clip(n_digits, 0, 16).astype(np.uint64)
    keep1 = _top_bytes(np.minimum(nd, _EIGHT))
    keep0 = _top_bytes(np.maximum(nd, _EIGHT) - _EIGHT)
    w0 = ((w0 ^ _ASCII_ZEROS) & keep0) ^ _ASCII_ZEROS
    w1 = ((w1 ^ _ASCII_ZEROS) & keep1) ^ _ASCII_ZEROS
    ok = _all_digits(w0) & _all_digits(w1)
    return _swar_8_digits(w0) * _HUNDRED_MILLION + _swar_8_digits(w1), ok


def _swar_8_digits(w):
    """8 ASCII digits (first digit in the lowest byte) -> their integer value."""
    v = w - _ASCII_ZEROS
    v = v * _TEN + (v >> _EIGHT)
    return (((v & _LOW_BYTES) * _MUL_100) + (((v >> _SIXTEEN) & _LOW_BYTES) * _MUL_1)) >> _THIRTYTWO


def _all_digits(w):
    return ((w & _MF0) | (((w + _M06) & _MF0) >> _FOUR)) == _M33


def _zero_bytes(x):
    """0x80 in each byte of x that is 0x00 (exact, no false positives)."""
    y = (x & _M7F) + _M7F
    return ~(y | x | _M7F)


def _parse_general(padded: np.ndarray, ends: np.ndarray, lengths: np.ndarray):
    """Any [-+]?digits[.digits] token of <= 16 bytes and <= 15 digits: (values, ok)."""
    words = _word_views(padded)
    w0, w1 = words[ends], words[8:][ends]
    ln = np.minimum(lengths, 16).astype(np.uint64)
    tok1 = _top_bytes(np.minimum(ln, _EIGHT))
    tok0 = _top_bytes(np.maximum(ln, _EIGHT) - _EIGHT)
    d0 = _zero_bytes(w0 ^ _DOTS) & tok0  # 0x80 on each '.' byte of the token
    d1 = _zero_bytes(w1 ^ _DOTS) & tok1
    n_dots = np.bitwise_count(d0) + np.bitwise_count(d1)
    in1, in0 = -(d1 != 0).astype(np.uint64), -(d0 != 0).astype(np.uint64)
    # bytes above the dot stay, bytes below it (the integer part) move up one byte
    hi1 = ~((d1 << _ONE) - _ONE) | ~in1
    lo1 = ((d1 >> _SEVEN) - _ONE) & in1
    hi0 = (~((d0 << _ONE) - _ONE) | ~in0) & ~in1
    lo0 = in1 | (((d0 >> _SEVEN) - _ONE) & in0)
    has_dot = n_dots > 0
    frac_digits = ((np.bitwise_count(hi1 & tok1) + np.bitwise_count(hi0 & tok0)) >> 3) * has_dot
    low0 = w0 & lo0
    m0 = (low0 << _EIGHT) | (w0 & hi0)
    m1 = ((w1 & lo1) << _EIGHT) | (w1 & hi1) | (low0 >> _FIFTYSIX)
    first = padded[_PAD:][ends - lengths]
    negative = first == 45  # '-'
    n_digits = lengths - (negative | (first == 43)) - has_dot  # '+'
    mantissa, ok = _digits_value(m0, m1, n_digits)
    ok &= (lengths <= 16) & (n_dots <= 1) & (n_digits >= 1) & (n_digits <= 15)
    values = mantissa.astype(np.float64) / np.take(_POW10, np.minimum(frac_digits, 22))
    values[negative] *= -1.0
    return values, ok


class _TokenParser:
    """Parser for "[-]0.ddd" tokens with scratch buffers reused across blocks: every NumPy op
    writes into an existing array (fresh temporaries would page-fault on every block)."""

    def __init__(self):
        self.capacity = 0

    def _reserve(self, n: int) -> None:
        if n > self.capacity:
            cap = int(n * 1.25) + 1024
            self.u = [np.empty(cap, np.uint64) for _ in range(5)]
            self.i = [np.empty(cap, np.int64) for _ in range(2)]
            self.b = [np.empty(cap, bool) for _ in range(3)]
            self.f = np.empty(cap, np.float64)
            self.capacity = cap

    def parse(self, padded: np.ndarray, ends: np.ndarray, lengths: np.ndarray):
        """Values of the tokens ending (exclusive) at ``ends`` (indices into ``padded[_PAD:]``).

        Returns (float64 values, ok); ok is False where the token needs float(). The arrays
        are scratch buffers, valid until the next call.
        """
        n = len(ends)
        self._reserve(n)
        w0, w1, mask, x, y = (u[:n] for u in self.u)
        k, pos = (q[:n] for q in self.i)
        negative, ok, tmp = (q[:n] for q in self.b)
        b = padded[_PAD:]
        # k = digits after "0." (or "-0."), if the token has that shape
        np.subtract(ends, lengths, out=pos)
        np.take(b, pos, out=x.view(np.uint8)[:n])  # first byte
        np.equal(x.view(np.uint8)[:n], 45, out=negative)  # '-'
        np.subtract(lengths, 2, out=k)
        np.subtract(k, negative, out=k)
        np.subtract(ends, k, out=pos)
        pos -= 1
        np.take(b, pos, out=x.view(np.uint8)[:n])
        np.equal(x.view(np.uint8)[:n], 46, out=ok)  # '.' right before the k digits
        pos -= 1
        np.take(b, pos, out=x.view(np.uint8)[:n])
        np.equal(x.view(np.uint8)[:n], 48, out=tmp)  # '0' before it
        ok &= tmp
        np.greater_equal(k, 1, out=tmp)
        ok &= tmp
        np.less_equal(k, 15, out=tmp)
        ok &= tmp
        np.clip(k, 0, 15, out=k)
        words = _word_views(padded)
        np.take(words, ends, out=w0)  # bytes [end-16, end-8) of the token's window
        np.take(words[8:], ends, out=w1)  # bytes [end-8, end)
        ku = k.view(np.uint64)
        for w, second in ((w1, True), (w0, False)):  # keep the k digits, '0' above them
            if second:
                np.minimum(ku, _EIGHT, out=mask)
            else:
                np.maximum(ku, _EIGHT, out=mask)
                mask -= _EIGHT
            np.subtract(_EIGHT, mask, out=mask)
            mask *= _EIGHT
            np.left_shift(_ALL, mask, out=mask)
            w ^= _ASCII_ZEROS
            w &= mask
            w ^= _ASCII_ZEROS
            np.bitwise_and(w, _MF0, out=x)  # all 8 bytes ASCII digits?
            np.add(w, _M06, out=y)
            y &= _MF0
            y >>= _FOUR
            x |= y
            np.equal(x, _M33, out=tmp)
            ok &= tmp
            w -= _ASCII_ZEROS  # SWAR: 8 digits -> integer
            np.right_shift(w, _EIGHT, out=x)
            w *= _TEN
            w += x
            np.right_shift(w, _SIXTEEN, out=x)
            x &= _LOW_BYTES
            x *= _MUL_1
            w &= _LOW_BYTES
            w *= _MUL_100
            w += x
            w >>= _THIRTYTWO
        w0 *= _HUNDRED_MILLION
        w0 += w1
        values = self.f[:n]
        np.copyto(values, w0, casting="unsafe")  # exact: < 10**15
        values /= np.take(_POW10, k)
        values[negative] *= -1.0  # exact; keeps -0.0
        if not ok.all():  # other plain decimals ("1.0", "12", ".5"): the general path
            rest = np.flatnonzero(~ok)
            values[rest], ok[rest] = _parse_general(padded, ends[rest], lengths[rest])
        return values, ok


def _parse_block_fast(buf: bytes, dim: int, n_lines: int, parser: _TokenParser):
    """Parse a block whose lines are all exactly ``D floats \\t D floats \\t int`` with single
    spaces. Returns (values float64 [L, 2D], ids int64 [L]) or None to use the line path."""
    per_line = 2 * dim + 1
    padded = np.empty(len(buf) + _PAD, np.uint8)
    padded[:_PAD] = 32
    padded[_PAD:] = np.frombuffer(buf, np.uint8)
    b = padded[_PAD:]
    ends = np.flatnonzero(b <= 32)
    if len(ends) != n_lines * per_line or np.count_nonzero(b < 32) != 3 * n_lines:
        return None
    lengths = np.diff(ends, prepend=-1)
    lengths -= 1
    if lengths.min() < 1:
        return None
    grid = ends.reshape(n_lines, per_line)
    if not (np.all(b[grid[:, dim - 1]] == 9) and np.all(b[grid[:, 2 * dim - 1]] == 9)
            and np.all(b[grid[:, 2 * dim]] == 10)):
        return None
    values, ok = parser.parse(padded, ends, lengths)
    values = values.reshape(n_lines, per_line)[:, :2 * dim]
    ok = ok.reshape(n_lines, per_line)[:, :2 * dim]
    if not ok.all():  # e.g. 1e-05: exact float() on just those tokens
        rows, cols = np.nonzero(~ok)
        starts = grid[rows, cols] - lengths.reshape(n_lines, per_line)[rows, cols]
        try:
            fixed = [float(buf[s:e]) for s, e in zip(starts.tolist(), grid[rows, cols].tolist())]
        except ValueError:
            return None
        if not np.all(np.isfinite(fixed)):
            return None
        values[rows, cols] = fixed
    id_ends = grid[:, 2 * dim]
    id_starts = id_ends - lengths[2 * dim::per_line]
    try:
        ids = np.array([int(buf[s:e]) for s, e in zip(id_starts.tolist(), id_ends.tolist())],
                       np.int64)
    except ValueError:
        return None
    return values, ids


# ----------------------------------------------------------------------------------------------
# sidecar
# ----------------------------------------------------------------------------------------------

def sidecar_path(path) -> str:
    return os.fspath(path) + SIDECAR_SUFFIX


def _fingerprint(path: str) -> tuple[int, str]:
    """(size, sha256 of size + first and last 64 KiB): cheap, and changes on any rewrite that
    changes the length or either end of the file."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            f.seek(max(size - FINGERPRINT_BYTES, FINGERPRINT_BYTES))
            h.update(f.read())
    return size, h.hexdigest()


def write_sidecar(path, emb: EmbeddingFile) -> str:
    """Write ``path + ".npz"`` for the text file at ``path`` (which must already be final)."""
    path = os.fspath(path)
    size, digest = _fingerprint(path)
    out = sidecar_path(path)
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, text=np.ascontiguousarray(emb.text, np.float32),
                     image=np.ascontiguousarray(emb.image, np.float32),
                     line_numbers=np.asarray(emb.line_numbers, np.int64),
                     source_size=np.int64(size), source_sha256=np.str_(digest),
                     version=np.int64(SIDECAR_VERSION))
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def _load_fresh_sidecar(path: str):
    sc = sidecar_path(path)
    if not os.path.isfile(sc):
        return None
    try:
        with np.load(sc, allow_pickle=False) as z:
            if int(z["version"]) != SIDECAR_VERSION:
                raise ValueError(f"version {int(z['version'])}")
            size, digest = _fingerprint(path)
            if int(z["source_size"]) != size or str(z["source_sha256"]) != digest:
                warnings.warn(f"{sc}: ignoring stale sidecar ({path} has changed since it was "
                              f"written); parsing the text file", StaleSidecarWarning, stacklevel=3)
                return None
            text, image, ids = z["text"], z["image"], z["line_numbers"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        warnings.warn(f"{sc}: ignoring unreadable sidecar ({e}); parsing the text file",
                      StaleSidecarWarning, stacklevel=3)
        return None
    if (text.dtype != np.float32 or text.ndim != 2 or text.shape != image.shape
            or ids.shape != (text.shape[0],)):
        warnings.warn(f"{sc}: ignoring sidecar with inconsistent arrays", StaleSidecarWarning,
                      stacklevel=3)
        return None
    return EmbeddingFile(text, image, ids.astype(np.int64, copy=False), "sidecar")


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------

def write_embeddings(path, text, image, line_numbers=None, sidecar: bool = True) -> None:
    """Write the embeddings file atomically (temp file + os.replace), then its sidecar.

    ``line_numbers`` defaults to 1..N (our convention); pass ``np.ones(N)`` for the official 1s.
    """
    path = os.fspath(path)
    text = np.asarray(text, np.float32)
    image = np.asarray(image, np.float32)
    if text.ndim != 2 or text.shape != image.shape:
        raise ValueError(f"text {text.shape} and image {image.shape} must both be [N, D]")
    n = text.shape[0]
    ids = (np.arange(1, n + 1, dtype=np.int64) if line_numbers is None
           else np.asarray(line_numbers, np.int64))
    if ids.shape != (n,):
        raise ValueError(f"line_numbers has shape {ids.shape}, expected ({n},)")
    old_sidecar = sidecar_path(path)
    if os.path.exists(old_sidecar):  # never leave a sidecar describing the previous file
        os.remove(old_sidecar)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            for a in range(0, n, WRITE_BLOCK_ROWS):
                b = min(n, a + WRITE_BLOCK_ROWS)
                rows = format_float32_rows(np.concatenate([text[a:b], image[a:b]], axis=1),
                                           tab_after=text.shape[1])
                f.write(b"".join(r + b"\t%d\n" % i for r, i in zip(rows, ids[a:b].tolist())))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if sidecar:
        write_sidecar(path, EmbeddingFile(text, image, ids))


# --- vectorised str(np.float32) ---------------------------------------------------------------
# numpy prints a float32 with the fewest significant digits p that read back to the same float32
# (Dragon4, "unique" mode), positional for 1e-4 <= |x| < 1e16. For the values embeddings have
# (1e-4 <= |x| < 1) we find p with float64 arithmetic: c_p = x rounded to p significant digits
# round-trips iff it lies strictly inside x's float32 rounding interval. Values where float64
# rounding could decide a comparison, powers of two (asymmetric interval) and all other ranges
# use str() itself, so the output is always exactly str(np.float32(x)).

# _T4[i] = the 4 ASCII digits of i (zero-padded, first digit in the lowest byte) as a uint32
_T4 = sum((48 + np.arange(10000, dtype=np.uint32) // 10 ** (3 - k) % 10) << np.uint32(8 * k)
          for k in range(4)).astype(np.uint32)
_POW10_NEG = 10.0 ** -np.arange(0, 40, dtype=np.float64)  # 10**-k, for finding exponents
_REC = 16  # record per value: byte 0 = separator before it, value right-aligned in bytes 1..15
_FIRST_TRY = 7  # most float32 embedding values need 7 or 8 significant digits


def _shortest_digits(x: np.ndarray, v32: np.ndarray):
    """For x = |v32| in [1e-4, 1): (d, s, sure) with str = '0.' + d zero-padded to s digits.

    ``sure`` is False where float64 rounding could have decided a comparison (str() is used).
    """
    e10 = np.floor(np.log10(x)).astype(np.int64)
    e10 -= x < np.take(_POW10_NEG, -e10)  # fix log10 rounding at powers of ten
    e10 += x >= np.take(_POW10_NEG, -e10 - 1)
    sure = np.abs(x / np.take(_POW10_NEG, -e10) - 1.0) > 1e-12
    lo = np.nextafter(v32, np.float32(0)).astype(np.float64)
    lo += x
    lo *= 0.5  # rounding interval of v32: (lo, hi), exact in float64
    hi = np.nextafter(v32, np.float32(np.inf)).astype(np.float64)
    hi += x
    hi *= 0.5

    def attempt(idx, p):
        """(d, inside) for x[idx] rounded to p significant digits; updates ``sure``."""
        full = idx is None
        xs, es = (x, e10) if full else (x[idx], e10[idx])
        los, his = (lo, hi) if full else (lo[idx], hi[idx])
        scale = np.take(_POW10, p - 1 - es)
        y = xs * scale
        d = np.rint(y)
        c = d / scale
        guard = c * 2.0 ** -48
        ok = np.abs(y - np.floor(y) - 0.5) > 2.0 ** -20  # not a near-tie when rounding to p
        ok &= np.abs(c - los) > guard
        ok &= np.abs(c - his) > guard
        if full:
            np.logical_and(sure, ok, out=sure)
        else:
            sure[idx] &= ok
        return d, (c > los) & (c < his)

    # p digits round-trip => p + 1 digits do too; float32 always round-trips with 9
    p_best = np.full(len(x), _FIRST_TRY, np.int64)
    d_best, inside = attempt(None, _FIRST_TRY)
    more = np.flatnonzero(~inside)
    for p in range(_FIRST_TRY + 1, 10):
        if not len(more):
            break
        d, inside = attempt(more, p)
        if p == 9:
            sure[more[~inside]] = False
            inside[:] = True
        d_best[more[inside]], p_best[more[inside]] = d[inside], p
        more = more[~inside]
    fewer = np.flatnonzero(p_best == _FIRST_TRY)
    for p in range(_FIRST_TRY - 1, 0, -1):
        if not len(fewer):
            break
        d, inside = attempt(fewer, p)
        fewer = fewer[inside]
        d_best[fewer], p_best[fewer] = d[inside], p
    d = d_best.astype(np.int64)
    s = p_best - 1 - e10
    while True:  # a carry (9.99.. -> 10) leaves trailing zeros; numpy prints none
        tz = np.flatnonzero(d % 10 == 0)
        if not len(tz):
            break
        d[tz] //= 10
        s[tz] -= 1
    return d, s, sure


def format_float32_rows(values: np.ndarray, tab_after: int | None = None) -> list[bytes]:
    """Each row of a float32 [R, C] array as ``b" ".join(str(np.float32(x)).encode())``.

    With ``tab_after=k`` the separator before column k is a tab (text \\t image layout).
    """
    values = np.ascontiguousarray(values, np.float32)
    r, c = values.shape
    n = r * c
    v32 = values.ravel()
    with np.errstate(invalid="ignore"):
        x = np.abs(v32.astype(np.float64))
        fast = (x >= 1.0001e-4) & (x < 1.0) & ((v32.view(np.uint32) & 0x7FFFFF) != 0)
    all_fast = bool(fast.all())
    if all_fast:
        d, s, sure = _shortest_digits(x, np.abs(v32))
        fast = sure
    else:
        idx = np.flatnonzero(fast)
        d = np.zeros(n, np.int64)
        s = np.ones(n, np.int64)
        d[idx], s[idx], sure = _shortest_digits(x[idx], np.abs(v32[idx]))
        fast[idx] = sure
    negative = np.signbit(v32)
    lengths = s + 2
    lengths += negative
    rec = np.empty((n, _REC), np.uint8)
    rec[:, :8] = 48  # ASCII '0'
    words = rec.view(np.uint32)  # 4 words: the 9 digits of d land in bytes 7..15
    np.take(_T4, d % 10000, out=words[:, 3])
    d //= 10000
    np.take(_T4, d % 10000, out=words[:, 2])
    d //= 10000
    rec[:, 7] += d.astype(np.uint8)
    flat = rec.reshape(-1)
    base = np.arange(_REC - 1, n * _REC, _REC)  # last byte of each record
    base -= s
    flat[base] = 46  # '.'
    base -= 2
    flat[base] = 45  # '-' (cut off unless negative)
    for i in np.flatnonzero(~fast).tolist():  # zeros, tiny/large values, powers of two, edge cases
        t = str(v32[i]).encode()
        if len(t) > _REC - 1:
            return _format_rows_slow(values, tab_after)
        rec[i, _REC - len(t):] = np.frombuffer(t, np.uint8)
        lengths[i] = len(t)
    sep = rec.reshape(r, c, _REC)[:, :, 0]
    sep[:] = 32
    if tab_after is not None and 0 < tab_after < c:
        sep[:, tab_after] = 9
    keep = np.arange(_REC) >= (_REC - lengths)[:, None]
    keep.reshape(r, c, _REC)[:, 1:, 0] = True  # a separator before every value but the first
    out_bytes = rec[keep].tobytes()
    lengths.reshape(r, c)[:, 1:] += 1
    row_ends = np.cumsum(lengths.reshape(r, c).sum(1)).tolist()
    out, start = [], 0
    for end in row_ends:
        out.append(out_bytes[start:end])
        start = end
    return out


def _format_rows_slow(values: np.ndarray, tab_after: int | None) -> list[bytes]:
    def join(row):
        return b" ".join(str(v).encode() for v in row)
    if tab_after is None:
        return [join(row) for row in values]
    return [join(row[:tab_after]) + b"\t" + join(row[tab_after:]) for row in values]


# ----------------------------------------------------------------------------------------------
# which image each embedding line belongs to (multi-caption protocol)
# ----------------------------------------------------------------------------------------------

def image_ids_from_tsv(tsv_path, line_numbers: np.ndarray | None, num_lines: int) -> list[str]:
    """Image id (TSV column 2) of each embedding line.

    ``line_numbers`` are the 1-based TSV line numbers from column 3 of the embeddings file; None
    (the official constant 1s) means embedding line i is TSV line i, so the counts must agree.
    The TSV is streamed and only column 2 is decoded (the base64 images are never parsed).
    """
    tsv_path = os.fspath(tsv_path)
    if line_numbers is not None:
        line_numbers = np.asarray(line_numbers, np.int64)
        if len(line_numbers) and line_numbers.min() < 1:
            raise EmbeddingFormatError(
                f"line number {int(line_numbers.min())} in the embeddings file is not a 1-based "
                f"line number of {tsv_path}")
        wanted = int(line_numbers.max()) if len(line_numbers) else 0
    else:
        wanted = None  # read every line: the counts must agree
    ids: list[str] = []
    with open(tsv_path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if wanted is not None and line_no > wanted:
                break
            if line_no == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            cols = line.rstrip(b"\r\n").split(b"\t", 2)
            if len(cols) < 2:
                raise EmbeddingFormatError(
                    f"{tsv_path}:{line_no}: expected at least 2 tab-separated columns "
                    f"(text, image_id, ...), found {len(cols)}")
            try:
                ids.append(cols[1].decode("utf-8").strip())
            except UnicodeDecodeError:
                raise EmbeddingFormatError(
                    f"{tsv_path}:{line_no}: column 2 (image id) is not valid UTF-8") from None
    if line_numbers is None:
        if len(ids) != num_lines:
            raise EmbeddingFormatError(
                f"{tsv_path}: has {len(ids)} lines but the embeddings file has {num_lines}; with "
                f"the official constant 1 in column 3, line i must be TSV line i")
        return ids
    if len(ids) < wanted:
        raise EmbeddingFormatError(
            f"{tsv_path}: has {len(ids)} lines but the embeddings file refers to line {wanted}")
    return [ids[i - 1] for i in line_numbers.tolist()]


def read_id_list(path, num_lines: int) -> list[str]:
    """One image id per line, line i for embedding line i (blank lines are errors)."""
    path = os.fspath(path)
    with open(path, encoding="utf-8-sig") as f:
        ids = [line.rstrip("\r\n").strip() for line in f]
    for i, v in enumerate(ids, 1):
        if not v:
            raise EmbeddingFormatError(f"{path}:{i}: empty image id")
    if len(ids) != num_lines:
        raise EmbeddingFormatError(
            f"{path}: has {len(ids)} ids but the embeddings file has {num_lines} lines")
    return ids

"""Parse an embeddings text file (format.py) into float32 arrays.

Blocks of ~1 MiB of whole lines are parsed on a few threads and written straight into their rows
of the output. A block in the official layout (``[-]0.ddddddd`` tokens, single spaces) goes
through a vectorised SWAR parser (NumPy releases the GIL inside its loops, so threads help); a
block of long tokens (e.g. 17 significant digits, what ``repr(float)`` writes) through NumPy's C
text parser (``np.loadtxt``: correctly rounded like ``float()``, but it holds the GIL); a block
that fails either (odd layout, a bad value) through a line-by-line parse that names FILE:LINE.
"""
from __future__ import annotations

import collections
import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..data.tsv import UTF8_BOM, content_end
from .format import FLOAT32_OVERFLOW, EmbeddingFile, EmbeddingFormatError

READ_BLOCK_BYTES = 1 << 20  # per vectorised parse (256 KiB and 2 MiB: slower here)
SWAR_MAX_TOKEN = 18  # "-0." + 15 digits: longer tokens are beyond the SWAR parser
C_PARSER_SHARE = 8  # a block with over 1/8 of its tokens beyond SWAR goes to np.loadtxt


def parse_text_file(path, workers: int | None = None) -> EmbeddingFile:
    """Parse the text file at ``path``; ``workers``: parsing threads (default min(4, CPUs)).

    Blank lines at the end are ignored (as the TSV reader does); one in the middle is an error.
    """
    path = os.fspath(path)
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
        end = content_end(f, size)
        f.seek(0)
        try:
            for buf in _line_blocks(f, end):
                if builder is None:
                    builder = _ArrayBuilder(_dim_from_first_line(buf, path),
                                            _estimate_lines(buf, end))
                n_lines = _count_lines(buf)
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


def _line_blocks(f, end: int):
    """Yield ~READ_BLOCK_BYTES chunks of whole lines of bytes [0, end), each a bytearray ending
    with b"\\n" (BOM removed). Each is read straight into its own buffer; its last partial line
    starts the next one (appending the rest of the line would copy the whole block)."""
    pos, first, tail = 0, True, b""
    while pos < end:
        buf = bytearray(len(tail) + min(READ_BLOCK_BYTES, end - pos))
        buf[:len(tail)] = tail
        with memoryview(buf) as view, view[len(tail):] as free:
            got = f.readinto(free)
        pos += got
        if pos >= end or not got:  # end is just past the last non-blank byte: its newline is beyond
            del buf[len(tail) + got:]
            buf += b"\n"
            pos = end
        else:
            cut = buf.rfind(b"\n") + 1
            tail = bytes(buf[cut:])
            if not cut:  # a line longer than a block: read on
                continue
            del buf[cut:]
        if first:
            first = False
            if buf.startswith(UTF8_BOM):
                buf = buf[len(UTF8_BOM):]
                if not buf.strip():
                    continue
        yield buf


def _count_lines(buf: bytes) -> int:
    # NumPy counts ~4x faster than bytes.count and without the GIL (this runs on the reading
    # thread, while the workers parse)
    return int(np.count_nonzero(np.frombuffer(buf, np.uint8) == 10))


def _estimate_lines(first_block: bytes, data_size: int) -> int:
    n = max(first_block.count(b"\n"), 1)
    return int(data_size / (len(first_block) / n) * 1.02) + 8


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
            out_of_range = ~(np.abs(row) < FLOAT32_OVERFLOW)  # NaN too
            if out_of_range.any():
                j = int(np.flatnonzero(out_of_range)[0])
                what = ("beyond the float32 range (about 3.4e38)" if np.isfinite(row[j])
                        else "not a finite number")
                raise EmbeddingFormatError(
                    f"{path}:{line_no}: column {c + 1} value {j + 1}: "
                    f"{toks[j].decode('utf-8', 'replace')!r} is {what}")
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
# general path that squeezes the dot out with bit masks; the rest (exponents, 'nan', > 15 digits,
# garbage) through float() per token, or np.loadtxt for the whole block when there are many.

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
_SIXTYTHREE, _SIXTYFOUR = _U64(63), _U64(64)
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

    def parse(self, padded: np.ndarray, ends: np.ndarray, lengths: np.ndarray,
              aligned: np.ndarray):
        """Values of the tokens ending (exclusive) at ``ends`` (indices into ``padded[_PAD:]``);
        ``aligned`` is padded's memory as uint64 words (``_padded_block``).

        Returns (float64 values, ok); ok is False where the token needs float(). The arrays
        are scratch buffers, valid until the next call.
        """
        n = len(ends)
        self._reserve(n)
        w0, w1, mask, x, y = (u[:n] for u in self.u)
        k, pos = (q[:n] for q in self.i)
        negative, ok, tmp = (q[:n] for q in self.b)
        b = padded[_PAD:]
        # k = digits after "0." (or "-0."), if the token has that shape. The gathers' indices
        # are in range by construction; mode="clip" because take(out=) in the default "raise"
        # mode writes through a temporary copy (1.7x slower)
        np.subtract(ends, lengths, out=pos)
        np.take(b, pos, out=x.view(np.uint8)[:n], mode="clip")  # first byte
        np.equal(x.view(np.uint8)[:n], 45, out=negative)  # '-'
        np.subtract(lengths, 2, out=k)
        np.subtract(k, negative, out=k)
        np.subtract(ends, k, out=pos)
        pos -= 1
        np.take(b, pos, out=x.view(np.uint8)[:n], mode="clip")
        np.equal(x.view(np.uint8)[:n], 46, out=ok)  # '.' right before the k digits
        pos -= 1
        np.take(b, pos, out=x.view(np.uint8)[:n], mode="clip")
        np.equal(x.view(np.uint8)[:n], 48, out=tmp)  # '0' before it
        ok &= tmp
        np.greater_equal(k, 1, out=tmp)
        ok &= tmp
        np.less_equal(k, 15, out=tmp)
        ok &= tmp
        np.clip(k, 0, 15, out=k)
        # w0, w1 = bytes [end-16, end-8) and [end-8, end) of the token's window, from three
        # aligned words each (gathering unaligned words directly is ~3x slower)
        np.right_shift(ends, 3, out=pos)
        np.take(aligned, pos, out=w0, mode="clip")
        np.take(aligned[1:], pos, out=w1, mode="clip")
        np.take(aligned[2:], pos, out=x, mode="clip")
        np.bitwise_and(ends, 7, out=pos)
        pos <<= 3
        shift = pos.view(np.uint64)
        np.subtract(_SIXTYFOUR, shift, out=mask)  # 64 - shift; a shift of 64 gives 0
        x <<= mask
        np.left_shift(w1, mask, out=y)
        w1 >>= shift
        w1 |= x
        w0 >>= shift
        w0 |= y
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
        # values are >= +0.0 here: setting the sign bit negates them exactly (-0.0 included);
        # np.negative(where=negative) took over 10x as long
        signs = w1  # free again
        np.copyto(signs, negative, casting="unsafe")
        signs <<= _SIXTYTHREE
        bits = values.view(np.uint64)
        bits |= signs
        if not ok.all():  # other plain decimals ("1.0", "12", ".5"): the general path
            rest = np.flatnonzero(~ok)
            values[rest], ok[rest] = _parse_general(padded, ends[rest], lengths[rest])
        return values, ok


def _parse_block_fast(buf: bytes, dim: int, n_lines: int, parser: _TokenParser):
    """Parse a block whose lines are all exactly ``D floats \\t D floats \\t int`` with single
    spaces. Returns (values float64 [L, 2D + 1], ids int64 [L]) or None to use the line path."""
    per_line = 2 * dim + 1
    padded, aligned = _padded_block(buf)
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
    id_ends = grid[:, 2 * dim]
    id_starts = id_ends - lengths[2 * dim::per_line]
    try:
        ids = np.array([int(buf[s:e]) for s, e in zip(id_starts.tolist(), id_ends.tolist())],
                       np.int64)
    except ValueError:
        return None
    # the first line decides (a block of another kind still ends up right, only slower)
    if np.count_nonzero(lengths[:per_line] > SWAR_MAX_TOKEN) * C_PARSER_SHARE > per_line:
        values = _parse_block_c(buf, n_lines, per_line)
    else:
        values = _parse_block_swar(buf, padded, aligned, ends, lengths, grid, dim, parser)
    return None if values is None else (values, ids)


def _in_float32_range(values) -> bool:
    """False for NaN, inf or a value beyond float32 (1e39): the line path names it."""
    return bool(np.all(np.abs(values) < FLOAT32_OVERFLOW))


def _parse_block_c(buf: bytes, n_lines: int, per_line: int):
    """NumPy's C parser (correctly rounded, exactly float()); None if it rejects the block."""
    try:
        values = np.loadtxt(io.BytesIO(buf), dtype=np.float64, delimiter=None, comments=None,
                            encoding="latin1", ndmin=2)
    except ValueError:
        return None
    if values.shape != (n_lines, per_line) or not _in_float32_range(values[:, :-1]):
        return None
    return values


def _padded_block(buf: bytes):
    """(_PAD spaces + buf as uint8, the same memory as uint64 words with 3 spare words)."""
    aligned = np.empty((len(buf) + _PAD) // 8 + 3, np.uint64)
    aligned[-3:] = 0
    padded = aligned.view(np.uint8)[:len(buf) + _PAD]
    padded[:_PAD] = 32
    padded[_PAD:] = np.frombuffer(buf, np.uint8)
    return padded, aligned


def _parse_block_swar(buf, padded, aligned, ends, lengths, grid, dim, parser):
    """SWAR values (always below 1e15 in magnitude); float() for the few tokens it cannot take."""
    n_lines, per_line = grid.shape
    # the float tokens only: the id column (already read) would need the general path
    values, ok = parser.parse(padded, grid[:, :2 * dim].ravel(),
                              lengths.reshape(n_lines, per_line)[:, :2 * dim].ravel(), aligned)
    values = values.reshape(n_lines, 2 * dim)
    ok = ok.reshape(n_lines, 2 * dim)
    n_bad = ok.size - np.count_nonzero(ok)
    if n_bad * C_PARSER_SHARE > ok.size:
        return _parse_block_c(buf, n_lines, per_line)
    if n_bad:  # e.g. 1e-05: exact float() on just those tokens
        rows, cols = np.nonzero(~ok)
        starts = grid[rows, cols] - lengths.reshape(n_lines, per_line)[rows, cols]
        try:
            fixed = [float(buf[s:e]) for s, e in zip(starts.tolist(), grid[rows, cols].tolist())]
        except ValueError:
            return None
        if not _in_float32_range(fixed):
            return None
        values[rows, cols] = fixed
    return values


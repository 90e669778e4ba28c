"""Write an embeddings file (format.py) and, by default, its sidecar.

Floats are formatted exactly as ``str(np.float32(x))`` prints them, vectorised with NumPy (no
per-float Python call on the common path): a 10k-line file holds 15 million floats.
"""
from __future__ import annotations

import os

import numpy as np

from ..fileio import atomic_write
from .format import EmbeddingFile
from .sidecar import new_hasher, sidecar_path, write_sidecar

WRITE_BLOCK_ROWS = 64  # rows formatted per vectorised call


def write_embeddings(path, text, image, line_numbers=None, sidecar: bool = True) -> None:
    """Write the embeddings file atomically, then its sidecar (hashed from the written bytes).

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
    hasher = new_hasher()
    with atomic_write(path, "wb") as f:
        for a in range(0, n, WRITE_BLOCK_ROWS):
            b = min(n, a + WRITE_BLOCK_ROWS)
            rows = format_float32_rows(np.concatenate([text[a:b], image[a:b]], axis=1),
                                       tab_after=text.shape[1])
            block = b"".join(r + b"\t%d\n" % i for r, i in zip(rows, ids[a:b].tolist()))
            hasher.update(block)
            f.write(block)
    if sidecar:
        write_sidecar(path, EmbeddingFile(text, image, ids, digest=hasher.hexdigest()))


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
_POW10 = 10.0 ** np.arange(23)  # exact in float64
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

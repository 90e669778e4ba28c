"""Streaming reader for the official ERNIE-ViL 2.0 TSV format.

One image-text pair a line, UTF-8, tab-separated:

    text \\t image_id \\t base64(image bytes) [\\t object tags [\\t label]]

The 4th (object tags: space- or comma-separated words, may be empty) and 5th (UniCL label)
columns are optional and only used for training. The official reader takes the first field as
text and the LAST field as the image; for the 3-column files it reads these are the same columns
as here. With ``min_columns=2`` a 2-column ``text \\t base64`` file is accepted too (empty id).

Differences from the official reader, on purpose:
- the file is streamed line by line (the official one decodes the whole file before the first
  batch), so memory does not grow with the file;
- bad lines raise ``DataError("FILE:LINE: problem")`` instead of a traceback deep in numpy/cv2,
  or are skipped and counted in a ``SkipReport`` when the caller asks for that;
- only the line terminator is removed before splitting (the official ``line.strip()`` would also
  eat an empty trailing tags column); each field is then stripped of surrounding whitespace,
  which matches what the official strip does to the first and last field.

Line numbers are 1-based and count every physical line (``\\n``-terminated), bad ones included,
so they match what an editor or ``sed -n Np`` shows.

Every reader of line-based files follows the same rules (UTF-8 BOM dropped, ``\\n`` or ``\\r\\n``,
blank lines at the end ignored, a blank line before more data is an error): ``iter_records``
(records, sharded by line or by image), ``index_lines`` / ``read_line_at`` (byte offsets: the
trainer's index, the MUGE image index), ``read_column``, ``image_ids_from_tsv`` (the evaluator's
lookup) and ``read_id_list`` (the project's one id-list reader).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

from ..tokenizer import is_blank_text

UTF8_BOM = b"\xef\xbb\xbf"
_CHUNK = 1 << 20  # 1 MiB reads for count_lines
_WORD_CHAR = re.compile(r"[^\W_]")  # a letter or digit: the tokenizer always keeps it
_BASE64_IMAGE = re.compile(r"[A-Za-z0-9+/]{64,}={0,2}")  # 48+ bytes: even tiny images are longer


@dataclass
class Record:
    """One parsed line. ``tags``/``label`` are None when the column is absent;
    ``tags`` is "" when the column is present but empty."""

    line_no: int
    text: str
    image_id: str
    image_b64: str
    tags: str | None = None
    label: str | None = None


class DataError(ValueError):
    """A problem with one line of a data file; str() is ``FILE:LINE: what is wrong`` (``FILE:
    what is wrong`` for a whole-file problem, line_no None)."""

    def __init__(self, path: str | os.PathLike, line_no: int | None, problem: str):
        self.path = os.fspath(path)
        self.line_no = line_no
        self.problem = problem
        where = self.path if line_no is None else f"{self.path}:{line_no}"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # keep it picklable (custom __init__ signature)
        return (type(self), (self.path, self.line_no, self.problem))


@dataclass
class SkipReport:
    """Bad lines skipped while reading one file (for one rank). The caller logs ``summary()``."""

    path: str = ""
    entries: list[tuple[int, str]] = field(default_factory=list)  # (line_no, problem)

    def add(self, error: DataError) -> None:
        self.entries.append((error.line_no, error.problem))

    @property
    def count(self) -> int:
        return len(self.entries)

    @property
    def line_numbers(self) -> list[int]:
        return sorted(n for n, _ in self.entries)

    @property
    def reasons(self) -> dict[int, str]:
        return dict(sorted(self.entries))

    def details(self) -> list[str]:
        """Every skipped line as ``FILE:LINE: problem``, in line order."""
        return [f"{self.path}:{n}: {problem}" for n, problem in sorted(self.entries)]

    def __bool__(self) -> bool:  # "if report:" means "something was skipped"
        return bool(self.entries)

    def summary(self, max_lines: int = 20) -> str:
        if not self.entries:
            return f"{self.path}: no bad lines skipped"
        ordered = sorted(self.entries)
        shown = ", ".join(str(n) for n, _ in ordered[:max_lines])
        more = f" (+{len(ordered) - max_lines} more)" if len(ordered) > max_lines else ""
        first_no, first_problem = ordered[0]
        return (
            f"{self.path}: skipped {len(ordered)} bad line(s): lines {shown}{more}; "
            f"first: line {first_no}: {first_problem}"
        )


# ---------------------------------------------------------------------------------------------
# base64


def decode_b64(s: str | bytes) -> bytes:
    """Decode the standard base64 alphabet strictly: any character outside it (including
    embedded newlines or the URL-safe ``-_``) is an error, where the official reader's plain
    ``b64decode`` would silently drop it and hand cv2 garbage.

    Missing ``=`` padding is tolerated (some exporters strip it; the data is still unambiguous);
    a length of 4k+1 cannot be valid base64 and is an error. Raises ValueError
    (binascii.Error) with a short reason.
    """
    if isinstance(s, str):
        try:
            s = s.encode("ascii")
        except UnicodeEncodeError as e:
            raise binascii.Error(f"corrupt base64: non-ASCII character at offset {e.start}") from None
    if not s:
        raise binascii.Error("corrupt base64: empty")
    missing = -len(s) % 4
    if missing == 3:
        raise binascii.Error(f"corrupt base64: impossible length {len(s)} (4k+1)")
    try:
        return base64.b64decode(s + b"=" * missing, validate=True)
    except binascii.Error as e:
        raise binascii.Error(f"corrupt base64: {e}") from None


def record_image_bytes(path: str | os.PathLike, record: Record) -> bytes:
    """The record's image bytes, or DataError naming the file and line."""
    try:
        return decode_b64(record.image_b64)
    except ValueError as e:
        raise DataError(path, record.line_no, str(e)) from None


# ---------------------------------------------------------------------------------------------
# line level


def physical_lines(f: BinaryIO) -> Iterator[tuple[int, int, bytes]]:
    """(1-based line number, byte offset, raw line without its terminator) of every line; the
    BOM is removed from line 1 (and its offset moved past it)."""
    pos = 0
    for line_no, raw in enumerate(f, start=1):
        start, pos = pos, pos + len(raw)
        if line_no == 1 and raw.startswith(UTF8_BOM):
            raw, start = raw[len(UTF8_BOM):], start + len(UTF8_BOM)
        yield line_no, start, _strip_terminator(raw)


def _strip_terminator(raw: bytes) -> bytes:
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    return raw


def _is_blank(raw: bytes) -> bool:
    return not raw or raw.isspace()  # isspace stops at the first non-space byte


def _parse_line(path, line_no: int, raw: bytes, min_columns: int, max_columns: int) -> Record:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, line_no, f"invalid UTF-8 at byte {e.start} of the line") from None
    fields = [f.strip() for f in line.split("\t")]
    n = len(fields)
    shifted = _image_column_shift(fields)
    if shifted:
        raise DataError(
            path, line_no,
            f"{n} columns where {n - shifted} are expected: a tab inside the caption? (column "
            f"{3 + shifted}, not 3, holds what looks like the base64 image)",
        )
    if not min_columns <= n <= max_columns:
        want = str(min_columns) if min_columns == max_columns else f"{min_columns} to {max_columns}"
        raise DataError(
            path, line_no,
            f"expected {want} tab-separated columns (text, image_id, base64 image"
            f"[, tags[, label]]), found {n}",
        )
    if n == 2:  # text \t base64 (only when the caller allows min_columns=2)
        text, image_id, image_b64, rest = fields[0], "", fields[1], []
    else:
        text, image_id, image_b64, rest = fields[0], fields[1], fields[2], fields[3:]
    if not text:
        raise DataError(path, line_no, "empty text (column 1)")
    if not _WORD_CHAR.search(text) and is_blank_text(text):
        raise DataError(path, line_no, "text (column 1) is only control or invisible characters: "
                        "as empty as a caption of spaces")
    if not image_b64:
        raise DataError(path, line_no, f"empty image field (column {2 if n == 2 else 3})")
    tags = rest[0] if len(rest) >= 1 else None
    label = rest[1] if len(rest) >= 2 else None
    if label == "":
        raise DataError(path, line_no, "empty label (column 5)")
    return Record(line_no, text, image_id, image_b64, tags, label)


def _looks_like_image(field_: str) -> bool:
    return len(field_) >= 64 and _BASE64_IMAGE.fullmatch(field_) is not None


def _image_column_shift(fields: list[str]) -> int:
    """How many columns right of column 3 the base64 image sits (a tab in the caption moves it);
    0 when column 3 looks like an image or no later column does."""
    if len(fields) < 4 or _looks_like_image(fields[2]):
        return 0
    later = [k for k in range(3, len(fields)) if _looks_like_image(fields[k])]
    return later[0] - 2 if later else 0


def _check_sharding(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")


def line_belongs_to_rank(line_no: int, rank: int, world_size: int) -> bool:
    """Round-robin sharding on physical line numbers: line i goes to rank (i-1) % world_size."""
    return (line_no - 1) % world_size == rank


def image_rank(image_b64: str, world_size: int) -> int:
    """The rank that owns every line of an image with ``shard="image"``: a stable hash of its
    base64 field (padding aside, which decoding tolerates), so equal images meet on one rank."""
    return zlib.crc32(image_b64.rstrip("=").encode()) % world_size


SHARDS = ("line", "image")


def iter_records(
    path: str | os.PathLike,
    rank: int = 0,
    world_size: int = 1,
    skip_bad_lines: bool = False,
    report: SkipReport | None = None,
    min_columns: int = 3,
    max_columns: int = 5,
    shard: str = "line",
) -> Iterator[Record]:
    """Stream this rank's records from a TSV file, in file order.

    ``shard="line"``: line i belongs to rank (i-1) % world_size, and only this rank's lines are
    decoded and checked. ``shard="image"``: a line that parses belongs to ``image_rank`` of its
    image column, so all lines of one image (5 captions a photo) land on one rank; a line that
    does not parse keeps its round-robin owner. Every rank then parses every line (cheap next
    to decoding the image). Either way each bad line is reported by exactly one rank.

    Empty (or whitespace-only) lines at the end of the file are ignored; an empty line followed
    by more data is a bad line. With ``skip_bad_lines`` a bad line is
    recorded in ``report`` (if given) and skipped; otherwise DataError is raised.
    The image's base64 is NOT decoded here (see ``record_image_bytes``) so that the costly
    decoding can run in parallel workers.
    """
    _check_sharding(rank, world_size)
    if shard not in SHARDS:
        raise ValueError(f"shard must be one of {SHARDS}, got {shard!r}")
    by_image = shard == "image" and world_size > 1
    if not 2 <= min_columns <= max_columns <= 5:
        raise ValueError(f"need 2 <= min_columns <= max_columns <= 5, got {min_columns}, {max_columns}")
    if report is not None and not report.path:
        report.path = os.fspath(path)

    def bad(error: DataError) -> None:
        if not skip_bad_lines:
            raise error
        if report is not None:
            report.add(error)

    pending_blank: list[int] = []  # blank lines not yet known to be in the middle of the file
    with open(path, "rb") as f:
        for line_no, _, raw in physical_lines(f):
            if _is_blank(raw):
                pending_blank.append(line_no)
                continue
            for blank_no in pending_blank:  # data follows, so these blanks are bad lines
                if line_belongs_to_rank(blank_no, rank, world_size):
                    bad(DataError(path, blank_no, "empty line in the middle of the file"))
            pending_blank.clear()
            mine = line_belongs_to_rank(line_no, rank, world_size)
            if not (mine or by_image):
                continue
            try:
                record = _parse_line(path, line_no, raw, min_columns, max_columns)
            except DataError as e:
                if mine:
                    bad(e)
                continue
            if not by_image or image_rank(record.image_b64, world_size) == rank:
                yield record


# ---------------------------------------------------------------------------------------------
# fast whole-file helpers


def content_end(f: BinaryIO, size: int) -> int:
    """Byte offset just past the last non-whitespace byte of an open binary file (0 if none)."""
    end = size
    while end > 0:
        start = max(0, end - _CHUNK)
        f.seek(start)
        stripped = f.read(end - start).rstrip()
        if stripped:
            return start + len(stripped)
        end = start
    return 0


def count_lines(path: str | os.PathLike) -> int:
    """Number of the last non-blank line (0 for an empty file): the physical lines the readers
    number, minus blank lines at the end (which they ignore). Counts newlines in 1 MiB binary
    chunks; never decodes."""
    with open(path, "rb") as f:
        end = content_end(f, os.path.getsize(path))
        f.seek(0)
        if end == 0 or (end == len(UTF8_BOM) and f.read(end) == UTF8_BOM):
            return 0
        f.seek(0)
        newlines, pos = 0, 0
        while pos < end:
            chunk = f.read(min(_CHUNK, end - pos))
            newlines += chunk.count(b"\n")
            pos += len(chunk)
    return newlines + 1


def index_lines(path: str | os.PathLike) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, raw line) of every data line, in one streamed pass.

    The one place of the readers' line rules: UTF-8 BOM removed, ``\\n`` or ``\\r\\n`` terminators,
    blank lines at the end ignored, a blank line followed by data is a DataError. ``offset`` is
    where ``raw`` starts, for ``read_line_at``; nothing is decoded here.
    """
    blank_no = 0
    with open(path, "rb") as f:
        for line_no, offset, raw in physical_lines(f):
            if _is_blank(raw):
                blank_no = blank_no or line_no
                continue
            if blank_no:
                raise DataError(path, blank_no, "empty line in the middle of the file")
            yield line_no, offset, raw


def read_line_at(f: BinaryIO, offset: int) -> bytes:
    """The raw line (terminator removed) at a byte offset from ``index_lines``."""
    f.seek(offset)
    return _strip_terminator(f.readline())


def decode_field(path, line_no: int, raw: bytes, col: int) -> str:
    """Column ``col`` (0-based) of a raw line, decoded and stripped; DataError if it is missing
    or not UTF-8. Only that field is decoded (not the large base64 one)."""
    fields = raw.split(b"\t", col + 1)
    if len(fields) <= col:
        raise DataError(path, line_no, f"no column {col + 1}: found {len(fields)} columns")
    try:
        return fields[col].decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise DataError(path, line_no, f"invalid UTF-8 in column {col + 1} at byte {e.start}") from None


def read_column(path: str | os.PathLike, col: int) -> Iterator[str]:
    """Stream one column (0-based; 1 = image ids) of every data line, in file order, stripped
    (line rules of ``index_lines``)."""
    if col < 0:
        raise ValueError(f"col must be >= 0, got {col}")
    for line_no, _, raw in index_lines(path):
        yield decode_field(path, line_no, raw, col)


def read_id_list(path: str | os.PathLike) -> list[str]:
    """The project's one id-list reader: one id a line, in file order, stripped (UTF-8, optional
    BOM; line rules of ``index_lines``). Raises DataError (FILE:LINE) for invalid UTF-8 and for
    an empty list."""
    ids = []
    for line_no, _, raw in index_lines(path):
        try:
            ids.append(raw.decode("utf-8").strip())
        except UnicodeDecodeError as e:
            raise DataError(path, line_no, f"invalid UTF-8 at byte {e.start} of the line") from None
    if not ids:
        raise DataError(path, None, "no ids (the file is empty)")
    return ids


def image_ids_from_tsv(tsv_path, line_numbers, num_lines: int) -> list[str]:
    """Image id (TSV column 2) of each embedding line.

    ``line_numbers`` are the 1-based TSV line numbers from column 3 of the embeddings file; None
    (the official constant 1s) means embedding line i is data line i, so the counts must agree.
    The TSV is streamed and only column 2 is decoded (the base64 images are never parsed).
    """
    if line_numbers is not None:
        line_numbers = [int(n) for n in line_numbers]
        if line_numbers and min(line_numbers) < 1:
            raise DataError(tsv_path, min(line_numbers), "is not a line of the file: the "
                            "embeddings file's column 3 must hold 1-based line numbers")
    wanted = max(line_numbers, default=0) if line_numbers is not None else None
    ids: dict[int, str] = {}  # line number -> image id
    for line_no, _, raw in index_lines(tsv_path):
        if wanted is not None and line_no > wanted:
            # lines skipped in the middle leave gaps, but no run leaves out the file's end
            raise DataError(tsv_path, line_no, f"is a data line, but the embeddings file "
                            f"({num_lines} lines) refers to none after line {wanted}: is this "
                            f"the TSV the embeddings were made from?")
        if b"\t" not in raw:
            raise DataError(tsv_path, line_no, "expected at least 2 tab-separated columns "
                            "(text, image_id, ...), found 1")
        ids[line_no] = decode_field(tsv_path, line_no, raw, 1)
    if line_numbers is None:
        if len(ids) != num_lines:
            raise DataError(tsv_path, None, f"has {len(ids)} lines but the embeddings file "
                            f"has {num_lines}; with the official constant 1 in column 3, line i "
                            f"must be TSV line i")
        return list(ids.values())
    missing = [n for n in line_numbers if n not in ids]
    if missing:
        raise DataError(tsv_path, missing[0], "is not a data line of the file, but the "
                        "embeddings file refers to it")
    return [ids[n] for n in line_numbers]

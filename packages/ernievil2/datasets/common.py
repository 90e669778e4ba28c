"""What every dataset converter shares: the records a parser returns, errors, small text
helpers, the image-list and tags-table readers."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Iterator

from ..data.tsv import DataError, physical_lines, read_id_list


class ConversionError(ValueError):
    """Bad input that is not tied to one line (missing file, wrong JSON shape, nothing written)."""


class MissingImageError(ConversionError):
    """An image a caption refers to is missing or cannot be read."""


@dataclass(frozen=True, slots=True)
class Base64Ref:
    """Where one image's base64 field sits in a ``image_id \\t base64`` TSV (MUGE layout)."""

    path: str
    offset: int  # byte offset of the field
    length: int  # bytes, without the line terminator


@dataclass(slots=True)
class PairRecord:
    """One caption of one image, before writing. ``image`` is a file path, the image bytes, a
    ``Base64Ref``, or None when the image is known to be absent (e.g. an id not in the MUGE
    image TSV). ``source``/``where`` name the caption's origin in error messages."""

    caption: str
    image_id: str
    image: str | bytes | Base64Ref | None
    source: str
    where: str  # e.g. "caption line 12", "caption entry 3"
    label: str | None = None


@dataclass
class ParseResult:
    records: list[PairRecord]
    notes: list[str] = field(default_factory=list)  # human-readable remarks for the user


_LINE_BREAKS = re.compile(r"[\t\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def clean_field(text: str) -> tuple[str, bool]:
    """Replace tabs and line breaks (which would break the TSV) by spaces, strip the ends.
    Returns (clean text, whether anything was replaced)."""
    replaced = _LINE_BREAKS.sub(" ", text)
    return replaced.strip(), replaced != text


def strip_image_ext(name: str) -> str:
    root, ext = os.path.splitext(name)
    return root if ext.lower() in _IMAGE_EXTS else name


def text_lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without terminator) of every line of a UTF-8 text file (blank
    ones too: caption files may have them anywhere); BOM dropped."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise ConversionError(f"{path}: file not found") from None
    with f:
        for line_no, _, raw in physical_lines(f):
            try:
                yield line_no, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, line_no, f"invalid UTF-8 at byte {e.start} of the line") from None


def load_json(path: str):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8-sig"))
    except FileNotFoundError:
        raise ConversionError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: not valid UTF-8 JSON: {e}") from None


def read_image_list(path: str) -> list[str]:
    """A split's image ids (data/tsv.py read_id_list), image extensions removed, repeats dropped
    (first-seen order)."""
    try:
        ids = read_id_list(path)
    except FileNotFoundError:
        raise ConversionError(f"{path}: file not found") from None
    return list(dict.fromkeys(strip_image_ext(i) for i in ids))


def select_listed(by_image: dict, image_list: str | None) -> tuple[list[str], list[str]]:
    """(image ids to write, ids of the list without captions): the list's ids that have captions,
    in list order; every id of ``by_image`` when there is no list."""
    if not image_list:
        return list(by_image), []
    wanted = read_image_list(image_list)
    return [i for i in wanted if i in by_image], [i for i in wanted if i not in by_image]


def load_tags(path: str) -> dict[str, str]:
    """Image id -> object tags from ``image_id \\t tags`` lines (tags space-separated, may be
    empty). Lines without a tab are split at the first whitespace (the COCO-CN tags file).
    An optional ``image_id \\t tags`` header is skipped; a repeated id is an error."""
    tags: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for line_no, line in text_lines(path):
        if not line.strip():
            continue
        key, _, rest = line.partition("\t") if "\t" in line else line.strip().partition(" ")
        key = key.strip()
        if not tags and not first_line and key.lower() in ("image_id", "image", "id") and \
                rest.strip().lower() in ("tags", "tag", "object_tags"):
            continue  # header
        if not key:
            raise DataError(path, line_no, "empty image id (column 1)")
        if key in first_line:
            raise DataError(path, line_no, f"image id {key!r} repeated (first on line {first_line[key]})")
        first_line[key] = line_no
        tags[key] = " ".join(rest.split())
    if not tags:
        raise ConversionError(f"{path}: no tags found")
    return tags


def split_key_text(line: str) -> tuple[str, str] | None:
    """``KEY \\t text`` or ``KEY text`` (first space) -> (key, text)."""
    if "\t" in line:
        key, text = line.split("\t", 1)
    else:
        parts = line.lstrip().split(" ", 1)
        if len(parts) != 2:
            return None
        key, text = parts
    return key.strip(), text

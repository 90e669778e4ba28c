"""``muge``: MUGE retrieval / Chinese-CLIP ``imgs.tsv`` + ``texts.jsonl`` (see the package docstring)."""
from __future__ import annotations

import json
import os

from ..data.tsv import DataError, index_lines
from .common import Base64Ref, ConversionError, PairRecord, ParseResult, text_lines


def index_base64_tsv(path: str) -> dict[str, Base64Ref]:
    """Image id -> where its base64 sits, from an ``image_id \\t base64`` TSV, reading the file
    once without keeping the (large) base64 in memory."""
    index: dict[str, Base64Ref] = {}
    first_line: dict[str, int] = {}
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: file not found")
    for line_no, offset, raw in index_lines(path):
        fields = raw.split(b"\t")
        if len(fields) != 2:
            raise DataError(path, line_no, f"expected 2 tab-separated columns (image_id, base64), found {len(fields)}")
        try:
            key = fields[0].decode("utf-8").strip()
        except UnicodeDecodeError:
            raise DataError(path, line_no, "image id (column 1) is not UTF-8") from None
        if not key:
            raise DataError(path, line_no, "empty image id (column 1)")
        if key in first_line:
            raise DataError(path, line_no, f"image id {key!r} repeated (first on line {first_line[key]})")
        first_line[key] = line_no
        index[key] = Base64Ref(path, offset + len(fields[0]) + 1, len(fields[1]))
    if not index:
        raise ConversionError(f"{path}: no images")
    return index


def parse_muge(imgs_tsv: str, texts_jsonl: str) -> ParseResult:
    """One record per (text, image id) of a Chinese-CLIP ``texts.jsonl``; images by reference
    into ``imgs.tsv`` (an id absent from it becomes a missing image)."""
    index = index_base64_tsv(imgs_tsv)
    records: list[PairRecord] = []
    no_images = 0
    for line_no, line in text_lines(texts_jsonl):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(texts_jsonl, line_no, f"not valid JSON: {e.msg}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(texts_jsonl, line_no, 'expected {"text_id", "text", "image_ids": [...]}')
        image_ids = obj.get("image_ids") or []
        if not isinstance(image_ids, list):
            raise DataError(texts_jsonl, line_no, '"image_ids" must be a list')
        if not image_ids:
            no_images += 1
        for image_id in image_ids:
            key = str(image_id)
            records.append(PairRecord(obj["text"], key, index.get(key), texts_jsonl, f"caption line {line_no}"))
    notes = [f"{no_images} text(s) of {texts_jsonl} have no image_ids (MUGE test texts carry none) "
             "and give no line"] if no_images else []
    if not records:
        raise ConversionError(f"{texts_jsonl}: no (text, image) pair: no text has image_ids")
    return ParseResult(records, notes)

"""``folder``: an image folder plus a caption TSV or a COCO captions JSON (see the package docstring)."""
from __future__ import annotations

import os

from ..data.tsv import UTF8_BOM, DataError
from .common import ConversionError, PairRecord, ParseResult, load_json, strip_image_ext, text_lines


_FILE_HEADERS = {"image", "image_file", "image_path", "image_name", "file", "file_name", "filename",
                 "path", "img", "image_id"}
_CAPTION_HEADERS = {"caption", "captions", "text", "sentence", "title", "query"}


def _looks_like_json(path: str) -> bool:
    if path.lower().endswith(".json"):
        return True
    with open(path, "rb") as f:
        head = f.read(64).lstrip(UTF8_BOM).lstrip()
    return head.startswith(b"{")


def parse_folder(captions: str, images_dir: str, columns: str = "auto", header: str = "auto") -> ParseResult:
    """Caption TSV or COCO captions JSON + image folder (see the module docstring)."""
    if not os.path.isfile(captions):
        raise ConversionError(f"{captions}: file not found")
    if _looks_like_json(captions):
        return parse_coco_json(captions, images_dir)
    return parse_folder_tsv(captions, images_dir, columns, header)


def parse_folder_tsv(captions: str, images_dir: str, columns: str = "auto", header: str = "auto") -> ParseResult:
    """``image_file \\t caption`` (columns=2) or ``image_file \\t image_id \\t caption``
    (columns=3); ``auto`` takes the first data line's field count. Tabs past the last column
    are kept in the caption (the writer replaces and counts them)."""
    if columns not in ("auto", "2", "3"):
        raise ValueError(f"columns must be auto, 2 or 3, got {columns!r}")
    if header not in ("auto", "yes", "no"):
        raise ValueError(f"header must be auto, yes or no, got {header!r}")
    ncols = None if columns == "auto" else int(columns)
    records: list[PairRecord] = []
    first = True
    for line_no, line in text_lines(captions):
        if not line.strip():
            continue
        fields = line.split("\t")
        if first:
            first = False
            names = [f.strip().lower() for f in fields]
            is_header = header == "yes" or (
                header == "auto" and len(names) >= 2 and names[0] in _FILE_HEADERS and names[-1] in _CAPTION_HEADERS)
            if is_header and len(fields) not in (2, 3):
                raise DataError(captions, line_no, f"the header names {len(fields)} columns; expected "
                                                   "image_file, caption or image_file, image_id, caption")
            if ncols is None:
                ncols = 2 if len(fields) == 2 else 3
            if is_header:
                continue
        if len(fields) < ncols:
            want = "image_file \\t caption" if ncols == 2 else "image_file \\t image_id \\t caption"
            raise DataError(captions, line_no, f"expected {ncols} tab-separated columns ({want}), found {len(fields)}")
        image_file = fields[0].strip()
        if not image_file:
            raise DataError(captions, line_no, "empty image file name (column 1)")
        if ncols == 2:
            image_id, caption = strip_image_ext(image_file), "\t".join(fields[1:])
        else:
            image_id, caption = fields[1].strip(), "\t".join(fields[2:])
            if not image_id:
                raise DataError(captions, line_no, "empty image id (column 2)")
        records.append(PairRecord(caption, image_id, os.path.join(images_dir, image_file), captions,
                                  f"caption line {line_no}"))
    if not records:
        raise ConversionError(f"{captions}: no caption lines")
    return ParseResult(records)


def parse_coco_json(captions: str, images_dir: str) -> ParseResult:
    """COCO captions JSON: lines grouped by image, in ``images`` order."""
    data = load_json(captions)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise ConversionError(f'{captions}: expected a COCO captions object {{"images": [...], "annotations": [...]}}')
    files: dict[str, str] = {}
    for k, image in enumerate(data["images"], start=1):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise ConversionError(f'{captions}: images entry {k} needs "id" and "file_name"')
        key = str(image["id"])
        if key in files:
            raise ConversionError(f"{captions}: images entry {k}: id {key} repeated")
        files[key] = str(image["file_name"])
    by_image: dict[str, list[PairRecord]] = {key: [] for key in files}
    for k, ann in enumerate(data["annotations"], start=1):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise ConversionError(f'{captions}: annotations entry {k} needs "image_id" and "caption"')
        key = str(ann["image_id"])
        if key not in files:
            raise ConversionError(f'{captions}: annotations entry {k}: image_id {key} is not in "images"')
        by_image[key].append(PairRecord(str(ann["caption"]), key, os.path.join(images_dir, files[key]),
                                        captions, f"caption entry {k}"))
    records = [r for group in by_image.values() for r in group]
    if not records:
        raise ConversionError(f"{captions}: no annotations")
    without = sum(1 for group in by_image.values() if not group)
    notes = [f"{without} image(s) in {captions} have no caption and are left out"] if without else []
    return ParseResult(records, notes)

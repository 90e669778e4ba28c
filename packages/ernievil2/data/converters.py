"""Build training / test files in the official ERNIE-ViL 2.0 TSV format from the public sets.

The official test file's download link is dead (ERNIE #864), so users rebuild the test (and
training) files from each set's published files. Output, one image-text pair a line, UTF-8::

    caption \\t image_id \\t base64(image bytes) [\\t object tags [\\t label]]

Images are embedded as their original file bytes (no re-encode) unless ``max_side`` is given:
then an image whose long side exceeds it is decoded with cv2, shrunk with INTER_AREA so the
long side equals ``max_side`` and re-encoded as JPEG quality 95 (images that already fit keep
their original bytes). The 4th column (object tags) is only written when a tags table is given;
note that the official ``run_infer.py`` takes the LAST column as the image, so files for it must
have exactly 3 columns.

Published formats read here (one parser each; all return ``ParseResult``):

``folder`` -- any image folder plus a caption file, either
  * TSV ``image_file \\t caption`` or ``image_file \\t image_id \\t caption``, optional header
    line (detected when its first field is a file-column name such as ``image_file`` and its
    last field is ``caption``/``text``); without an id column the id is the file path relative
    to the folder, minus its extension; or
  * a COCO captions JSON (``captions_val2014.json`` layout, cocodataset.org):
    ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``; the id is
    ``str(images[].id)`` and lines are grouped by image in ``images`` order.

``coco-cn`` -- COCO-CN (Li et al., TMM 2019; github.com/li-xirong/coco-cn, archive
  ``coco-cn-version1805v1.1``): ``coco-cn_{train,val,test}.txt`` list one image id a line
  (``COCO_val2014_000000123456``); ``imageid.human-written-caption.txt`` (22,218 sentences) and
  ``imageid.manually-translated-caption.txt`` (5,000, test only) hold
  ``COCO_val2014_000000123456#0 \\t sentence``. The test split has 1,000 images and 1,053
  human-written sentences (1-2 per image). ``imageid.human-written-tags.txt`` is
  ``image_id tags...`` and can be given as the tags table. Images come from MS-COCO 2014
  (``train2014/``, ``val2014/`` under one root); a COCO 2017 layout (``train2017/``,
  ``val2017/`` with ``000000123456.jpg``) is found too.

``flickr30k-cn`` -- Flickr30k-CN / Flickr8k-CN (Lan, Li, Dong, ACM MM 2017; files from
  lixirong.net/data/mm2017 as read by github.com/weiyuk/fluent-cap): one folder per split
  (``flickr30kzhbbosontrain``, ``flickr30kzhbbosonval``, ``flickr30kzhmbosontest``) holding
  ``ImageSets/<name>.txt`` (one image id a line) and ``TextData/seg.<name>.caption.txt``, lines
  ``1000092795#zhm#0 word word ...`` (id and text split at the first space; ``zhb`` = Baidu
  machine translation, ``zhm`` = human translation; Flickr8k-CN ids keep ``.jpg``:
  ``1000268201_693b08cb0e.jpg#zhb#0``). The text is word-segmented (BosonNLP): tokens may carry
  a ``:pos`` suffix and a run of 2+ spaces marks where punctuation was removed. With
  ``detok`` the suffixes are dropped, tokens joined without spaces (a space is kept between two
  ASCII words) and each removed mark becomes ``，``. Tab-separated lines
  (``1000092795.jpg#zhb#0 \\t caption``) are read too. Images: ``flickr30k-images/<id>.jpg``.
  Sizes: train 29,783 images / 148,915 sentences, val 1,000 / 5,000, test 1,000 / 5,000.

``aic-icc`` -- AI Challenger 2017 image captioning (github.com/AIChallenger/AI_Challenger_2017):
  ``caption_{train,validation}_annotations_2017xxxx.json`` is a JSON list of
  ``{"url", "image_id": "<sha1>.jpg", "caption": [5 sentences]}``; images in
  ``caption_{train,validation}_images_2017xxxx/``. Some sentences contain line breaks or are
  empty (the writer replaces / skips and counts them). The id written is the file stem.

``muge`` -- MUGE retrieval / Chinese-CLIP layout (github.com/OFA-Sys/Chinese-CLIP README):
  ``{split}_imgs.tsv`` lines ``image_id \\t base64`` and ``{split}_texts.jsonl`` lines
  ``{"text_id": 8428, "text": "...", "image_ids": [1076345, 517602]}``; one output line per
  (text, image id). The base64 is copied through after validation (URL-safe ``-_`` is mapped to
  ``+/``, which the project's strict reader requires). MUGE test texts carry no image ids.

``flickr8k-cn reference`` -- this project's ``../shared/data/flickr8k_cn``:
  ``captions_{train,val}.tsv`` with the header ``image_file image_id lang caption`` (``lang`` is
  ``zh`` or ``en``; 5 of each per image) and an ``images/`` folder.

Errors: a malformed input line raises ``DataError`` (``FILE:LINE: problem``); other bad input
raises ``ConversionError``; a missing or unreadable image raises ``MissingImageError``
(``FILE: image 'x' not found (caption line N)``) unless ``skip_missing`` is set, in which case
the lines are skipped and counted in ``WriteStats``. The output is written to a temporary name
and renamed only when everything succeeded, so a failed run leaves no partial file.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from .tsv import UTF8_BOM, DataError, decode_b64


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


# ---------------------------------------------------------------------------------------------
# small helpers

_LINE_BREAKS = re.compile(r"[\t\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
_URLSAFE_TO_STD = bytes.maketrans(b"-_", b"+/")


def clean_field(text: str) -> tuple[str, bool]:
    """Replace tabs and line breaks (which would break the TSV) by spaces, strip the ends.
    Returns (clean text, whether anything was replaced)."""
    replaced = _LINE_BREAKS.sub(" ", text)
    return replaced.strip(), replaced != text


def strip_image_ext(name: str) -> str:
    root, ext = os.path.splitext(name)
    return root if ext.lower() in _IMAGE_EXTS else name


def _text_lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without terminator) of a UTF-8 text file; BOM dropped."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise ConversionError(f"{path}: file not found") from None
    with f:
        for line_no, raw in enumerate(f, start=1):
            raw = raw.rstrip(b"\r\n")
            if line_no == 1 and raw.startswith(UTF8_BOM):
                raw = raw[len(UTF8_BOM):]
            try:
                yield line_no, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, line_no, f"invalid UTF-8 at byte {e.start} of the line") from None


def _load_json(path: str):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8-sig"))
    except FileNotFoundError:
        raise ConversionError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: not valid UTF-8 JSON: {e}") from None


def read_id_list(path: str) -> list[str]:
    """One image id a line (blank lines skipped, image extensions removed), first-seen order."""
    ids: dict[str, None] = {}
    for _, line in _text_lines(path):
        line = line.strip()
        if line:
            ids.setdefault(strip_image_ext(line), None)
    if not ids:
        raise ConversionError(f"{path}: the image list is empty")
    return list(ids)


def load_tags(path: str) -> dict[str, str]:
    """Image id -> object tags from ``image_id \\t tags`` lines (tags space-separated, may be
    empty). Lines without a tab are split at the first whitespace (the COCO-CN tags file).
    An optional ``image_id \\t tags`` header is skipped; a repeated id is an error."""
    tags: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for line_no, line in _text_lines(path):
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


# ---------------------------------------------------------------------------------------------
# folder: TSV or COCO captions JSON

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
    for line_no, line in _text_lines(captions):
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
    data = _load_json(captions)
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


# ---------------------------------------------------------------------------------------------
# COCO-CN

_COCO2014_ID = re.compile(r"COCO_(train|val)2014_(\d{12})")


def coco_image_candidates(roots: Sequence[str], image_id: str) -> list[str]:
    """Where a COCO-CN image may sit, most likely first: ROOT/{train,val}2014/ID.jpg, ROOT/ID.jpg,
    and the COCO 2017 names ROOT/{train,val}2017/NNNNNNNNNNNN.jpg (2017 re-split the 2014 images,
    so both 2017 folders are tried)."""
    m = _COCO2014_ID.fullmatch(image_id)
    out = []
    for root in roots:
        if m:
            out.append(os.path.join(root, f"{m.group(1)}2014", image_id + ".jpg"))
        out.append(os.path.join(root, image_id + ".jpg"))
        if m:
            number = m.group(2) + ".jpg"
            out += [os.path.join(root, "train2017", number), os.path.join(root, "val2017", number),
                    os.path.join(root, number)]
    return out


def resolve_coco_image(roots: Sequence[str], image_id: str) -> str:
    """The first existing candidate, else the canonical 2014 path (named in the error)."""
    candidates = coco_image_candidates(roots, image_id)
    for path in candidates:
        if os.path.isfile(path):
            return path
    return candidates[0]


def _split_key_text(line: str) -> tuple[str, str] | None:
    """``KEY \\t text`` or ``KEY text`` (first space) -> (key, text)."""
    if "\t" in line:
        key, text = line.split("\t", 1)
    else:
        parts = line.lstrip().split(" ", 1)
        if len(parts) != 2:
            return None
        key, text = parts
    return key.strip(), text


def parse_coco_cn(captions: str, image_roots: Sequence[str], split_list: str | None = None) -> ParseResult:
    """COCO-CN sentences (``ID#N \\t sentence``) for the ids in ``split_list`` (all when None),
    grouped by image in list order (caption-file order without a list)."""
    by_image: dict[str, list[PairRecord]] = {}
    for line_no, line in _text_lines(captions):
        if not line.strip():
            continue
        kt = _split_key_text(line)
        if kt is None or "#" not in kt[0]:
            raise DataError(captions, line_no, "expected 'IMAGE_ID#N<TAB>sentence' "
                                               "(e.g. COCO_val2014_000000123456#0)")
        key, text = kt
        image_id = strip_image_ext(key.rsplit("#", 1)[0])
        if not image_id:
            raise DataError(captions, line_no, "empty image id before '#'")
        by_image.setdefault(image_id, []).append(
            PairRecord(text, image_id, None, captions, f"caption line {line_no}"))
    notes = []
    if split_list:
        wanted = read_id_list(split_list)
        no_caption = [i for i in wanted if i not in by_image]
        if no_caption:
            notes.append(f"{len(no_caption)} image(s) of {split_list} have no sentence in {captions} "
                         f"(first: {', '.join(no_caption[:5])})")
        ids = [i for i in wanted if i in by_image]
    else:
        ids = list(by_image)
    records = []
    for image_id in ids:
        path = resolve_coco_image(image_roots, image_id)
        for r in by_image[image_id]:
            r.image = path
            records.append(r)
    if not records:
        raise ConversionError(f"{captions}: no sentence for the requested images"
                              + (f" of {split_list}" if split_list else ""))
    return ParseResult(records, notes)


# ---------------------------------------------------------------------------------------------
# Flickr30k-CN / Flickr8k-CN (fluent-cap release)

_POS_SUFFIX = re.compile(r"(?<=.):[A-Za-z]+$")
_REMOVED_PUNCT = re.compile(r"\s{2,}")


def detokenize_segmented(text: str) -> str:
    """Undo the release's word segmentation: drop ``:pos`` suffixes, join tokens (a space stays
    only between two ASCII words), and put '，' where a run of spaces marks a removed mark."""
    chunks = []
    for chunk in _REMOVED_PUNCT.split(text.strip()):
        out = ""
        for tok in chunk.split():
            tok = _POS_SUFFIX.sub("", tok)
            if not tok:
                continue
            if out and out[-1].isascii() and out[-1].isalnum() and tok[0].isascii() and tok[0].isalnum():
                out += " "
            out += tok
        if out:
            chunks.append(out)
    return "，".join(chunks)


def find_flickr_cn_files(collection_dir: str) -> tuple[str, str | None]:
    """(caption file, image list or None) of a fluent-cap collection folder such as
    ``flickr30kzhmbosontest/``."""
    name = os.path.basename(os.path.normpath(collection_dir))
    text_dir = os.path.join(collection_dir, "TextData")
    for candidate in (f"seg.{name}.caption.txt", f"{name}.caption.txt"):
        path = os.path.join(text_dir, candidate)
        if os.path.isfile(path):
            break
    else:
        raise ConversionError(f"{collection_dir}: no TextData/seg.{name}.caption.txt "
                              f"or TextData/{name}.caption.txt")
    image_list = os.path.join(collection_dir, "ImageSets", f"{name}.txt")
    return path, (image_list if os.path.isfile(image_list) else None)


def parse_flickr_cn(captions: str, images_dir: str, image_list: str | None = None,
                    detok: str = "auto") -> ParseResult:
    """Flickr30k-CN / Flickr8k-CN sentences. ``captions`` is a caption file or a collection
    folder (then its ImageSets list is used unless ``image_list`` is given). ``detok``:
    ``auto`` (when the caption file name starts with ``seg.``), ``on`` or ``off``."""
    if detok not in ("auto", "on", "off"):
        raise ValueError(f"detok must be auto, on or off, got {detok!r}")
    if os.path.isdir(captions):
        captions, found_list = find_flickr_cn_files(captions)
        image_list = image_list or found_list
    do_detok = detok == "on" or (detok == "auto" and os.path.basename(captions).startswith("seg."))
    by_image: dict[str, list[PairRecord]] = {}
    for line_no, line in _text_lines(captions):
        if not line.strip():
            continue
        kt = _split_key_text(line)
        parts = kt[0].split("#") if kt else []
        if len(parts) not in (2, 3) or not parts[0]:
            raise DataError(captions, line_no, "expected 'IMAGE#LANG#N caption' or 'IMAGE#N caption' "
                                               "(e.g. 1000092795#zhm#0 or 1000268201_693b08cb0e.jpg#zhb#0)")
        file_name = parts[0] if strip_image_ext(parts[0]) != parts[0] else parts[0] + ".jpg"
        text = detokenize_segmented(kt[1]) if do_detok else kt[1]
        image_id = strip_image_ext(parts[0])
        by_image.setdefault(image_id, []).append(PairRecord(
            text, image_id, os.path.join(images_dir, file_name), captions, f"caption line {line_no}"))
    notes = []
    if image_list:
        wanted = read_id_list(image_list)
        ids = [i for i in wanted if i in by_image]
        if len(ids) < len(wanted):
            missing = [i for i in wanted if i not in by_image]
            notes.append(f"{len(missing)} image(s) of {image_list} have no sentence (first: {', '.join(missing[:5])})")
        outside = len(by_image) - len(ids)
        if outside:
            notes.append(f"{outside} image(s) with sentences in {captions} are not in {image_list}: left out")
    else:
        ids = list(by_image)
    records = [r for i in ids for r in by_image[i]]
    if not records:
        raise ConversionError(f"{captions}: no sentence for the requested images")
    return ParseResult(records, notes)


# ---------------------------------------------------------------------------------------------
# AI Challenger ICC


def parse_aic_icc(annotations: str, images_dir: str, image_list: str | None = None) -> ParseResult:
    """AI Challenger caption JSON list; lines in file order (or ``image_list`` order)."""
    data = _load_json(annotations)
    if not isinstance(data, list):
        raise ConversionError(f'{annotations}: expected a JSON list of {{"image_id", "caption": [...]}}')
    by_image: dict[str, list[PairRecord]] = {}
    repeated = 0
    for k, entry in enumerate(data, start=1):
        if not isinstance(entry, dict) or not isinstance(entry.get("image_id"), str) or "caption" not in entry:
            raise ConversionError(f'{annotations}: entry {k} needs "image_id" (file name) and "caption"')
        file_name = entry["image_id"].strip()
        captions = entry["caption"]
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise ConversionError(f'{annotations}: entry {k}: "caption" must be a list of strings')
        image_id = strip_image_ext(file_name)
        if strip_image_ext(file_name) == file_name:
            file_name += ".jpg"
        if image_id in by_image:
            repeated += 1
        group = by_image.setdefault(image_id, [])
        group += [PairRecord(c, image_id, os.path.join(images_dir, file_name), annotations, f"caption entry {k}")
                  for c in captions]
    notes = [f"{repeated} image id(s) appear in more than one entry of {annotations}"] if repeated else []
    if image_list:
        wanted = read_id_list(image_list)
        ids = [i for i in wanted if i in by_image]
        if len(ids) < len(wanted):
            notes.append(f"{len(wanted) - len(ids)} image(s) of {image_list} are not in {annotations}")
    else:
        ids = list(by_image)
    records = [r for i in ids for r in by_image[i]]
    if not records:
        raise ConversionError(f"{annotations}: no captions")
    return ParseResult(records, notes)


# ---------------------------------------------------------------------------------------------
# MUGE / Chinese-CLIP


def index_base64_tsv(path: str) -> dict[str, Base64Ref]:
    """Image id -> where its base64 sits, from an ``image_id \\t base64`` TSV, reading the file
    once without keeping the (large) base64 in memory."""
    index: dict[str, Base64Ref] = {}
    first_line: dict[str, int] = {}
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise ConversionError(f"{path}: file not found") from None
    with f:
        pos = 0
        for line_no, raw in enumerate(f, start=1):
            start, pos = pos, pos + len(raw)
            body = raw.rstrip(b"\r\n")
            if line_no == 1 and body.startswith(UTF8_BOM):
                body, start = body[len(UTF8_BOM):], start + len(UTF8_BOM)
            if not body.strip():
                continue
            fields = body.split(b"\t")
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
            index[key] = Base64Ref(path, start + len(fields[0]) + 1, len(fields[1]))
    if not index:
        raise ConversionError(f"{path}: no images")
    return index


def parse_muge(imgs_tsv: str, texts_jsonl: str) -> ParseResult:
    """One record per (text, image id) of a Chinese-CLIP ``texts.jsonl``; images by reference
    into ``imgs.tsv`` (an id absent from it becomes a missing image)."""
    index = index_base64_tsv(imgs_tsv)
    records: list[PairRecord] = []
    no_images = 0
    for line_no, line in _text_lines(texts_jsonl):
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


# ---------------------------------------------------------------------------------------------
# the project's Flickr8k-CN reference folder (../shared/data/flickr8k_cn)

FLICKR8K_CN_HEADER = ["image_file", "image_id", "lang", "caption"]


def parse_flickr8k_cn_reference(data_dir: str, split: str, lang: str = "zh") -> ParseResult:
    """``captions_{split}.tsv`` (header image_file, image_id, lang, caption) + ``images/``;
    ``lang`` zh, en or both (file order)."""
    if lang not in ("zh", "en", "both"):
        raise ValueError(f"lang must be zh, en or both, got {lang!r}")
    path = os.path.join(data_dir, f"captions_{split}.tsv")
    images = os.path.join(data_dir, "images")
    records = []
    for line_no, line in _text_lines(path):
        if line_no == 1:
            if [f.strip() for f in line.split("\t")] != FLICKR8K_CN_HEADER:
                raise DataError(path, 1, f"expected the header {' / '.join(FLICKR8K_CN_HEADER)}")
            continue
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 4:
            raise DataError(path, line_no, f"expected 4 tab-separated columns, found {len(fields)}")
        image_file, image_id, line_lang = (f.strip() for f in fields[:3])
        if line_lang not in ("zh", "en"):
            raise DataError(path, line_no, f"lang (column 3) must be zh or en, got {line_lang!r}")
        if lang != "both" and line_lang != lang:
            continue
        records.append(PairRecord("\t".join(fields[3:]), image_id, os.path.join(images, image_file), path,
                                  f"caption line {line_no}"))
    if not records:
        raise ConversionError(f"{path}: no {lang} captions")
    return ParseResult(records)


# ---------------------------------------------------------------------------------------------
# images

_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"),
               (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def sniff_image_format(data: bytes) -> str | None:
    """The image format from the first bytes, or None when it is not a known image."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    return None


def shrink_image(data: bytes, max_side: int) -> bytes | None:
    """JPEG (quality 95) of the image shrunk with INTER_AREA so its long side is ``max_side``,
    or None when it already fits. Raises ValueError when cv2 cannot decode it."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("cv2 cannot decode it")
    h, w = img.shape[:2]
    if max(h, w) <= max_side:
        return None
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise ValueError("cv2 cannot re-encode it as JPEG")
    return buf.tobytes()


class _Unusable(Exception):
    """An image is missing (``missing``) or unreadable (reason in args[0])."""

    def __init__(self, reason: str, missing: bool = False):
        super().__init__(reason)
        self.missing = missing


class _ImageLoader:
    """Turns a record's image into the base64 text to write, with a small LRU cache (captions of
    one image are usually adjacent) and open handles on base64 TSVs."""

    def __init__(self, max_side: int | None, verify: bool, cache_size: int = 32):
        self.max_side = max_side
        self.verify = verify
        self.cache: OrderedDict[object, str | _Unusable] = OrderedDict()
        self.cache_size = cache_size
        self.handles: dict[str, object] = {}
        self.resized = 0

    def close(self) -> None:
        for h in self.handles.values():
            h.close()
        self.handles.clear()

    def b64(self, image) -> str:
        key = image if not isinstance(image, bytes) else ("bytes", id(image))
        hit = self.cache.get(key)
        if hit is None:
            try:
                hit = self._load(image)
            except _Unusable as e:
                hit = e
            self.cache[key] = hit
            if len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(key)
        if isinstance(hit, _Unusable):
            raise hit
        return hit

    def _read_ref(self, ref: Base64Ref) -> str:
        f = self.handles.get(ref.path)
        if f is None:
            f = self.handles[ref.path] = open(ref.path, "rb")
        f.seek(ref.offset)
        return f.read(ref.length).strip().translate(_URLSAFE_TO_STD).decode("ascii", "replace")

    def _load(self, image) -> str:
        if image is None:
            raise _Unusable("not found", missing=True)
        b64 = None
        if isinstance(image, Base64Ref):
            b64 = self._read_ref(image)
            try:
                data = decode_b64(b64)
            except ValueError as e:
                raise _Unusable(str(e)) from None
        elif isinstance(image, bytes):
            data = image
        else:
            try:
                with open(image, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                raise _Unusable("not found", missing=True) from None
            except OSError as e:
                raise _Unusable(e.strerror or str(e)) from None
        if not data:
            raise _Unusable("empty file")
        if sniff_image_format(data) is None:
            raise _Unusable(f"not a JPEG/PNG/GIF/BMP/TIFF/WEBP image (starts with {data[:8]!r})")
        if self.max_side:
            try:
                small = shrink_image(data, self.max_side)
            except ValueError as e:
                raise _Unusable(str(e)) from None
            if small is not None:
                self.resized += 1
                return base64.b64encode(small).decode("ascii")
        elif self.verify and cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is None:
            raise _Unusable("cv2 cannot decode it")
        return b64 if b64 is not None else base64.b64encode(data).decode("ascii")


def _image_name(record: PairRecord) -> str:
    return record.image if isinstance(record.image, str) else record.image_id


# ---------------------------------------------------------------------------------------------
# writer


@dataclass
class WriteStats:
    out_path: str
    records: int = 0  # caption records read
    lines: int = 0  # lines written
    images: int = 0  # distinct image ids written
    sanitised: int = 0  # captions whose tabs / line breaks became spaces
    empty_captions: int = 0  # skipped: caption empty after cleaning
    extra_captions: int = 0  # skipped by one_per_image (not the image's first caption)
    beyond_limit: int = 0  # skipped by max_images
    skipped_lines: int = 0  # skipped because the image is missing / unreadable
    bad_images: int = 0  # distinct missing / unreadable images (skip_missing)
    first_bad: list[str] = field(default_factory=list)  # "image (reason)" of the first few
    resized: int = 0  # images shrunk by max_side
    tags_filled: int = 0  # lines whose 4th column got tags
    tags_missing: int = 0  # lines whose image id is not in the tags table (empty 4th column)
    seconds: float = 0.0

    @property
    def lines_per_second(self) -> float:
        return self.lines / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        parts = [f"wrote {self.lines} lines ({self.images} images) to {self.out_path} "
                 f"in {self.seconds:.1f} s ({self.lines_per_second:.0f} lines/s)"]
        if self.sanitised:
            parts.append(f"{self.sanitised} caption(s) had tabs/line breaks replaced by spaces")
        if self.empty_captions:
            parts.append(f"{self.empty_captions} empty caption(s) skipped")
        if self.extra_captions:
            parts.append(f"{self.extra_captions} further caption(s) left out (one line per image)")
        if self.beyond_limit:
            parts.append(f"{self.beyond_limit} caption(s) of images past the image limit left out")
        if self.bad_images:
            parts.append(f"skipped {self.skipped_lines} line(s) of {self.bad_images} missing/unreadable "
                         f"image(s); first: {'; '.join(self.first_bad)}")
        if self.resized:
            parts.append(f"{self.resized} image(s) shrunk and re-encoded")
        if self.tags_filled or self.tags_missing:
            parts.append(f"tags on {self.tags_filled} line(s), none for {self.tags_missing} line(s)")
        return "\n".join(parts)


def write_pairs_tsv(
    records: Iterable[PairRecord],
    out_path: str | os.PathLike,
    *,
    one_per_image: bool = False,
    tags: dict[str, str] | None = None,
    skip_missing: bool = False,
    max_side: int | None = None,
    verify: bool = False,
    max_images: int | None = None,
    progress: bool = True,
    desc: str | None = None,
    max_reported: int = 10,
) -> WriteStats:
    """Write the records as an official-format TSV, atomically (temporary name + os.replace).

    one_per_image: only each image's first caption. tags: image id -> tags for the 4th column
    (empty when the id is absent; an error when no line at all gets tags, which means the ids do
    not match). skip_missing: skip lines whose image is missing / unreadable instead of raising
    MissingImageError. max_side: shrink larger images (JPEG q95). verify: fully decode every
    image with cv2 (max_side implies it). max_images: keep only the first N images written.
    Raises ConversionError when no line would be written.
    """
    out_path = os.fspath(out_path)
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    stats = WriteStats(out_path)
    out_dir = os.path.dirname(out_path) or "."
    os.makedirs(out_dir, exist_ok=True)
    tmp_path = os.path.join(out_dir, f".{os.path.basename(out_path)}.{os.getpid()}.tmp")
    loader = _ImageLoader(max_side, verify)
    written: set[str] = set()  # image ids with a line
    done: set[str] = set()  # image ids handled in one_per_image mode (written or skipped)
    bad: set[object] = set()
    total = len(records) if hasattr(records, "__len__") else None
    start = time.perf_counter()
    try:
        with open(tmp_path, "w", encoding="utf-8", newline="\n") as out:
            for rec in tqdm(records, total=total, desc=desc or os.path.basename(out_path), unit="caption",
                            disable=not progress, file=sys.stderr, mininterval=0.5):
                stats.records += 1
                image_id, changed = clean_field(rec.image_id)
                if changed or not image_id:
                    raise ConversionError(f"{rec.source}: image id {rec.image_id!r} is empty or holds a tab / "
                                          f"line break ({rec.where})")
                if one_per_image and image_id in done:
                    stats.extra_captions += 1
                    continue
                if max_images and image_id not in written and len(written) >= max_images:
                    stats.beyond_limit += 1
                    continue
                caption, changed = clean_field(rec.caption)
                if not caption:
                    stats.empty_captions += 1
                    continue
                try:
                    b64 = loader.b64(rec.image)
                except _Unusable as e:
                    what = "not found" if e.missing else f"unreadable: {e}"
                    if not skip_missing:
                        raise MissingImageError(f"{rec.source}: image '{_image_name(rec)}' {what} ({rec.where})") from None
                    stats.skipped_lines += 1
                    key = _image_name(rec)
                    if key not in bad:
                        bad.add(key)
                        if len(stats.first_bad) < max_reported:
                            stats.first_bad.append(f"{key} ({what})")
                    if one_per_image:
                        done.add(image_id)
                    continue
                stats.sanitised += changed
                cols = [caption, image_id, b64]
                if tags is not None or rec.label is not None:
                    tag_text = tags.get(image_id) if tags is not None else None
                    if tags is not None:
                        if tag_text is None:
                            stats.tags_missing += 1
                        else:
                            stats.tags_filled += 1
                    cols.append(clean_field(tag_text or "")[0])
                if rec.label is not None:
                    label, _ = clean_field(rec.label)
                    if not label:
                        raise ConversionError(f"{rec.source}: empty label ({rec.where})")
                    cols.append(label)
                out.write("\t".join(cols) + "\n")
                stats.lines += 1
                written.add(image_id)
                done.add(image_id)
        if stats.lines == 0:
            why = f"; {len(bad)} image(s) missing/unreadable" if bad else ""
            raise ConversionError(f"{out_path}: nothing to write ({stats.records} caption(s) read{why})")
        if tags is not None and stats.tags_filled == 0:
            raise ConversionError(f"{out_path}: no image id of the data is in the tags table "
                                  f"(e.g. {next(iter(written))!r} vs {next(iter(tags))!r})")
        os.replace(tmp_path, out_path)
    except BaseException:
        try:
            os.unlink(tmp_path)
        except FileNotFoundError:
            pass
        raise
    finally:
        loader.close()
        stats.bad_images = len(bad)
        stats.images = len(written)
        stats.resized = loader.resized
        stats.seconds = time.perf_counter() - start
    return stats

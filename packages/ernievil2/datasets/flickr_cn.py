"""``flickr30k-cn``: Flickr30k-CN / Flickr8k-CN of the fluent-cap release (see the package docstring)."""
from __future__ import annotations

import os
import re

from ..data.tsv import DataError
from .common import (ConversionError, PairRecord, ParseResult, select_listed, split_key_text,
                     strip_image_ext, text_lines)


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
    for line_no, line in text_lines(captions):
        if not line.strip():
            continue
        kt = split_key_text(line)
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
    ids, missing = select_listed(by_image, image_list)
    if missing:
        notes.append(f"{len(missing)} image(s) of {image_list} have no sentence (first: {', '.join(missing[:5])})")
    if image_list and len(by_image) > len(ids):
        notes.append(f"{len(by_image) - len(ids)} image(s) with sentences in {captions} are not in "
                     f"{image_list}: left out")
    records = [r for i in ids for r in by_image[i]]
    if not records:
        raise ConversionError(f"{captions}: no sentence for the requested images")
    return ParseResult(records, notes)

"""``coco-cn``: COCO-CN sentences with MS-COCO 2014 (or 2017) images (see the package docstring)."""
from __future__ import annotations

import os
import re
from typing import Sequence

from ..data.tsv import DataError
from .common import (ConversionError, PairRecord, ParseResult, select_listed, split_key_text,
                     strip_image_ext, text_lines)


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


def parse_coco_cn(captions: str, image_roots: Sequence[str], split_list: str | None = None) -> ParseResult:
    """COCO-CN sentences for the ids in ``split_list`` (all when None), grouped by image in list
    order (caption-file order without a list). Lines are ``ID#N \\t sentence`` (human-written)
    or ``ID#zhm#N sentence`` (manually-translated: no tab, split at the first space); the image
    id ends at the first ``#``."""
    by_image: dict[str, list[PairRecord]] = {}
    for line_no, line in text_lines(captions):
        if not line.strip():
            continue
        kt = split_key_text(line)
        if kt is None or "#" not in kt[0]:
            raise DataError(captions, line_no, "expected 'IMAGE_ID#N<TAB>sentence' or "
                                               "'IMAGE_ID#zhm#N sentence' "
                                               "(e.g. COCO_val2014_000000123456#0)")
        key, text = kt
        image_id = strip_image_ext(key.split("#", 1)[0])
        if not image_id:
            raise DataError(captions, line_no, "empty image id before '#'")
        by_image.setdefault(image_id, []).append(
            PairRecord(text, image_id, None, captions, f"caption line {line_no}"))
    notes = []
    ids, no_caption = select_listed(by_image, split_list)
    if no_caption:
        notes.append(f"{len(no_caption)} image(s) of {split_list} have no sentence in {captions} "
                     f"(first: {', '.join(no_caption[:5])})")
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

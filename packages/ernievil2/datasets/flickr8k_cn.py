"""``flickr8k-cn reference``: this project's ``../shared/data/flickr8k_cn`` folder."""
from __future__ import annotations

import os

from ..data.tsv import DataError
from .common import ConversionError, PairRecord, ParseResult, text_lines


FLICKR8K_CN_HEADER = ["image_file", "image_id", "lang", "caption"]


def parse_flickr8k_cn_reference(data_dir: str, split: str, lang: str = "zh") -> ParseResult:
    """``captions_{split}.tsv`` (header image_file, image_id, lang, caption) + ``images/``;
    ``lang`` zh, en or both (file order)."""
    if lang not in ("zh", "en", "both"):
        raise ValueError(f"lang must be zh, en or both, got {lang!r}")
    path = os.path.join(data_dir, f"captions_{split}.tsv")
    images = os.path.join(data_dir, "images")
    records = []
    for line_no, line in text_lines(path):
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

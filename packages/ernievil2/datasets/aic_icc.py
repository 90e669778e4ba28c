"""``aic-icc``: AI Challenger 2017 image captioning (see the package docstring)."""
from __future__ import annotations

import os

from .common import ConversionError, PairRecord, ParseResult, load_json, select_listed, strip_image_ext


def parse_aic_icc(annotations: str, images_dir: str, image_list: str | None = None) -> ParseResult:
    """AI Challenger caption JSON list; lines in file order (or ``image_list`` order). A newline
    inside a caption is deleted, as the official baseline does (the captions are Chinese: a
    space there would be a token no annotator wrote); other whitespace is left to the writer."""
    data = load_json(annotations)
    if not isinstance(data, list):
        raise ConversionError(f'{annotations}: expected a JSON list of {{"image_id", "caption": [...]}}')
    by_image: dict[str, list[PairRecord]] = {}
    repeated = joined = 0
    for k, entry in enumerate(data, start=1):
        if not isinstance(entry, dict) or not isinstance(entry.get("image_id"), str) or "caption" not in entry:
            raise ConversionError(f'{annotations}: entry {k} needs "image_id" (file name) and "caption"')
        file_name = entry["image_id"].strip()
        captions = entry["caption"]
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise ConversionError(f'{annotations}: entry {k}: "caption" must be a list of strings')
        joined += sum("\n" in c for c in captions)
        captions = [c.replace("\n", "") for c in captions]
        image_id = strip_image_ext(file_name)
        if strip_image_ext(file_name) == file_name:
            file_name += ".jpg"
        if image_id in by_image:
            repeated += 1
        group = by_image.setdefault(image_id, [])
        group += [PairRecord(c, image_id, os.path.join(images_dir, file_name), annotations, f"caption entry {k}")
                  for c in captions]
    notes = [f"{repeated} image id(s) appear in more than one entry of {annotations}"] if repeated else []
    if joined:
        notes.append(f"{joined} caption(s) of {annotations} had newlines deleted (as the official "
                     "baseline does)")
    ids, missing = select_listed(by_image, image_list)
    if missing:
        notes.append(f"{len(missing)} image(s) of {image_list} are not in {annotations}")
    records = [r for i in ids for r in by_image[i]]
    if not records:
        raise ConversionError(f"{annotations}: no captions")
    return ParseResult(records, notes)

"""Write parsed records as an official-format TSV (atomically, through ernievil2.fileio)."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable

from tqdm import tqdm

from ..fileio import atomic_write
from .common import ConversionError, MissingImageError, PairRecord, clean_field
from .images import ImageLoader, Unusable, image_name


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
    """Write the records as an official-format TSV, atomically (fileio.atomic_write).

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
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    loader = ImageLoader(max_side, verify)
    written: set[str] = set()  # image ids with a line
    done: set[str] = set()  # image ids handled in one_per_image mode (written or skipped)
    bad: set[object] = set()
    total = len(records) if hasattr(records, "__len__") else None
    start = time.perf_counter()
    try:
        with atomic_write(out_path, "w", encoding="utf-8", newline="\n") as out:
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
                except Unusable as e:
                    what = "not found" if e.missing else f"unreadable: {e}"
                    if not skip_missing:
                        raise MissingImageError(f"{rec.source}: image '{image_name(rec)}' {what} ({rec.where})") from None
                    stats.skipped_lines += 1
                    key = image_name(rec)
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
            if stats.lines == 0:  # raised inside the block: no file is left behind
                why = f"; {len(bad)} image(s) missing/unreadable" if bad else ""
                raise ConversionError(f"{out_path}: nothing to write ({stats.records} caption(s) read{why})")
            if tags is not None and stats.tags_filled == 0:
                raise ConversionError(f"{out_path}: no image id of the data is in the tags table "
                                      f"(e.g. {next(iter(written))!r} vs {next(iter(tags))!r})")
    finally:
        loader.close()
        stats.bad_images = len(bad)
        stats.images = len(written)
        stats.resized = loader.resized
        stats.seconds = time.perf_counter() - start
    return stats

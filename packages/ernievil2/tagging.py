"""Object tags into a training TSV's 4th column: the top-k ImageNet classes of each line's image
(tools/extract_tags.py, and the trainer when the tags view needs them and the file has none).

Each distinct image is classified once (by image id: the captions of one image share its tags;
an id seen again with different image bytes is an error). Columns 1-3 are copied, an existing
column 4 is replaced, a label in column 5 is kept. Tags come from the pixels only, never from the
caption (see tags.py for the classifier's preprocessing and the class-name cleaning).
"""
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .data.tsv import DataError, count_lines, iter_records, record_image_bytes
from .fileio import atomic_write
from .tags import classifier_transform, format_tags
from .transforms import decode_image


def _image_key(record, digest):
    # Lines without an image id are cached by their image bytes instead.
    return record.image_id or f"sha1:{digest}"


def _prepare(path, record):
    try:
        return classifier_transform(decode_image(record_image_bytes(path, record)))
    except DataError:
        raise
    except ValueError as e:
        raise DataError(path, record.line_no, f"image: {e}") from None


def classify_images(in_path, tagger, batch_size=32, num_workers=2, progress=True):
    """{image key: tag string} for every distinct image of the file (one classification each)."""
    tags, seen = {}, {}  # key -> tags; key -> (line_no, sha1 of the base64 field)
    pending = []

    def flush(pool):
        if not pending:
            return
        pixels = list(pool.map(lambda r: _prepare(in_path, r), [r for _, r in pending]))
        for (key, _), names in zip(pending, tagger.tag_pixels(np.stack(pixels))):
            tags[key] = format_tags(names)
        pending.clear()

    total = count_lines(in_path)
    with ThreadPoolExecutor(max(1, num_workers)) as pool, \
            tqdm(total=total, unit="line", desc=f"tagging {os.path.basename(in_path)}",
                 disable=not progress, dynamic_ncols=True) as bar:
        for record in iter_records(in_path):
            digest = hashlib.sha1(record.image_b64.encode("ascii", "replace")).hexdigest()
            key = _image_key(record, digest)
            if key in seen:
                first_line, first_digest = seen[key]
                if first_digest != digest:
                    raise DataError(in_path, record.line_no,
                                    f"image id {record.image_id!r} has different image bytes than "
                                    f"on line {first_line}; tags are cached per image id")
            else:
                seen[key] = (record.line_no, digest)
                pending.append((key, record))
                if len(pending) >= batch_size:
                    flush(pool)
                    bar.set_postfix(images=len(tags))
            bar.update(record.line_no - bar.n)
        flush(pool)
        bar.set_postfix(images=len(tags))
    return tags


def write_tagged(in_path, out_path, tags):
    """Copy in_path to out_path with column 4 = the tags of each line's image (atomic)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with atomic_write(out_path, "w", encoding="utf-8", newline="\n") as f:
        for record in iter_records(in_path):
            digest = "" if record.image_id else hashlib.sha1(
                record.image_b64.encode("ascii", "replace")).hexdigest()
            fields = [record.text, record.image_id, record.image_b64,
                      tags[_image_key(record, digest)]]
            if record.label is not None:
                fields.append(record.label)
            f.write("\t".join(fields) + "\n")
            n += 1
    return n


def extract_tags(in_path, out_path, tagger, batch_size=32, num_workers=2, progress=True):
    """Tag every line of in_path into out_path (which may be in_path); returns (lines written,
    distinct images)."""
    tags = classify_images(in_path, tagger, batch_size, num_workers, progress)
    return write_tagged(in_path, out_path, tags), len(tags)

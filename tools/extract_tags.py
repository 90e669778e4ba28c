"""Write object tags (column 4) into a training TSV: the top-k ImageNet classes of each image.

    python tools/extract_tags.py IN.tsv OUT.tsv [--lang zh|en] [--topk 3]
        [--weights ../shared/data/efficientnet_lite0/efficientnet_lite0_imagenet.npz]
        [--classes ../shared/data/imagenet_classes.tsv] [--batch 32]

Each image is classified once (by image id: the captions of one image share its tags; an id
seen again with different image bytes is an error) by the ImageNet EfficientNet-Lite0, and the
names of its top-k distinct classes, joined by spaces, become column 4 (see ernievil2/tags.py for
the preprocessing and the name cleaning). Columns 1-3 are copied, an existing column 4 is
replaced, a label in column 5 is kept. Tags come from the pixels only, never from the caption.
OUT.tsv is written to a temporary name and moved into place, so a failed run leaves no partial
file (and IN.tsv may be OUT.tsv).
"""
import argparse
import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages"))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ernievil2.data.tsv import DataError, count_lines, iter_records, record_image_bytes  # noqa: E402
from ernievil2.fileio import atomic_write  # noqa: E402
from ernievil2.tags import ObjectTagger, classifier_transform, format_tags  # noqa: E402
from ernievil2.transforms import decode_image  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_WEIGHTS = SHARED / "efficientnet_lite0" / "efficientnet_lite0_imagenet.npz"
DEFAULT_CLASSES = SHARED / "imagenet_classes.tsv"


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
    """Tag every line of in_path into out_path; returns (lines written, distinct images)."""
    tags = classify_images(in_path, tagger, batch_size, num_workers, progress)
    return write_tagged(in_path, out_path, tags), len(tags)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("input", metavar="IN.tsv")
    ap.add_argument("output", metavar="OUT.tsv")
    ap.add_argument("--lang", choices=["zh", "en"], default="zh", help="class-name language (default zh)")
    ap.add_argument("--topk", type=int, default=3, help="tags per image (default 3)")
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS),
                    help="EfficientNet-Lite0 ImageNet npz (lukemelas-style names)")
    ap.add_argument("--classes", default=str(DEFAULT_CLASSES),
                    help="imagenet_classes.tsv (class_index, wnid, label_en, label_zh)")
    ap.add_argument("--batch", type=int, default=32, help="images per classifier call")
    ap.add_argument("--workers", type=int, default=2, help="decode/preprocess threads")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.topk < 1 or args.batch < 1:
        ap.error("--topk and --batch must be positive")
    for what, p in (("input", args.input), ("--weights", args.weights), ("--classes", args.classes)):
        if not Path(p).is_file():
            print(f"extract_tags: error: {what} {p}: no such file", file=sys.stderr)
            return 1
    try:
        tagger = ObjectTagger.lite0(args.weights, args.classes, args.lang, args.topk, args.batch)
        n, images = extract_tags(args.input, args.output, tagger, args.batch, args.workers,
                                 progress=not args.no_progress)
    except (DataError, ValueError) as e:
        print(f"extract_tags: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {n} lines ({images} images, top-{args.topk} {args.lang} tags) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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


# ------------------------------------------------------------------- visual concepts (ViCHA)
CONCEPT_TOPK = 3  # tags per image, as the trainer computes them (train/prepare.py)


def concept_tagger(classifier, classes="", lang="zh", topk=CONCEPT_TOPK):
    """The ImageNet Lite0 classifier the tags come from: the reference npz
    (../shared/data/efficientnet_lite0) or a tower checkpoint with its head (the
    efficientnet-lite0-imagenet download); class names from `classes` (imagenet_classes.tsv),
    else the class numbers as words (c0 .. c999), as the trainer names them."""
    from .models.lite0_timm import classifier_from_checkpoint
    from .tags import ObjectTagger, load_class_names

    if not os.path.isfile(classifier):
        raise FileNotFoundError(f"tag classifier not found: {classifier}")
    if str(classifier).endswith(".npz"):
        from .models.efficientnet import build_efficientnet
        from .models.lite0_port import load_lite0_npz

        model = build_efficientnet("lite0", with_classifier=True)
        load_lite0_npz(model, classifier)
    else:
        model = classifier_from_checkpoint(classifier)
    names = (load_class_names(classes, lang) if classes
             else [f"c{i}" for i in range(model.num_classes)])
    return ObjectTagger(model, names, topk=topk)


class ImageConcepts:
    """The tags of every line's image of one TSV, for a model with visual concepts: the line's 4th
    column when it has one, else the classifier's top-k classes of the image (each distinct image
    classified once, up front). The caption (column 1) is never read."""

    def __init__(self, path, tagger=None, progress=False):
        self.path = path
        self.by_image = {}
        needs_classifier = any(r.tags is None for r in iter_records(path))
        if needs_classifier:
            if tagger is None:
                raise DataError(path, None, "visual_concepts: lines without tags (column 4) need "
                                "the tag classifier")
            self.by_image = classify_images(path, tagger, progress=progress)

    def tags(self, batch):
        """The tag text of each line of a data.pipeline Batch of this file."""
        out = []
        for line_no, image_id, tags in zip(batch.line_numbers, batch.image_ids, batch.tags):
            if tags is None:
                if not image_id:
                    raise DataError(self.path, int(line_no), "visual_concepts: a line without an "
                                    "image id (column 2) needs its tags in column 4")
                tags = self.by_image[image_id]
            out.append(tags.replace(",", " "))  # the trainer's reading of column 4
        return out

    def tag_ids(self, batch, tokenizer):
        """Padded token ids of each line's tags ([B, L] int64)."""
        return tokenizer.batch_encode(self.tags(batch), padding="longest").astype("int64")


def concept_classifier_path(cfg):
    """tag_classifier, or the efficientnet-lite0-imagenet download (FileNotFoundError naming the
    download command when it is not there)."""
    from .pretrained import REGISTRY, cache_path, fetch_command

    if cfg.tag_classifier:
        return cfg.tag_classifier
    path = cache_path(REGISTRY["efficientnet-lite0-imagenet"])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"visual_concepts: embed tags images with the ImageNet Lite0 "
                                f"classifier: set tag_classifier, or run "
                                f"{fetch_command('efficientnet-lite0-imagenet')}")
    return path


def image_tags_for(cfg, path, tokenizer, progress=False):
    """Batch -> tag ids of the lines of `path` for a config with visual_concepts: embed (the
    classifier is only loaded when some line has no 4th column)."""
    needs = any(r.tags is None for r in iter_records(path))
    tagger = (concept_tagger(concept_classifier_path(cfg), cfg.tag_classes, cfg.tag_lang)
              if needs else None)
    concepts = ImageConcepts(path, tagger, progress)
    return lambda batch: concepts.tag_ids(batch, tokenizer)

"""Zero-shot image classification with the dual encoder: class names become prompts, prompts
become one embedding per class, and an image's class is the class embedding nearest to it.

Prompt ensembling (CLIP, Radford et al. 2021, sec. 3.1.4): every class name is put into each
template ("一张{}的照片。", "a photo of a {}."); the class embedding is the mean of its prompts'
L2-normalised text embeddings, renormalised. The class embeddings are computed once per run;
scores are cosine similarities (image · class), the temperature does not change the ranking.

Inputs: a class-name file (imagenet_classes.tsv: a header, then class_index \\t wnid \\t label_en
\\t label_zh; or a plain file, one name a line, the line order being the class index), and images
from a TSV in the training format whose 5th (label) column holds the truth (a class index, or a
class name matched after clean_class_name), or from a folder with one sub-folder per class (named
like the class, after clean_class_name, or by its index).
"""
from __future__ import annotations

import os
import re
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np

from .data.pipeline import BatchLoader
from .data.tsv import DataError
from .tags import CLASSES_HEADER, clean_class_name, load_class_names

TEMPLATES = {
    "zh": ["一张{}的照片。", "{}的照片。", "一张{}的图片。", "{}的图片。", "一张清晰的{}的照片。",
           "一张小的{}的照片。", "一张大的{}的照片。", "这是{}。"],
    "en": ["a photo of a {}.", "a picture of a {}.", "a photo of the {}.", "an image of a {}.",
           "a good photo of a {}.", "a close-up photo of a {}.", "a photo of a small {}.",
           "a photo of a large {}.", "this is a {}."],
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


# ------------------------------------------------------------------------------------ inputs
def load_templates(path) -> list[str]:
    """A user's templates, one a line, each with exactly one `{}` for the class name."""
    path = os.fspath(path)
    templates = []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if line.count("{}") != 1:
                raise DataError(path, line_no, f"a template needs exactly one {{}} for the class "
                                f"name, got {line!r}")
            templates.append(line.strip())
    if not templates:
        raise DataError(path, None, "no templates (one a line, each with one {})")
    return templates


def load_classes(path, lang: str = "zh") -> list[str]:
    """Class names in index order: imagenet_classes.tsv (its `lang` column, cleaned) or a plain
    file of one name a line (used as written; blank lines only at the end)."""
    path = os.fspath(path)
    with open(path, encoding="utf-8-sig") as f:
        lines = f.read().splitlines()
    if lines and set(CLASSES_HEADER) <= set(lines[0].split("\t")):
        try:
            return load_class_names(path, lang)
        except ValueError as e:  # "PATH[:LINE]: problem" -> the project's DataError
            where = re.match(r"(\d+): (.*)", str(e).removeprefix(f"{path}:").strip(), re.S)
            raise (DataError(path, int(where[1]), where[2]) if where else
                   DataError(path, None, str(e).removeprefix(f"{path}:").strip())) from e
    while lines and not lines[-1].strip():
        lines.pop()
    names = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            raise DataError(path, line_no, "empty class name")
        names.append(" ".join(line.split()))
    if not names:
        raise DataError(path, None, "no class names")
    return names


class LabelResolver:
    """A label (a class index, or a class name compared after clean_class_name) -> class index."""

    def __init__(self, class_names: Sequence[str]):
        self.n = len(class_names)
        self.by_name = {}
        for i, name in enumerate(class_names):
            for key in (name, clean_class_name(name)):
                self.by_name.setdefault(key, i)  # two classes may share a name: the first wins

    def __call__(self, label: str | None, path, line_no) -> int:
        if label is None or not label.strip():
            raise DataError(path, line_no, "no label (the 5th column: a class index or name)")
        label = label.strip()
        if label.lstrip("-").isdigit():
            index = int(label)
            if not 0 <= index < self.n:
                raise DataError(path, line_no, f"class index {index} out of range 0..{self.n - 1}")
            return index
        index = self.by_name.get(clean_class_name(label))
        if index is None:
            raise DataError(path, line_no, f"label {label!r} is not a class of the class-name file")
        return index


class LabelledBatch(NamedTuple):
    images: np.ndarray  # float32 [B, 3, H, W]
    labels: np.ndarray  # int64 [B]
    ids: list  # where each image came from (TSV line or file path), for the report


def folder_images(folder, resolve: LabelResolver) -> list[tuple[str, int]]:
    """(image path, class index) of a folder of class sub-folders, sorted; a sub-folder's name
    is its label."""
    folder = os.fspath(folder)
    items = []
    for sub in sorted(os.listdir(folder)):
        sub_path = os.path.join(folder, sub)
        if not os.path.isdir(sub_path):
            continue
        label = resolve(sub, sub_path, None)
        for name in sorted(os.listdir(sub_path)):
            if name.lower().endswith(IMAGE_SUFFIXES):
                items.append((os.path.join(sub_path, name), label))
    if not items:
        raise DataError(folder, None, "no images in class sub-folders "
                        f"(one sub-folder per class, files ending {', '.join(IMAGE_SUFFIXES)})")
    return items


def folder_batches(items, batch_size: int, transform: Callable, decode: Callable) -> Iterator[LabelledBatch]:
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        images = []
        for path, _ in chunk:
            with open(path, "rb") as f:
                raw = f.read()
            try:
                images.append(np.asarray(transform(decode(raw)), np.float32))
            except ValueError as e:
                raise DataError(path, None, f"undecodable image: {e}") from e
        yield LabelledBatch(np.stack(images), np.array([c for _, c in chunk], np.int64),
                            [p for p, _ in chunk])


def tsv_batches(loader, resolve: LabelResolver) -> Iterator[LabelledBatch]:
    """A BatchLoader's batches with their 5th-column labels resolved."""
    for batch in loader:
        labels = [resolve(label, loader.path, int(line))
                  for label, line in zip(batch.labels, batch.line_numbers)]
        yield LabelledBatch(batch.images, np.array(labels, np.int64),
                            [f"{loader.path}:{int(n)}" for n in batch.line_numbers])


def labelled_batches(images, resolve: LabelResolver, batch_size: int, transform: Callable,
                     decode: Callable, rank: int = 0, world: int = 1, **loader_kw) -> Iterator[LabelledBatch]:
    """This process's share of `images` (a labelled TSV: line i goes to rank (i-1) % world, one
    line per image as a rule, so nothing to share; or a folder of class sub-folders: every world-th image) in batches;
    loader_kw: BatchLoader's (num_workers, prefetch)."""
    if os.path.isdir(images):
        items = folder_images(images, resolve)[rank::world]
        return folder_batches(items, batch_size, transform, decode)
    loader = BatchLoader(images, batch_size, image_transform=transform,
                         text_encoder=lambda texts: [[0]] * len(texts),  # texts are not used
                         decode_image=decode, rank=rank, world_size=world, **loader_kw)
    return tsv_batches(loader, resolve)


# ------------------------------------------------------------------------------- the classifier
def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_embeddings(embed_texts: Callable[[list[str]], np.ndarray], class_names: Sequence[str],
                     templates: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """float32 [C, D]: per class, the mean of its L2-normalised prompt embeddings, renormalised.
    `embed_texts(list of str) -> [B, D]` embeds the prompts, `batch_size` at a time."""
    prompts = [t.format(name) for name in class_names for t in templates]
    parts = [np.asarray(embed_texts(prompts[i:i + batch_size]))
             for i in range(0, len(prompts), batch_size)]
    emb = normalize(np.concatenate(parts)).reshape(len(class_names), len(templates), -1)
    return normalize(emb.mean(axis=1)).astype(np.float32)


def scores(image_embeddings: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
    """Cosine similarity [N, C] of (normalised) image embeddings with the class embeddings."""
    return normalize(image_embeddings).astype(np.float32) @ class_emb.T


def top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """[N, k] class indices, best first (ties: the lower index first)."""
    k = min(k, logits.shape[1])
    return np.argsort(-logits, axis=1, kind="stable")[:, :k]


def summarize(predictions: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
              max_confusions: int = 50) -> dict:
    """top-1/top-5 accuracy, chance, per-class top-1 and the most frequent confusions.
    `predictions`: [N, k] top-k class indices (k >= 1), `labels`: [N]."""
    n, c = len(labels), len(class_names)
    top1 = predictions[:, 0] == labels
    top5 = (predictions[:, :5] == labels[:, None]).any(axis=1)
    per_class = []
    for i in np.unique(labels):
        mask = labels == i
        per_class.append({"class_index": int(i), "name": class_names[i], "images": int(mask.sum()),
                          "top1": float(top1[mask].mean())})
    pairs = {}
    for t, p in zip(labels[~top1], predictions[~top1, 0]):
        pairs[(int(t), int(p))] = pairs.get((int(t), int(p)), 0) + 1
    confusions = [{"true": class_names[t], "true_index": t, "predicted": class_names[p],
                   "predicted_index": p, "count": k}
                  for (t, p), k in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))]
    return {"images": int(n), "classes": int(c),
            "top1": float(top1.mean()) if n else 0.0, "top5": float(top5.mean()) if n else 0.0,
            "chance_top1": 1.0 / c, "chance_top5": min(5, c) / c,
            "per_class": per_class, "confusions": confusions[:max_confusions]}


class ZeroShotResult(NamedTuple):
    predictions: np.ndarray  # int64 [N, min(5, C)]
    labels: np.ndarray  # int64 [N]
    ids: list


def classify(encode_image: Callable[[np.ndarray], np.ndarray], class_emb: np.ndarray,
             batches: Iterator[LabelledBatch], k: int = 5) -> ZeroShotResult:
    """Top-k predictions of every batch's images against precomputed class embeddings."""
    preds, labels, ids = [], [], []
    for batch in batches:
        preds.append(top_k(scores(encode_image(batch.images), class_emb), k))
        labels.append(batch.labels)
        ids.extend(batch.ids)
    width = min(k, class_emb.shape[0])
    return ZeroShotResult(np.concatenate(preds) if preds else np.zeros((0, width), np.int64),
                          np.concatenate(labels) if labels else np.zeros(0, np.int64), ids)

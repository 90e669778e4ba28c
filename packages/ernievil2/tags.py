"""Object tags from an ImageNet classifier: the paper's "image-tags" view without a detector.

The ImageNet EfficientNet-Lite0 (../shared/data/efficientnet_lite0) classifies an image; the
names of its top-k classes (English or Chinese, from imagenet_classes.tsv) are the image's tags.
Tags come only from the pixels, never from a caption.

Preprocessing is the reference network's own test-time pipeline, without Pillow: Pillow's
bicubic resize of the short side to 256 (reproduced exactly in numpy: same filter, same
antialiasing support, same 22-bit fixed-point rounding and uint8 intermediate between the
horizontal and vertical passes), centre crop 224 at round((size - 224) / 2), (x/255 - 0.5)/0.5.
Decoding is cv2's (as everywhere in the project), which may differ from Pillow's libjpeg by a
level here and there.

Tag text: each class has one clean name: a parenthetical is dropped ("kite (bird of prey)" ->
"kite", "沙球（一种打击乐器）" -> "沙球") and of "a / b" alternatives the first is kept
("cardboard box / carton" -> "cardboard box"). A multi-word name keeps its words. Tags are
joined by single spaces (the format the trainer and build_tsv --tags-from read); the top-k are
k DISTINCT names (two classes can share one, e.g. 导弹 for missile and projectile).
"""
from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np

from .transforms import decode_image

CLASSIFIER_RESIZE = 256  # reference test-time pipeline: short side 256, centre crop 224
CLASSIFIER_CROP = 224
CLASSES_HEADER = ("class_index", "wnid", "label_en", "label_zh")
LANG_COLUMN = {"en": "label_en", "zh": "label_zh"}

# ---------------------------------------------------------------------------------- class names
_PARENTHETICAL = re.compile(r"\s*[(（][^()（）]*[)）]")


def clean_class_name(name: str) -> str:
    """One tag per class: no parenthetical, the first of 'a / b' alternatives, single spaces."""
    cleaned = _PARENTHETICAL.sub("", name)
    cleaned = cleaned.split(" / ")[0]
    cleaned = " ".join(cleaned.split())
    return cleaned or " ".join(name.split())


def load_class_names(path, lang: str = "zh", clean: bool = True) -> list[str]:
    """Class names in class-index order from imagenet_classes.tsv
    (header `class_index wnid label_en label_zh`, indices 0..N-1 in order)."""
    if lang not in LANG_COLUMN:
        raise ValueError(f"lang must be one of {sorted(LANG_COLUMN)}, got {lang!r}")
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not lines:
        raise ValueError(f"{path}: empty class-name file")
    header = tuple(lines[0].split("\t"))
    if not set(CLASSES_HEADER) <= set(header):
        raise ValueError(f"{path}:1: expected a header with columns {list(CLASSES_HEADER)}, "
                         f"got {list(header)}")
    col_index, col_name = header.index("class_index"), header.index(LANG_COLUMN[lang])
    names = []
    for line_no, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise ValueError(f"{path}:{line_no}: {len(fields)} columns, expected {len(header)}")
        if fields[col_index].strip() != str(len(names)):
            raise ValueError(f"{path}:{line_no}: class_index {fields[col_index]!r}, expected "
                             f"{len(names)} (classes must be listed in index order)")
        name = fields[col_name].strip()
        if not name:
            raise ValueError(f"{path}:{line_no}: empty {LANG_COLUMN[lang]}")
        names.append(clean_class_name(name) if clean else name)
    if not names:
        raise ValueError(f"{path}: no classes")
    return names


def top_k_names(logits: np.ndarray, names: Sequence[str], k: int) -> list[list[str]]:
    """For each row of logits [N, C], the names of the k best classes, distinct, best first."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] != len(names):
        raise ValueError(f"logits {logits.shape} do not match {len(names)} class names")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    order = np.argsort(-logits, axis=1, kind="stable")
    out = []
    for row in order:
        picked = []
        for c in row:
            name = names[c]
            if name not in picked:
                picked.append(name)
                if len(picked) == k:
                    break
        out.append(picked)
    return out


def format_tags(names: Sequence[str]) -> str:
    """The 4th TSV column: tag names joined by single spaces (no tabs or newlines)."""
    return " ".join(" ".join(n.split()) for n in names)


# ------------------------------------------------------------------- Pillow's bicubic, in numpy
_PRECISION_BITS = 32 - 8 - 2  # Pillow Resample.c: 8-bit images use 22-bit fixed-point weights
_BICUBIC_A = -0.5
_BICUBIC_SUPPORT = 2.0


def _bicubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    a = _BICUBIC_A
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _pillow_weights(in_size: int, out_size: int, start: int = 0,
                    stop: int | None = None) -> tuple[np.ndarray, int]:
    """Fixed-point weights of outputs start..stop (default: all) exactly as Pillow's
    precompute_coeffs + normalize_coeffs_8bpc (antialiased: the filter is stretched by the scale
    when shrinking), as ([stop - start, hi - lo], lo) over the inputs lo..hi they read."""
    stop = out_size if stop is None else stop
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _BICUBIC_SUPPORT * filterscale
    one = float(1 << _PRECISION_BITS)
    rows = []
    for xx in range(start, stop):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # C casts truncate toward zero, like int()
        xmax = min(int(center + support + 0.5), in_size)
        w = _bicubic((np.arange(xmin, xmax) - center + 0.5) / filterscale)
        total = w.sum()
        if total != 0.0:
            w = w / total
        rows.append((xmin, np.trunc(np.where(w < 0, w * one - 0.5, w * one + 0.5))))
    lo = min(xmin for xmin, _ in rows)
    weights = np.zeros((len(rows), max(xmin + len(w) for xmin, w in rows) - lo), np.float64)
    for r, (xmin, w) in enumerate(rows):
        weights[r, xmin - lo:xmin - lo + len(w)] = w
    return weights, lo


def _pillow_pass(img: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    # Integers times 22-bit weights stay far below 2**53, so float64 BLAS sums are exact and
    # equal Pillow's int32 accumulation; floor + clip is its clip8.
    x = np.moveaxis(img.astype(np.float64), axis, 0)
    out = np.tensordot(weights, x, axes=([1], [0])) + float(1 << (_PRECISION_BITS - 1))
    out = np.clip(np.floor(out / float(1 << _PRECISION_BITS)), 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def pillow_bicubic_resized_crop(img: np.ndarray, size: tuple[int, int],
                                box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """The crop box=(left, top, right, bottom) (default: everything) of Pillow's
    Image.resize(size, BICUBIC) of uint8 HxWxC, size=(width, height): horizontal pass first,
    uint8 in between, an unchanged axis is not resampled.

    Each output pixel depends only on its own filter window, so only the box's outputs, from the
    input rows and columns under it, are computed: the cost follows the box, not the resized
    image (a 1x100000 image resized to 256 px high would be 25.6 M pixels wide).

    Pillow 13 runs the vertical pass first when the height shrinks much more than the width;
    an aspect-preserving resize (all this module does) never does that, so it is not copied."""
    if img.dtype != np.uint8 or img.ndim != 3:
        raise ValueError(f"expected uint8 HxWxC, got {img.dtype} {img.shape}")
    out_w, out_h = int(size[0]), int(size[1])
    if out_w < 1 or out_h < 1:
        raise ValueError(f"target size must be positive, got {size}")
    left, top, right, bottom = (0, 0, out_w, out_h) if box is None else box
    if not (0 <= left < right <= out_w and 0 <= top < bottom <= out_h):
        raise ValueError(f"crop box {box} is not inside the {out_w}x{out_h} resized image")
    h, w = img.shape[:2]
    if out_h != h:
        v_weights, y0 = _pillow_weights(h, out_h, top, bottom)
        img = img[y0:y0 + v_weights.shape[1]]  # the rows the vertical pass reads
    else:
        img = img[top:bottom]
    if out_w != w:
        h_weights, x0 = _pillow_weights(w, out_w, left, right)
        img = _pillow_pass(img[:, x0:x0 + h_weights.shape[1]], h_weights, axis=1)
    else:
        img = img[:, left:right]
    if out_h != h:
        img = _pillow_pass(img, v_weights, axis=0)
    return np.ascontiguousarray(img)


def pillow_bicubic_resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 HxWxC to size=(width, height) as Pillow's Image.resize(size, BICUBIC)."""
    return pillow_bicubic_resized_crop(img, size)


def classifier_transform(img: np.ndarray, resize: int = CLASSIFIER_RESIZE,
                         crop: int = CLASSIFIER_CROP) -> np.ndarray:
    """RGB uint8 HxWx3 -> float32 [3, crop, crop] as the reference Lite0 was evaluated: short
    side to `resize` (long side rounded, Pillow bicubic), centre crop, (x/255 - 0.5)/0.5. Only
    the crop is resampled (pillow_bicubic_resized_crop), whatever the aspect ratio."""
    h, w = img.shape[:2]
    scale = resize / min(w, h)
    size = (resize, round(h * scale)) if w <= h else (round(w * scale), resize)
    left, top = int(round((size[0] - crop) / 2.0)), int(round((size[1] - crop) / 2.0))
    img = pillow_bicubic_resized_crop(img, size, (left, top, left + crop, top + crop))
    arr = img.astype(np.float32) / 255.0
    return np.ascontiguousarray(((arr - 0.5) / 0.5).transpose(2, 0, 1))


# ------------------------------------------------------------------------------------ the tagger
class ObjectTagger:
    """An ImageNet classifier (a Paddle layer: [N, 3, H, W] -> [N, C] logits) + C class names."""

    def __init__(self, model, class_names: Sequence[str], topk: int = 3, batch_size: int = 32):
        n_classes = getattr(model, "num_classes", None)
        if n_classes is not None and n_classes != len(class_names):
            raise ValueError(f"the classifier has {n_classes} classes but {len(class_names)} "
                             "class names were given")
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.model, self.names = model, list(class_names)
        self.topk, self.batch_size = int(topk), int(batch_size)
        self.model.eval()

    @classmethod
    def lite0(cls, npz_path, classes_path, lang: str = "zh", topk: int = 3, batch_size: int = 32):
        """The ImageNet EfficientNet-Lite0 from a lukemelas-style npz."""
        from .models.efficientnet import build_efficientnet
        from .models.lite0_port import load_lite0_npz

        model = build_efficientnet("lite0", with_classifier=True)
        load_lite0_npz(model, npz_path)
        return cls(model, load_class_names(classes_path, lang), topk, batch_size)

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """Preprocessed float32 [N, 3, H, W] -> logits [N, C] (in batches of batch_size)."""
        import paddle

        out = []
        with paddle.no_grad():
            for i in range(0, len(pixels), self.batch_size):
                chunk = paddle.to_tensor(np.ascontiguousarray(pixels[i:i + self.batch_size]))
                out.append(self.model(chunk).numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.names)), np.float32)

    def tag_pixels(self, pixels: np.ndarray) -> list[list[str]]:
        return top_k_names(self.logits(pixels), self.names, self.topk)

    def tag_images(self, images: Sequence[np.ndarray]) -> list[list[str]]:
        """RGB uint8 images -> their top-k class names."""
        if not len(images):
            return []
        return self.tag_pixels(np.stack([classifier_transform(im) for im in images]))

    def tag_image_bytes(self, blobs: Sequence[bytes]) -> list[list[str]]:
        return self.tag_images([decode_image(b) for b in blobs])

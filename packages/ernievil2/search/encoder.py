"""The towers a search index is built and queried with: the config's `execution` (the exported
towers in Paddle Inference predictors for `inference`, the fastest on CPU), as run_infer.sh."""
from __future__ import annotations

import threading

import cv2
import numpy as np

from ..embed import build_towers
from ..transforms import decode_image, set_max_image_pixels

THUMBNAIL_SIZE = 128  # the long side of a thumbnail, in pixels
MAX_THUMBNAIL_SIZE = 1024
THUMBNAIL_QUALITY = 85


def thumbnail_jpeg(rgb: np.ndarray, size: int = THUMBNAIL_SIZE) -> bytes:
    """A JPEG of the image shrunk to `size` pixels on its long side (never enlarged)."""
    h, w = rgb.shape[:2]
    scale = min(1.0, size / max(h, w))
    if scale < 1.0:
        rgb = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))),
                         interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, THUMBNAIL_QUALITY])
    if not ok:
        raise ValueError("could not encode the thumbnail")
    return buf.tobytes()


class Encoder:
    """Texts and images -> float32 [n, D] L2-normalised embeddings, `batch_size` at a time.
    One call at a time (a lock): predictors are not thread-safe, and a page serves threads."""

    def __init__(self, towers, transform, encode_ids, batch_size: int):
        self.towers, self.transform, self.encode_ids = towers, transform, encode_ids
        self.batch_size = batch_size
        self.embed_dim = towers.embed_dim
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg) -> "Encoder":
        from ..device import select_device
        set_max_image_pixels(cfg.max_image_pixels)  # decode_image's bomb limit
        place, amp = select_device(cfg.device, cfg.amp)
        towers, transform, encode_ids = build_towers(cfg, place, amp)
        return cls(towers, transform, encode_ids, cfg.infer_batch_size)

    def texts(self, texts: list[str]) -> np.ndarray:
        parts = []
        with self._lock:
            for start in range(0, len(texts), self.batch_size):
                ids = np.asarray(self.encode_ids(texts[start:start + self.batch_size]))
                parts.append(self.towers.encode_text(ids))
        return np.concatenate(parts) if parts else np.zeros((0, self.embed_dim), np.float32)

    def pixels(self, images: np.ndarray) -> np.ndarray:
        """Preprocessed float32 [n, 3, S, S] -> [n, D]."""
        parts = []
        with self._lock:
            for start in range(0, len(images), self.batch_size):
                parts.append(self.towers.encode_image(images[start:start + self.batch_size]))
        return np.concatenate(parts) if parts else np.zeros((0, self.embed_dim), np.float32)

    def prepare(self, image_bytes: bytes, thumbnail_size: int | None = None):
        """(preprocessed pixels [3, S, S], thumbnail JPEG or None); ValueError for bytes that are
        no image or an image over the pixel limit."""
        rgb = decode_image(image_bytes)
        thumb = thumbnail_jpeg(rgb, thumbnail_size) if thumbnail_size else None
        return np.asarray(self.transform(rgb), np.float32), thumb

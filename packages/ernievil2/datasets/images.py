"""Image bytes for the writer: from a file, bytes or a base64 reference; checked, optionally shrunk."""
from __future__ import annotations

import base64
from collections import OrderedDict

import cv2
import numpy as np

from ..data.tsv import decode_b64
from .common import Base64Ref, PairRecord

_URLSAFE_TO_STD = bytes.maketrans(b"-_", b"+/")


_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"),
               (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def sniff_image_format(data: bytes) -> str | None:
    """The image format from the first bytes, or None when it is not a known image."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    return None


def shrink_image(data: bytes, max_side: int) -> bytes | None:
    """JPEG (quality 95) of the image shrunk with INTER_AREA so its long side is ``max_side``,
    or None when it already fits. Raises ValueError when cv2 cannot decode it."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("cv2 cannot decode it")
    h, w = img.shape[:2]
    if max(h, w) <= max_side:
        return None
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise ValueError("cv2 cannot re-encode it as JPEG")
    return buf.tobytes()


class Unusable(Exception):
    """An image is missing (``missing``) or unreadable (reason in args[0])."""

    def __init__(self, reason: str, missing: bool = False):
        super().__init__(reason)
        self.missing = missing


class ImageLoader:
    """Turns a record's image into the base64 text to write, with a small LRU cache (captions of
    one image are usually adjacent) and open handles on base64 TSVs."""

    def __init__(self, max_side: int | None, verify: bool, cache_size: int = 32):
        self.max_side = max_side
        self.verify = verify
        self.cache: OrderedDict[object, str | Unusable] = OrderedDict()
        self.cache_size = cache_size
        self.handles: dict[str, object] = {}
        self.resized = 0

    def close(self) -> None:
        for h in self.handles.values():
            h.close()
        self.handles.clear()

    def b64(self, image) -> str:
        key = image if not isinstance(image, bytes) else ("bytes", id(image))
        hit = self.cache.get(key)
        if hit is None:
            try:
                hit = self._load(image)
            except Unusable as e:
                hit = e
            self.cache[key] = hit
            if len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(key)
        if isinstance(hit, Unusable):
            raise hit
        return hit

    def _read_ref(self, ref: Base64Ref) -> str:
        f = self.handles.get(ref.path)
        if f is None:
            f = self.handles[ref.path] = open(ref.path, "rb")
        f.seek(ref.offset)
        return f.read(ref.length).strip().translate(_URLSAFE_TO_STD).decode("ascii", "replace")

    def _load(self, image) -> str:
        if image is None:
            raise Unusable("not found", missing=True)
        b64 = None
        if isinstance(image, Base64Ref):
            b64 = self._read_ref(image)
            try:
                data = decode_b64(b64)
            except ValueError as e:
                raise Unusable(str(e)) from None
        elif isinstance(image, bytes):
            data = image
        else:
            try:
                with open(image, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                raise Unusable("not found", missing=True) from None
            except OSError as e:
                raise Unusable(e.strerror or str(e)) from None
        if not data:
            raise Unusable("empty file")
        if sniff_image_format(data) is None:
            raise Unusable(f"not a JPEG/PNG/GIF/BMP/TIFF/WEBP image (starts with {data[:8]!r})")
        if self.max_side:
            try:
                small = shrink_image(data, self.max_side)
            except ValueError as e:
                raise Unusable(str(e)) from None
            if small is not None:
                self.resized += 1
                return base64.b64encode(small).decode("ascii")
        elif self.verify and cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is None:
            raise Unusable("cv2 cannot decode it")
        return b64 if b64 is not None else base64.b64encode(data).decode("ascii")


def image_name(record: PairRecord) -> str:
    return record.image if isinstance(record.image, str) else record.image_id

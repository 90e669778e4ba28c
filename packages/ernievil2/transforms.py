"""Image decoding and preprocessing, identical to the official release at test time.

Official test-time pipeline (ERNIE-ViL2 `utils/preprocess_image.py`): cv2.imdecode(IMREAD_COLOR)
-> BGR to RGB -> resize the short side to 224 (INTER_LINEAR; long side `int(224/short*long) + 1`,
so even a square image gets one extra column; an image whose short side is already 224 is left
alone) -> centre crop at `ceil((w-224)/2)`, `ceil((h-224)/2)` -> /255 -> minus mean, divided by
std -> CHW float32. Other towers reuse it with their own size/mean/std.

Train time (official recipe, our implementation): same resize, random crop, horizontal flip p=0.5,
ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2, Gaussian blur 5x5 sigma U(0.1, 2) p=0.5.

Hostile images. Decoding refuses images over a pixel limit (default 89,478,485 like Pillow's;
set_max_image_pixels or decode_image(max_pixels=...)), checked on the file header before anything
is allocated (for the common formats, see image_header_size). OpenCV's own OPENCV_IO_MAX_IMAGE_PIXELS cannot serve as that limit: OpenCV reads it
once, when cv2 is imported. A legal but very long image (a 372-byte 1x100000 PNG) would still
resize to 224 x 22,400,001 pixels (15 GB): when the resized image would exceed MAX_RESIZED_PIXELS,
only the strip of the source under the crop is resized, at the same scale (then the output may
differ from the official by one grey level: OpenCV rounds source positions in float32). Every
image up to an aspect ratio of about 1:670 at 224 px (1:8000 at 64 px) takes the official path,
bit for bit.
"""
from __future__ import annotations

import math
import struct
from typing import Sequence

import cv2
import numpy as np

# The one place for the preprocessing constants.
OFFICIAL_IMAGE_SIZE = 224
OFFICIAL_MEAN = (0.485, 0.456, 0.406)  # ImageNet RGB statistics, used by the official ViT tower
OFFICIAL_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)  # EfficientNet-Lite: (x/255 - 0.5) / 0.5
HALF_STD = (0.5, 0.5, 0.5)

DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's limit (about 0.25 GB of 8-bit RGB)
MAX_RESIZED_PIXELS = 1 << 25  # the resized image before its crop: 33.5 M pixels, 100 MB uint8 RGB
ALIGN_SEARCH_ROWS = 4096  # how far back (rows) a source strip may start to align with the resize

_max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS
_PROCESS_LIMIT = object()  # decode_image's default: the limit set_max_image_pixels set


class ImageDecodeError(ValueError):
    """Bytes that cv2 cannot decode as an image, or an image over the pixel limit."""


def set_max_image_pixels(limit: int | None) -> None:
    """The pixel limit decode_image applies when not given one, for the whole process (its
    threads included); None = no limit of ours."""
    global _max_image_pixels
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"max image pixels must be a positive int or None, got {limit!r}")
    _max_image_pixels = limit


def get_max_image_pixels() -> int | None:
    return _max_image_pixels


def decode_image(buf: bytes, max_pixels=_PROCESS_LIMIT) -> np.ndarray:
    """Image file bytes -> RGB uint8 HxWx3, exactly as the official loader.

    cv2's IMREAD_COLOR turns grayscale, RGBA (alpha dropped), 16-bit and CMYK files into 8-bit BGR.
    Images of more than `max_pixels` pixels (default: the process-wide limit, see
    set_max_image_pixels; None: no limit) raise ImageDecodeError; the size is read from the header
    (image_header_size) before decoding; other formats (JPEG 2000, AVIF, HDR, PAM...) are checked
    once decoded, with OpenCV's own limit (2^30 pixels unless set before cv2 was imported) as the
    only bound on the decode itself.
    """
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_image needs image file bytes, got {type(buf).__name__}")
    limit = _max_image_pixels if max_pixels is _PROCESS_LIMIT else max_pixels
    arr = np.frombuffer(buf, np.uint8)
    if limit is not None:
        _check_pixels(image_header_size(arr), limit)
    try:
        img = cv2.imdecode(arr, cv2.IMREAD_COLOR) if arr.size else None  # cv2 asserts on empty input
    except cv2.error as e:  # OpenCV's own size limits, among others
        raise ImageDecodeError(f"OpenCV refused the image ({arr.size} bytes): "
                               f"{str(e).strip().splitlines()[-1]}") from None
    if img is None:
        raise ImageDecodeError(f"not a decodable image ({arr.size} bytes, starts with "
                               f"{bytes(arr[:16])!r})")
    if limit is not None:
        _check_pixels((img.shape[1], img.shape[0]), limit)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB, dst=img)  # in place: no second full-size copy


def _check_pixels(size: tuple[int, int] | None, limit: int) -> None:
    if size is not None and size[0] * size[1] > limit:
        w, h = size
        raise ImageDecodeError(f"image of {w}x{h} = {w * h:,} pixels is over the limit of "
                               f"{limit:,} pixels (max_image_pixels)")


# ------------------------------------------------------------------------------ image headers
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def image_header_size(buf) -> tuple[int, int] | None:
    """(width, height) from an image file's header, or None when the format is not one of PNG,
    JPEG, GIF, BMP, WebP, TIFF, PNM/PFM, Sun raster, or the header is unreadable."""
    b = bytes(memoryview(buf)[:64])  # enough for every format but JPEG and TIFF
    try:
        if b.startswith(b"\x89PNG\r\n\x1a\n") and b[12:16] == b"IHDR":
            return struct.unpack(">II", b[16:24])
        if b.startswith(b"\xff\xd8"):
            return _jpeg_size(memoryview(buf))
        if b[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", b[6:10])
        if b.startswith(b"BM"):
            if struct.unpack("<I", b[14:18])[0] == 12:  # OS/2 core header: 16-bit sizes
                return struct.unpack("<HH", b[18:22])
            w, h = struct.unpack("<ii", b[18:26])
            return abs(w), abs(h)  # a negative height means top-down rows
        if b.startswith(b"RIFF") and b[8:12] == b"WEBP":
            return _webp_size(b)
        if b[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_size(memoryview(buf))
        if b[:1] == b"P" and b[1:2] in b"123456fF" and b[2:3].isspace():  # PNM, PFM
            return _pnm_size(bytes(memoryview(buf)[:1024]))
        if b.startswith(b"\x59\xa6\x6a\x95"):  # Sun raster
            return struct.unpack(">II", b[4:12])
    except (struct.error, ValueError, IndexError):
        return None
    return None


def _jpeg_size(m: memoryview) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(m):
        if m[i] != 0xFF:
            return None
        marker = m[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_SOF:
            h, w = struct.unpack(">HH", m[i + 5:i + 9])
            return (w, h) if h else None  # height 0: defined later by a DNL marker
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length field
            i += 2
            continue
        i += 2 + struct.unpack(">H", m[i + 2:i + 4])[0]
    return None


def _webp_size(b: bytes) -> tuple[int, int] | None:
    chunk = b[12:16]
    if chunk == b"VP8X":
        return (int.from_bytes(b[24:27], "little") + 1, int.from_bytes(b[27:30], "little") + 1)
    if chunk == b"VP8L" and b[20] == 0x2F:
        bits = int.from_bytes(b[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and b[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", b[26:30])
        return w & 0x3FFF, h & 0x3FFF
    return None


def _tiff_size(m: memoryview) -> tuple[int, int] | None:
    order = "<" if m[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", m[4:8])
    (count,) = struct.unpack(order + "H", m[ifd:ifd + 2])
    size = {}
    for k in range(count):
        e = ifd + 2 + 12 * k
        tag, typ = struct.unpack(order + "HH", m[e:e + 4])
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG (4)
            fmt = {3: "H", 4: "I"}.get(typ)
            if fmt is None:
                return None
            size[tag] = struct.unpack(order + fmt, m[e + 8:e + 8 + struct.calcsize(fmt)])[0]
    return (size[256], size[257]) if len(size) == 2 else None


def _pnm_size(b: bytes) -> tuple[int, int] | None:
    fields = []
    for line in b[2:].split(b"\n"):
        fields += line.split(b"#", 1)[0].split()
        if len(fields) >= 2:
            return int(fields[0]), int(fields[1])
    return None


def _check_rgb(img) -> None:
    if not (isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3
            and img.shape[2] == 3 and img.shape[0] > 0 and img.shape[1] > 0):
        desc = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"expected an RGB uint8 HxWx3 image, got {desc}")


def official_resized_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """(height, width) of resize_short_side_official's output for an h x w image."""
    if min(h, w) == size:
        return h, w
    if w < h:
        return int(float(size) / w * h) + 1, size
    return size, int(float(size) / h * w) + 1


def resize_short_side_official(img: np.ndarray, size: int) -> np.ndarray:
    """Short side -> size, long side int(size / short * long) + 1 (the official +1, kept for
    parity: a square image becomes size x size+1); left alone when the short side is size."""
    h, w = img.shape[:2]
    oh, ow = official_resized_shape(h, w, size)
    if (oh, ow) == (h, w):
        return img
    return cv2.resize(img, (ow, oh), interpolation=cv2.INTER_LINEAR)


def resized_crop_official(img: np.ndarray, size: int, y: int, x: int,
                          max_resized_pixels: int = MAX_RESIZED_PIXELS) -> np.ndarray:
    """The size x size window at (y, x) of resize_short_side_official(img, size).

    When the resized image would have more than `max_resized_pixels` pixels, only the strip of
    the source under the window (plus a margin for the interpolation) is resized, with the full
    resize's scale factors, so no intermediate grows with the image's aspect ratio.
    """
    h, w = img.shape[:2]
    oh, ow = official_resized_shape(h, w, size)
    if not (0 <= y <= oh - size and 0 <= x <= ow - size):
        raise ValueError(f"cannot crop {size}x{size} at ({y}, {x}) from a {oh}x{ow} image")
    if (oh, ow) == (h, w) or oh * ow <= max_resized_pixels:
        return resize_short_side_official(img, size)[y:y + size, x:x + size]
    if ow > oh:  # long axis horizontal: the same on the transposed view
        return _strip_resize(img.transpose(1, 0, 2), size, x, ow, oh).transpose(1, 0, 2)
    return _strip_resize(img, size, y, oh, ow)


def _strip_resize(img: np.ndarray, size: int, y: int, oh: int, ow: int) -> np.ndarray:
    """Rows y .. y+size of the h x w image resized to oh x ow (ow = size), from a source strip."""
    h, w = img.shape[:2]
    fy = oh / h  # the scale cv2 derives from the full sizes
    margin = math.ceil(1 / fy) + 2  # INTER_LINEAR reads two source rows per output row
    top = max(0, math.floor((y + 0.5) / fy - 0.5) - margin)
    # Source row t is output row t * fy of the full resize: start the strip on a row where that is
    # (nearly) a whole number, so the strip's output rows fall on the full resize's rows.
    back = min(ALIGN_SEARCH_ROWS, int(ALIGN_SEARCH_ROWS / fy))  # in source and in output rows
    candidates = np.arange(max(0, top - back), top + 1)
    shift = np.abs(candidates * fy - np.round(candidates * fy))
    top = int(candidates[len(candidates) - 1 - np.argmin(shift[::-1])])  # the nearest best
    bottom = min(h, math.floor((y + size - 0.5) / fy - 0.5) + 2 + margin)
    strip = cv2.resize(np.ascontiguousarray(img[top:bottom]), None, fx=ow / w, fy=fy,
                       interpolation=cv2.INTER_LINEAR)
    start = min(max(0, round(y - top * fy)), strip.shape[0] - size)
    return strip[start:start + size]


def center_offsets(h: int, w: int, size: int) -> tuple[int, int]:
    """(y, x) of the size x size centre crop: (ceil((h-size)/2), ceil((w-size)/2)), the official
    rounding."""
    if h < size or w < size:
        raise ValueError(f"cannot crop {size}x{size} from a {h}x{w} image")
    return math.ceil((h - size) / 2), math.ceil((w - size) / 2)


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    y, x = center_offsets(*img.shape[:2], size)
    return img[y:y + size, x:x + size]


def _normalize_chw(x01: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """float32 HWC in [0, 1] -> (x - mean) / std as C-contiguous float32 CHW.

    In-place ops with float64 mean/std round exactly as the official code does.
    """
    x01 -= mean
    x01 /= std
    return np.ascontiguousarray(x01.transpose(2, 0, 1))


def _as_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    if mean.shape != (3,) or std.shape != (3,) or np.any(std <= 0):
        raise ValueError(f"mean and std need 3 values each, std > 0; got {mean}, {std}")
    return mean, std


class ImageTransform:
    """Test-time preprocessing: RGB uint8 HxWx3 -> float32 [3, size, size]."""

    def __init__(self, image_size: int = OFFICIAL_IMAGE_SIZE,
                 mean: Sequence[float] = OFFICIAL_MEAN, std: Sequence[float] = OFFICIAL_STD):
        self.image_size = int(image_size)
        self.mean, self.std = _as_stats(mean, std)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        _check_rgb(img)
        size = self.image_size
        y, x = center_offsets(*official_resized_shape(*img.shape[:2], size), size)
        img = resized_crop_official(img, size, y, x)
        return _normalize_chw(img.astype(np.float32) / 255, self.mean, self.std)


def make_eval_transform(image_size: int = OFFICIAL_IMAGE_SIZE, mean: Sequence[float] = OFFICIAL_MEAN,
                        std: Sequence[float] = OFFICIAL_STD) -> ImageTransform:
    return ImageTransform(image_size, mean, std)


# --------------------------------------------------------------------------------- train time
def _gray(x: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)  # ITU-R 601 luma, as torchvision


def _blend(x: np.ndarray, other, factor: float) -> np.ndarray:
    return np.clip(factor * x + (1.0 - factor) * other, 0.0, 1.0)


def _adjust_hue(x: np.ndarray, shift: float) -> np.ndarray:
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)  # float input in [0, 1]: hue in degrees [0, 360)
    hsv[..., 0] = (hsv[..., 0] + shift * 360.0) % 360.0
    return np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), 0.0, 1.0)


class TrainTransform:
    """Train-time augmentation: RGB uint8 HxWx3 (+ np.random.Generator) -> float32 [3, size, size].

    Colour ops run on float32 in [0, 1] with torchvision semantics (brightness scales; contrast
    blends with the mean luma; saturation blends with the luma image; hue rotates HSV hue by
    U(-hue, hue) turns), clipped after each op, the four ops in a random order per image (as
    torchvision and Paddle's ColorJitter). The official code runs Paddle's cv2 ColorJitter on uint8,
    so intermediate rounding differs slightly. Every random draw comes from the given Generator.
    """

    def __init__(self, image_size: int = OFFICIAL_IMAGE_SIZE, mean: Sequence[float] = OFFICIAL_MEAN,
                 std: Sequence[float] = OFFICIAL_STD, seed: int | None = None,
                 jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
                 p_flip: float = 0.5, p_jitter: float = 0.8, p_gray: float = 0.2,
                 p_blur: float = 0.5, blur_sigma: tuple[float, float] = (0.1, 2.0)):
        self.image_size = int(image_size)
        self.mean, self.std = _as_stats(mean, std)
        self.brightness, self.contrast, self.saturation, self.hue = jitter
        self.p_flip, self.p_jitter, self.p_gray, self.p_blur = p_flip, p_jitter, p_gray, p_blur
        self.blur_sigma = blur_sigma
        self.rng = np.random.default_rng(seed)  # used only when no rng is passed to __call__

    def __call__(self, img: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        _check_rgb(img)
        rng = self.rng if rng is None else rng
        size = self.image_size
        h, w = official_resized_shape(*img.shape[:2], size)
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        img = resized_crop_official(img, size, y, x)
        if rng.random() < self.p_flip:
            img = img[:, ::-1]
        x01 = img.astype(np.float32) / 255
        if rng.random() < self.p_jitter:
            x01 = self._color_jitter(x01, rng)
        if rng.random() < self.p_gray:
            x01 = np.repeat(_gray(x01)[..., None], 3, axis=2)
        if rng.random() < self.p_blur:
            x01 = cv2.GaussianBlur(x01, (5, 5), float(rng.uniform(*self.blur_sigma)))
        return _normalize_chw(x01, self.mean, self.std)

    def _color_jitter(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        def factor(s):
            return float(rng.uniform(max(0.0, 1.0 - s), 1.0 + s))

        for op in rng.permutation(4):
            if op == 0 and self.brightness > 0:
                x = _blend(x, 0.0, factor(self.brightness))
            elif op == 1 and self.contrast > 0:
                x = _blend(x, float(_gray(x).mean()), factor(self.contrast))
            elif op == 2 and self.saturation > 0:
                x = _blend(x, _gray(x)[..., None], factor(self.saturation))
            elif op == 3 and self.hue > 0:
                x = _adjust_hue(x, float(rng.uniform(-self.hue, self.hue)))
        return x


def make_train_transform(image_size: int = OFFICIAL_IMAGE_SIZE, mean: Sequence[float] = OFFICIAL_MEAN,
                         std: Sequence[float] = OFFICIAL_STD, seed: int | None = None,
                         **augment) -> TrainTransform:
    """The official train recipe; `augment` overrides TrainTransform's probabilities/strengths."""
    return TrainTransform(image_size, mean, std, seed=seed, **augment)

"""Image decoding and preprocessing, identical to the official release at test time.

Official test-time pipeline (ERNIE-ViL2 `utils/preprocess_image.py`): cv2.imdecode(IMREAD_COLOR)
-> BGR to RGB -> resize the short side to 224 (INTER_LINEAR; long side `int(224/short*long) + 1`,
so even a square image gets one extra column; an image whose short side is already 224 is left
alone) -> centre crop at `ceil((w-224)/2)`, `ceil((h-224)/2)` -> /255 -> minus mean, divided by
std -> CHW float32. Other towers reuse it with their own size/mean/std.

Train time (official recipe, our implementation): same resize, random crop, horizontal flip p=0.5,
ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2, Gaussian blur 5x5 sigma U(0.1, 2) p=0.5.
"""
from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np

# The one place for the preprocessing constants.
OFFICIAL_IMAGE_SIZE = 224
OFFICIAL_MEAN = (0.485, 0.456, 0.406)  # ImageNet RGB statistics, used by the official ViT tower
OFFICIAL_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)  # EfficientNet-Lite: (x/255 - 0.5) / 0.5
HALF_STD = (0.5, 0.5, 0.5)


class ImageDecodeError(ValueError):
    """Bytes that cv2 cannot decode as an image."""


def decode_image(buf: bytes) -> np.ndarray:
    """Image file bytes -> RGB uint8 HxWx3, exactly as the official loader.

    cv2's IMREAD_COLOR turns grayscale, RGBA (alpha dropped), 16-bit and CMYK files into 8-bit BGR.
    """
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_image needs image file bytes, got {type(buf).__name__}")
    arr = np.frombuffer(buf, np.uint8)
    img = cv2.imdecode(arr, cv2.IMREAD_COLOR) if arr.size else None  # cv2 asserts on empty input
    if img is None:
        raise ImageDecodeError(f"not a decodable image ({arr.size} bytes, starts with "
                               f"{bytes(arr[:16])!r})")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _check_rgb(img) -> None:
    if not (isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3
            and img.shape[2] == 3 and img.shape[0] > 0 and img.shape[1] > 0):
        desc = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"expected an RGB uint8 HxWx3 image, got {desc}")


def resize_short_side_official(img: np.ndarray, size: int) -> np.ndarray:
    """Short side -> size, long side int(size / short * long) + 1 (the official +1, kept for
    parity: a square image becomes size x size+1); left alone when the short side is size."""
    h, w = img.shape[:2]
    if min(h, w) == size:
        return img
    if w < h:
        ow, oh = size, int(float(size) / w * h) + 1
    else:
        ow, oh = int(float(size) / h * w) + 1, size
    return cv2.resize(img, (ow, oh), interpolation=cv2.INTER_LINEAR)


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """size x size crop at (ceil((h-size)/2), ceil((w-size)/2)): the official rounding."""
    h, w = img.shape[:2]
    if h < size or w < size:
        raise ValueError(f"cannot crop {size}x{size} from a {h}x{w} image")
    y, x = math.ceil((h - size) / 2), math.ceil((w - size) / 2)
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
        img = center_crop(resize_short_side_official(img, self.image_size), self.image_size)
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
        img = resize_short_side_official(img, size)
        h, w = img.shape[:2]
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        img = img[y:y + size, x:x + size]
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

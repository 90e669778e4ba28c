"""Hostile images: the pixel limit read from the file header, the bounded resize of very long
images, and the peak memory of both, measured in a child process."""
import io
import json
import os
import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pytest

from ernievil2 import transforms
from ernievil2.transforms import (DEFAULT_MAX_IMAGE_PIXELS, ImageDecodeError, decode_image,
                                  get_max_image_pixels, image_header_size, make_eval_transform,
                                  make_train_transform, official_resized_shape,
                                  resize_short_side_official, resized_crop_official,
                                  set_max_image_pixels)

PACKAGES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "packages")
MB = 1 << 20


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width, height):
    """Signature and IHDR of an 8-bit RGB PNG."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)


def zero_png(width, height):
    """A valid all-black RGB PNG of any size, compressed row by row (a decompression bomb)."""
    comp = zlib.compressobj(1)
    row = bytes(1 + 3 * width)  # filter byte 0 + black pixels
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return png_header(width, height) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def encode(img, ext=".png", params=()):
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok
    return buf.tobytes()


# ------------------------------------------------------------------------------- pixel limit
def sample_files():
    img = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    files = {ext: encode(img, ext) for ext in (".png", ".jpg", ".bmp", ".webp", ".tiff", ".ppm",
                                                ".gif", ".sr")}
    files["progressive.jpg"] = encode(img, ".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    files["lossless.webp"] = encode(img, ".webp", [cv2.IMWRITE_WEBP_QUALITY, 101])
    files[".pgm"] = encode(img[..., 0], ".pgm")
    files[".pfm"] = encode(img.astype(np.float32) / 255, ".pfm")
    from PIL import Image

    for fmt, arr in [("WEBP", np.dstack([img, img[..., :1]])),  # RGBA: the VP8X layout
                     ("TIFF", img), ("GIF", img)]:
        f = io.BytesIO()
        Image.fromarray(arr).save(f, fmt)
        files[f"pillow.{fmt}"] = f.getvalue()
    return files


@pytest.mark.parametrize("name, data", list(sample_files().items()))
def test_header_size_and_limit_for_each_format(name, data):
    assert image_header_size(data) == (53, 37), name
    assert decode_image(data, max_pixels=53 * 37).shape == (37, 53, 3)
    with pytest.raises(ImageDecodeError, match=r"image of 53x37 = 1,961 pixels is over the limit "
                                               r"of 1,960 pixels \(max_image_pixels\)"):
        decode_image(data, max_pixels=53 * 37 - 1)


def test_formats_without_a_header_reader_are_checked_after_decoding():
    img = np.zeros((37, 53, 3), np.uint8)
    data = encode(img.astype(np.float32), ".hdr")  # Radiance HDR: no header reader
    assert image_header_size(data) is None
    assert decode_image(data, max_pixels=1961).shape == (37, 53, 3)
    with pytest.raises(ImageDecodeError, match="over the limit of 1,960 pixels"):
        decode_image(data, max_pixels=1960)


def test_header_of_a_bomb_is_rejected_before_decoding(monkeypatch):
    data = png_header(30000, 30000) + b"\x00\x04\x00\x00IDATx\x01"  # decoding: 2.7 GB
    assert image_header_size(data) == (30000, 30000)

    def no_decode(*args):
        raise AssertionError("decoded despite the header")

    monkeypatch.setattr(transforms.cv2, "imdecode", no_decode)
    with pytest.raises(ImageDecodeError, match=r"30000x30000 = 900,000,000 pixels is over the "
                                               r"limit of 89,478,485 pixels"):
        decode_image(data)


def test_process_wide_limit():
    data = encode(np.zeros((10, 20, 3), np.uint8))
    assert get_max_image_pixels() == DEFAULT_MAX_IMAGE_PIXELS == 89_478_485
    try:
        set_max_image_pixels(199)
        with pytest.raises(ImageDecodeError, match="200 pixels is over the limit of 199"):
            decode_image(data)
        assert decode_image(data, max_pixels=200).shape == (10, 20, 3)  # an explicit limit wins
        set_max_image_pixels(None)
        assert decode_image(data).shape == (10, 20, 3)
    finally:
        set_max_image_pixels(DEFAULT_MAX_IMAGE_PIXELS)
    for bad in (0, -5, 1.5, True, "100"):
        with pytest.raises(ValueError, match="positive int or None"):
            set_max_image_pixels(bad)


def test_opencv_refusal_is_an_image_decode_error():
    # wider than OpenCV's own OPENCV_IO_MAX_IMAGE_WIDTH (2^20), but only 1.1 M pixels
    data = encode(np.zeros((1, 1_100_000, 3), np.uint8), ".tiff")
    with pytest.raises(ImageDecodeError, match=r"^OpenCV refused the image \(\d+ bytes\): [^\n]*"
                                               r"CV_IO_MAX_IMAGE_WIDTH[^\n]*$"):
        decode_image(data)


def test_truncated_or_odd_headers_do_not_crash_the_reader():
    for data in [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"\xff\xd8\xff\xe0\x00\x10JFIF",
                 b"GIF89a", b"BM", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"II*\x00\xff\xff\xff\x00",
                 b"P6\n", b"P6 # only a comment\n", b"", b"hello"]:
        assert image_header_size(data) is None, data


# ---------------------------------------------------------------------------- bounded resize
LONG_SHAPES = [(1, 500), (3, 1000), (7, 3001), (250, 3000), (1000, 40), (5000, 230), (13, 4099)]


@pytest.mark.parametrize("h, w", LONG_SHAPES)
@pytest.mark.parametrize("size", [224, 64])
def test_strip_resize_matches_the_full_resize(h, w, size):
    rng = np.random.default_rng(h * w + size)
    img = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 2)
    full = resize_short_side_official(img, size)
    oh, ow = full.shape[:2]
    assert (oh, ow) == official_resized_shape(h, w, size)
    for y, x in [(0, 0), (oh - size, ow - size), ((oh - size + 1) // 2, (ow - size + 1) // 2),
                 (int(rng.integers(0, oh - size + 1)), int(rng.integers(0, ow - size + 1)))]:
        want = full[y:y + size, x:x + size]
        # within the budget: the official path itself
        np.testing.assert_array_equal(resized_crop_official(img, size, y, x), want)
        # forced onto the strip path: the same pixels up to the last bit of OpenCV's rounding
        got = resized_crop_official(img, size, y, x, max_resized_pixels=1)
        assert got.shape == (size, size, 3)
        assert np.abs(got.astype(np.int16) - want).max() <= 1


def test_eval_transform_of_a_long_image_without_the_full_resize(monkeypatch):
    # 1 x 100000, red in the middle: resized to 224 x 22.4 M pixels by the official code
    img = np.zeros((1, 100_000, 3), np.uint8)
    img[:, 45_000:55_000, 0] = 255
    real_resize = cv2.resize

    def small_resize(src, dsize, *args, **kw):
        out = real_resize(src, dsize, *args, **kw)
        assert out.size <= transforms.MAX_RESIZED_PIXELS * 3
        return out

    monkeypatch.setattr(transforms.cv2, "resize", small_resize)
    out = make_eval_transform()(img)
    red = (np.array([1.0, 0.0, 0.0]) - transforms.OFFICIAL_MEAN) / transforms.OFFICIAL_STD
    np.testing.assert_allclose(out, np.broadcast_to(red[:, None, None], out.shape), atol=1e-6)
    train = make_train_transform(64, seed=3)
    assert train(img.transpose(1, 0, 2)).shape == (3, 64, 64)


def test_crop_position_is_checked():
    img = np.zeros((10, 20, 3), np.uint8)
    with pytest.raises(ValueError, match="cannot crop 8x8 at"):
        resized_crop_official(img, 8, 0, 10)  # resized: 8 x 17


# ------------------------------------------------------------------------ peak memory (child)
CHILD = r"""
import json, resource, sys
import numpy as np
from ernievil2.transforms import ImageDecodeError, decode_image, make_eval_transform
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # a regression fails, not the machine
data = open(sys.argv[1], "rb").read()
limit = None if sys.argv[3] == "none" else "default"
try:
    img = decode_image(data) if limit else decode_image(data, max_pixels=None)
    out = make_eval_transform(int(sys.argv[2]))(img)
    result = {"shape": list(out.shape), "finite": bool(np.isfinite(out).all())}
except ImageDecodeError as e:
    result = {"error": str(e)}
# VmHWM, not ru_maxrss: ru_maxrss keeps the parent's size from before exec
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
result["peak_mb"] = int(hwm.split()[1]) / 1024
print(json.dumps(result))
"""


@pytest.fixture
def run_child(tmp_path):
    if not os.path.exists("/proc/self/status"):
        pytest.skip("peak memory is read from /proc/self/status (Linux)")
    return lambda data, size=224, limit="default": child_result(tmp_path, data, size, limit)


def child_result(tmp_path, data, size, limit):
    path = tmp_path / "image.bin"
    path.write_bytes(data)
    env = {**os.environ, "PYTHONPATH": PACKAGES + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(size), limit], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("size", [224, 64])
def test_tiny_long_png_stays_small_in_memory(run_child, size):
    data = encode(np.zeros((1, 100_000, 3), np.uint8))
    assert len(data) < 1000  # a few hundred bytes; the official resize needs 15 GB at 224
    result = run_child(data, size)
    assert result["shape"] == [3, size, size] and result["finite"]
    assert result["peak_mb"] < 256, result


def test_large_legal_long_image_stays_under_a_bound(run_child):
    data = zero_png(1_000_000, 16)  # 16 M pixels (legal); the official resize: 3.1 G pixels
    result = run_child(data)
    assert result["shape"] == [3, 224, 224] and result["finite"]
    assert result["peak_mb"] < 512, result  # 48 MB decoded + interpreter and libraries


def test_pixel_bomb_is_refused_with_little_memory(run_child):
    data = zero_png(9500, 9500)  # 90.25 M pixels, just over the default limit
    assert len(data) < 2 * MB
    refused = run_child(data)
    assert "over the limit of 89,478,485 pixels" in refused["error"]
    assert refused["peak_mb"] < 200, refused
    # the same file without the limit really decodes, into 270 MB and more
    decoded = run_child(data, limit="none")
    assert decoded["shape"] == [3, 224, 224] and decoded["peak_mb"] > 270, decoded

import base64
import io

import cv2
import numpy as np
import pytest
from conftest import need_shared

from ernievil2.transforms import (HALF_MEAN, HALF_STD, OFFICIAL_MEAN, OFFICIAL_STD,
                                  ImageDecodeError, center_crop, decode_image, make_eval_transform,
                                  make_train_transform, resize_short_side_official)

MEAN, STD = np.array(OFFICIAL_MEAN), np.array(OFFICIAL_STD)


def encode(img, ext=".png"):
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


def noise(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def unnormalize(chw, mean=MEAN, std=STD):
    return chw * np.asarray(std)[:, None, None] + np.asarray(mean)[:, None, None]


# ------------------------------------------------------------------------- official parity
@pytest.mark.shared
def test_reproduces_official_pixels_first8():
    golden = np.load(need_shared("golden", "official_pixels_set1_first8.npy"))
    lines = need_shared("golden", "set1.tsv").read_text(encoding="utf-8").splitlines()[:8]
    transform = make_eval_transform()
    got = np.stack([transform(decode_image(base64.b64decode(line.strip().split("\t")[-1])))
                    for line in lines])
    assert got.dtype == np.float32 and got.shape == golden.shape == (8, 3, 224, 224)
    np.testing.assert_allclose(got, golden, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------ decode
def test_decode_returns_rgb_order():
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 2] = 255  # red in cv2's BGR
    img = decode_image(encode(bgr))
    assert img.dtype == np.uint8 and img.shape == (4, 5, 3)
    assert (img[..., 0] == 255).all() and (img[..., 1:] == 0).all()


def test_decode_grayscale_png_gives_three_equal_channels():
    gray = (np.arange(12 * 10) % 256).astype(np.uint8).reshape(12, 10)
    img = decode_image(encode(gray))
    assert img.shape == (12, 10, 3) and img.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(img[..., c], gray)


def test_decode_rgba_png_drops_alpha():
    bgra = np.zeros((6, 6, 4), np.uint8)
    bgra[..., 0], bgra[..., 3] = 200, 7  # blue, nearly transparent
    img = decode_image(encode(bgra))
    assert img.shape == (6, 6, 3) and (img[..., 2] == 200).all() and (img[..., :2] == 0).all()


def test_decode_16bit_png_becomes_8bit():
    v = np.array([[0, 256, 40000, 65535]], np.uint16)
    img = decode_image(encode(np.dstack([v] * 3)))
    assert img.dtype == np.uint8 and img.shape == (1, 4, 3)
    np.testing.assert_allclose(img[0, :, 0], v[0] / 256, atol=1)


def test_decode_cmyk_jpeg():
    Image = pytest.importorskip("PIL.Image")
    buf = io.BytesIO()
    Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(buf, "JPEG", quality=95)  # red
    img = decode_image(buf.getvalue())
    assert img.dtype == np.uint8 and img.shape == (8, 16, 3)
    np.testing.assert_allclose(img.reshape(-1, 3).mean(0), [255, 0, 0], atol=8)


@pytest.mark.parametrize("buf", [b"", b"hello world", encode(noise(8, 8))[:40]])
def test_undecodable_bytes_raise_clear_error(buf):
    with pytest.raises(ImageDecodeError, match=rf"not a decodable image \({len(buf)} bytes"):
        decode_image(buf)
    assert issubclass(ImageDecodeError, ValueError)


# ---------------------------------------------------------------------------- resize / crop
@pytest.mark.parametrize("hw, out_hw", [
    ((100, 50), (449, 224)),    # portrait: w -> 224, h -> int(224/50*100)+1
    ((50, 100), (224, 449)),    # landscape
    ((100, 100), (224, 225)),   # square: the official +1 makes it one column wider
    ((7, 3), (523, 224)),       # tiny images are upscaled
    ((300, 301), (224, 225)),   # int(224/300*301) = 224, +1
])
def test_resize_short_side_official_sizes(hw, out_hw):
    assert resize_short_side_official(noise(*hw), 224).shape[:2] == out_hw


def test_short_side_already_224_is_left_alone():
    img = noise(224, 300)
    assert resize_short_side_official(img, 224) is img
    assert resize_short_side_official(noise(500, 224), 224).shape == (500, 224, 3)


def test_center_crop_rounds_offsets_up():
    img = np.arange(5 * 8).reshape(5, 8)
    np.testing.assert_array_equal(center_crop(img, 2), img[2:4, 3:5])  # ceil(1.5)=2, ceil(3)=3
    with pytest.raises(ValueError, match="cannot crop"):
        center_crop(img, 6)


# -------------------------------------------------------------------------------- eval transform
def test_eval_transform_matches_manual_pipeline_for_224_short_side():
    img = noise(224, 301)  # not resized; crop x offset ceil(77/2) = 39
    out = make_eval_transform()(img)
    assert out.dtype == np.float32 and out.shape == (3, 224, 224) and out.flags["C_CONTIGUOUS"]
    want = (img[:, 39:263].transpose(2, 0, 1) / 255 - MEAN[:, None, None]) / STD[:, None, None]
    np.testing.assert_allclose(out, want, atol=1e-6)


def test_eval_transform_upscales_tiny_images():
    out = make_eval_transform()(noise(5, 9))
    assert out.shape == (3, 224, 224) and out.dtype == np.float32


def test_eval_transform_size_mean_std_configurable():
    img = np.full((500, 600, 3), 255, np.uint8)
    out = make_eval_transform(456, HALF_MEAN, HALF_STD)(img)
    assert out.shape == (3, 456, 456)
    np.testing.assert_allclose(out, 1.0)  # (1 - 0.5) / 0.5
    with pytest.raises(ValueError, match="mean and std"):
        make_eval_transform(224, (0.5, 0.5), HALF_STD)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32),
                                 np.zeros((4, 4, 4), np.uint8), np.zeros((0, 4, 3), np.uint8)])
def test_eval_transform_rejects_non_rgb_uint8(bad):
    with pytest.raises(ValueError, match="RGB uint8"):
        make_eval_transform()(bad)


# ------------------------------------------------------------------------------- train transform
def test_train_transform_is_deterministic_per_rng_seed():
    img = noise(240, 260)
    transform = make_train_transform(224)
    outs = [transform(img, np.random.default_rng(s)) for s in (3, 3, 4)]
    assert outs[0].shape == (3, 224, 224) and outs[0].dtype == np.float32
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])
    seeded = [make_train_transform(224, seed=9)(img) for _ in range(2)]  # factory seed, no rng
    np.testing.assert_array_equal(*seeded)


def test_train_transform_without_augmentation_is_a_crop():
    img = noise(224, 224)
    eval_out = make_eval_transform()(img)
    plain = make_train_transform(p_flip=0, p_jitter=0, p_gray=0, p_blur=0)
    np.testing.assert_allclose(plain(img, np.random.default_rng(0)), eval_out, atol=1e-6)
    flipped = make_train_transform(p_flip=1, p_jitter=0, p_gray=0, p_blur=0)
    np.testing.assert_allclose(flipped(img, np.random.default_rng(0)), eval_out[:, :, ::-1],
                               atol=1e-6)


def test_train_random_crop_lies_inside_the_resized_image():
    img = noise(224, 400)  # short side 224: no resize, only the x offset is random
    transform = make_train_transform(p_flip=0, p_jitter=0, p_gray=0, p_blur=0)
    out = np.round(unnormalize(transform(img, np.random.default_rng(1))) * 255).astype(np.uint8)
    crops = [img[:, x:x + 224].transpose(2, 0, 1) for x in range(177)]
    assert any(np.array_equal(out, c) for c in crops)


def test_train_grayscale_makes_channels_equal_and_stays_float32():
    transform = make_train_transform(p_jitter=1, p_gray=1, p_blur=1)
    out = unnormalize(transform(noise(230, 250), np.random.default_rng(2)))
    np.testing.assert_allclose(out[0], out[1], atol=1e-5)
    np.testing.assert_allclose(out[1], out[2], atol=1e-5)
    assert transform(noise(230, 250), np.random.default_rng(2)).dtype == np.float32


def test_train_brightness_jitter_range():
    img = np.full((224, 224, 3), 100, np.uint8)
    transform = make_train_transform(jitter=(0.4, 0, 0, 0), p_jitter=1, p_gray=0, p_blur=1)
    values = [unnormalize(transform(img, np.random.default_rng(s)))[0].mean() * 255
              for s in range(20)]
    assert min(values) >= 60 - 1e-3 and max(values) <= 140 + 1e-3  # factor in [0.6, 1.4]
    assert max(values) - min(values) > 10  # the factor really varies


def test_train_hue_jitter_changes_colour_but_not_gray():
    colour = np.zeros((224, 224, 3), np.uint8)
    colour[..., 0] = 200
    transform = make_train_transform(jitter=(0, 0, 0, 0.1), p_jitter=1, p_gray=0, p_blur=0,
                                     p_flip=0)
    outs = [unnormalize(transform(colour, np.random.default_rng(s))) for s in range(5)]
    assert any(np.abs(o[1:]).max() > 0.01 for o in outs)  # red leaks into green or blue
    gray = np.full((224, 224, 3), 77, np.uint8)
    np.testing.assert_allclose(unnormalize(transform(gray, np.random.default_rng(0))), 77 / 255,
                               atol=1e-5)

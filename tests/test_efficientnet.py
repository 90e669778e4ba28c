"""EfficientNet towers: builder arithmetic, TF "same" padding, published parameter counts, and the
real ImageNet Lite0 port (logits parity and ImageNet-50 predictions, from ../shared)."""
import importlib.util

import numpy as np
import paddle
import pytest
from conftest import ROOT, need_shared

from ernievil2.models.params import count_parameters
from ernievil2.models.efficientnet import (
    Conv2DSame,
    EfficientNet,
    build_efficientnet,
    default_image_size,
    drop_connect,
    round_filters,
    round_repeats,
)
from ernievil2.models.lite0_port import load_lite0_npz, lukemelas_to_paddle_name

LITE0 = ("data", "efficientnet_lite0")
NPZ = (*LITE0, "efficientnet_lite0_imagenet.npz")
CLASSIFIER_PARAMS = 1280 * 1000 + 1000  # the 1000-class head on 1280 features


# --- builder arithmetic ----------------------------------------------------------------------------

def tf_same_padding(size, kernel_size, stride):
    """(before, after) padding of TF padding='SAME' along one axis: output = ceil(size / stride),
    any odd total goes after (tf.nn.conv2d semantics)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


def test_tf_same_padding_hand_computed():
    # out = ceil(n / s); total = (out - 1) * s + k - n; the odd pixel goes after.
    assert tf_same_padding(224, 3, 2) == (0, 1)  # 111 * 2 + 3 - 224 = 1
    assert tf_same_padding(225, 3, 2) == (1, 1)  # 112 * 2 + 3 - 225 = 2
    assert tf_same_padding(8, 5, 2) == (1, 2)  # 3 * 2 + 5 - 8 = 3
    assert tf_same_padding(7, 5, 2) == (2, 2)  # 3 * 2 + 5 - 7 = 4
    assert tf_same_padding(14, 5, 1) == (2, 2)
    assert tf_same_padding(4, 1, 2) == (0, 0)


def test_conv_same_pads_bottom_right_like_tf():
    # 4x4 ones, 3x3 ones kernel, stride 2: TF pads (0, 1), so the first window is all inside (9),
    # windows touching the right/bottom pad see 6 and 4. Symmetric padding would give 4 at [0, 0].
    conv = Conv2DSame(1, 1, 3, stride=2)
    conv.weight.set_value(paddle.ones([1, 1, 3, 3]))
    out = conv(paddle.ones([1, 1, 4, 4])).numpy()[0, 0]
    np.testing.assert_array_equal(out, [[9, 6], [6, 4]])
    # Odd size 5: total padding 2 -> (1, 1), output 3x3, corners see 4 ones.
    out5 = conv(paddle.ones([1, 1, 5, 5])).numpy()[0, 0]
    np.testing.assert_array_equal(out5, [[4, 6, 4], [6, 9, 6], [4, 6, 4]])


@pytest.mark.parametrize("size,kernel,stride", [(224, 3, 2), (9, 5, 2), (8, 5, 2), (7, 3, 1), (6, 1, 2)])
def test_conv_same_equals_tf_padding_then_valid_conv(size, kernel, stride):
    # The reference pads explicitly (tf_same_padding) and convolves without padding.
    paddle.seed(0)
    conv = Conv2DSame(4, 4, kernel, stride=stride, groups=4)
    x = paddle.randn([2, 4, size, size])
    top, bottom = tf_same_padding(size, kernel, stride)
    ref = paddle.nn.functional.conv2d(
        paddle.nn.functional.pad(x, [top, bottom, top, bottom], data_format="NCHW"),
        conv.weight, stride=stride, groups=4)
    np.testing.assert_allclose(conv(x).numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)


def test_round_filters_and_repeats():
    assert round_filters(32, 1.6) == 48  # B5 stem: int(51.2 + 4) // 8 * 8
    assert round_filters(1280, 1.6) == 2048  # B5 head
    assert round_filters(1280, 4.3) == 5504  # L2 head (timm tf_efficientnet_l2 num_features)
    assert round_filters(16, 1.1) == 16  # 17.6 -> 16, within 10%
    assert round_filters(32, 1.4, skip=True) == 32
    assert round_repeats(3, 2.2) == 7  # ceil(6.6)
    assert round_repeats(1, 5.3) == 6
    assert round_repeats(4, 1.8, skip=True) == 4


def test_lite_keeps_stem_head_and_end_stages_fixed():
    with paddle.LazyGuard():
        lite4 = build_efficientnet("lite4")
        b4 = build_efficientnet("b4")
    assert lite4.conv_stem.weight.shape[0] == 32 and lite4.num_features == 1280
    assert b4.conv_stem.weight.shape[0] == 48 and b4.num_features == 1792
    # Stage repeats (1,2,2,3,3,4,1) * 1.8: b4 ceil -> 2,4,4,6,6,8,2 = 32; lite4 keeps 1 and 1 = 30.
    assert len(b4.blocks) == 32 and len(lite4.blocks) == 30
    assert lite4.blocks[0].depthwise_conv.weight.shape[0] == 32  # first block reads the fixed stem
    assert lite4.blocks[0].se is None and b4.blocks[0].se is not None
    assert isinstance(lite4.act, paddle.nn.ReLU6) and isinstance(b4.act, paddle.nn.Silu)
    # SE width = int(block INPUT filters * 0.25): B4 block 2 (first of stage 2; stage 1 has
    # ceil(1.8) = 2 blocks) reads 24 filters (16 * 1.4 -> 24) and expands them to 144, so SE
    # reduces to 6 (not 36).
    assert b4.blocks[2].depthwise_conv.weight.shape[0] == 144
    assert b4.blocks[2].se.reduce.weight.shape[0] == 6


def test_default_image_size_and_unknown_variant():
    assert default_image_size("b5") == 456 and default_image_size("efficientnet-l2") == 800
    assert default_image_size("lite3") == 280
    with pytest.raises(ValueError, match="unknown EfficientNet variant"):
        build_efficientnet("b9")


# --- published parameter counts (built lazily: no weights allocated) ------------------------------

# Exact trainable-parameter counts with the 1000-class classifier, from the TF reference tests:
# google/automl efficientdet/backbone/efficientnet_builder_test.py (b0..b7; b0 pooled features
# only = 4,007,548) and tensorflow/tpu models/official/efficientnet/lite/
# efficientnet_lite_builder_test.py (lite0..lite4).
PUBLISHED = {
    "b0": 5_288_548, "b1": 7_794_184, "b2": 9_109_994, "b3": 12_233_232, "b4": 19_341_616,
    "b5": 30_389_784, "b6": 43_040_704, "b7": 66_347_960,
    "lite0": 4_652_008, "lite1": 5_416_680, "lite2": 6_092_072, "lite3": 8_197_096,
    "lite4": 13_006_568,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_published(name):
    with paddle.LazyGuard():
        with_head = build_efficientnet(name, with_classifier=True)
        tower = build_efficientnet(name, with_classifier=False)
    assert count_parameters(with_head) == PUBLISHED[name]
    assert count_parameters(tower) == PUBLISHED[name] - (with_head.num_features * 1000 + 1000)


def test_l2_parameter_count_matches_noisy_student():
    # Noisy Student (Xie et al. 2020), Table: EfficientNet-L2 has 480M parameters.
    with paddle.LazyGuard():
        model = build_efficientnet("l2", with_classifier=True)
    assert model.num_features == 5504 and model.image_size == 800
    assert abs(count_parameters(model) - 480e6) < 0.5e6


# --- forward with random weights ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["b0", "lite0"])
def test_forward_shapes_small_input(name):
    paddle.seed(0)
    model = build_efficientnet(name, with_classifier=True, image_size=64)
    model.eval()
    assert model.image_size == 64 and model.num_features == 1280
    x = paddle.randn([2, 3, 64, 64])
    with paddle.no_grad():
        assert model(x).shape == [2, 1000]
        assert model.forward_features(x).shape == [2, 1280]
        assert model(paddle.randn([1, 3, 65, 47])).shape == [1, 1000]  # odd sizes: TF same pad
    tower = EfficientNet(name, with_classifier=False)
    tower.train()
    out = tower(x)
    assert out.shape == [2, 1280] and tower.classifier is None
    assert np.isfinite(out.numpy()).all()


def test_drop_connect_keeps_or_zeroes_whole_samples():
    paddle.seed(1)
    x = paddle.ones([64, 2, 3, 3])
    y = drop_connect(x, 0.5, training=True).numpy()
    per_sample = np.unique(y.reshape(64, -1), axis=1)
    assert per_sample.shape[1] == 1 and set(np.unique(per_sample)) == {0.0, 2.0}
    assert np.array_equal(drop_connect(x, 0.5, training=False).numpy(), x.numpy())


# --- the real Lite0 port --------------------------------------------------------------------------

def test_lukemelas_names_map_to_layers():
    assert lukemelas_to_paddle_name("_conv_stem.weight") == "conv_stem.weight"
    assert lukemelas_to_paddle_name("_bn1.running_var") == "bn_head._variance"
    assert lukemelas_to_paddle_name("_blocks.3._bn1.running_mean") == "blocks.3.bn_depthwise._mean"
    assert lukemelas_to_paddle_name("_blocks.1._expand_conv.weight") == "blocks.1.expand_conv.weight"
    assert lukemelas_to_paddle_name("_fc.weight") == "classifier.weight"
    assert lukemelas_to_paddle_name("_blocks.1._bn0.num_batches_tracked") is None
    assert lukemelas_to_paddle_name("_head.weight") is None


@pytest.fixture(scope="module")
def lite0_classifier():
    model = build_efficientnet("lite0", with_classifier=True)
    loaded = load_lite0_npz(model, need_shared(*NPZ))
    assert len(loaded) == 247
    model.eval()
    return model


@pytest.mark.shared
def test_lite0_reproduces_reference_logits(lite0_classifier):
    x = np.load(need_shared(*LITE0, "inputs_first4.npy"))
    ref = np.load(need_shared(*LITE0, "logits_first4.npy"))
    with paddle.no_grad():
        logits = lite0_classifier(paddle.to_tensor(x)).numpy()
    assert np.abs(logits - ref).max() < 1e-4


def reference_preprocess(path, resize=256, crop=224):
    """The reference's test-time pipeline: Pillow bicubic resize of the short side to 256 (long
    side rounded), centre crop 224, (x / 255 - 0.5) / 0.5, CHW."""
    from PIL import Image

    im = Image.open(path).convert("RGB")
    w, h = im.size
    scale = resize / min(w, h)
    im = im.resize((resize, round(h * scale)) if w <= h else (round(w * scale), resize),
                   Image.BICUBIC)
    w, h = im.size
    left, top = int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))
    arr = np.asarray(im.crop((left, top, left + crop, top + crop)), dtype=np.float32) / 255.0
    return ((arr - 0.5) / 0.5).transpose(2, 0, 1)


def read_imagenet50_labels(path):
    """labels.tsv: header, then file, class_index, wnid, name_from_filename, label_en, label_zh,
    reference_top5 (comma-separated class indices)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    rows = []
    for n, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != len(header):
            raise ValueError(f"{path}:{n}: {len(fields)} columns, expected {len(header)}")
        row = dict(zip(header, fields))
        rows.append((row["file"], int(row["class_index"]),
                     [int(c) for c in row["reference_top5"].split(",")]))
    return rows


@pytest.mark.shared
def test_lite0_preprocessing_matches_reference_inputs():
    folder = need_shared(*LITE0, "imagenet50")
    rows = read_imagenet50_labels(folder / "labels.tsv")
    ours = np.stack([reference_preprocess(folder / f) for f, _, _ in rows[:4]])
    np.testing.assert_allclose(ours, np.load(need_shared(*LITE0, "inputs_first4.npy")), atol=1e-6)


@pytest.mark.shared
def test_lite0_imagenet50_agrees_with_reference(lite0_classifier):
    folder = need_shared(*LITE0, "imagenet50")
    rows = read_imagenet50_labels(folder / "labels.tsv")
    assert len(rows) == 50
    pixels = np.stack([reference_preprocess(folder / f) for f, _, _ in rows])
    with paddle.no_grad():
        logits = np.concatenate([lite0_classifier(paddle.to_tensor(pixels[i:i + 10])).numpy()
                                 for i in range(0, len(pixels), 10)])
    pred = logits.argmax(1)
    agree = sum(int(p == top5[0]) for p, (_, _, top5) in zip(pred, rows))
    assert agree >= 48, f"top-1 agrees with the reference on {agree}/50"


@pytest.mark.shared
def test_load_lite0_npz_is_strict(tmp_path):
    src = need_shared(*NPZ)
    with np.load(src) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.pop("_blocks.5._bn1.running_var")
    arrays["_blocks.99._bn1.weight"] = np.zeros(3, np.float32)
    arrays["_conv_head.weight"] = arrays["_conv_head.weight"][:8]
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    with paddle.LazyGuard():
        model = build_efficientnet("lite0", with_classifier=True)
    with pytest.raises(ValueError) as err:
        load_lite0_npz(model, bad)
    msg = str(err.value)
    assert "bad.npz" in msg and "blocks.5.bn_depthwise._variance" in msg
    assert "_blocks.99._bn1.weight" in msg and "_conv_head.weight" in msg


def _load_tool():
    spec = importlib.util.spec_from_file_location(
        "convert_lite0_weights", ROOT / "tools" / "convert_lite0_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.shared
def test_convert_tool_writes_visual_prefixed_tower(tmp_path, lite0_classifier):
    tool = _load_tool()
    npz = need_shared(*NPZ)
    out = tmp_path / "lite0.pdparams"
    assert tool.main([str(npz), str(out)]) == 0
    state = paddle.load(str(out))
    assert all(k.startswith("visual.") for k in state)
    assert "visual.classifier.weight" not in state and len(state) == 245
    assert [p.name for p in tmp_path.iterdir()] == ["lite0.pdparams"]  # no temp file left

    tower = build_efficientnet("lite0", with_classifier=False)
    tower.set_state_dict({k[len("visual."):]: v for k, v in state.items()})
    tower.eval()
    x = paddle.to_tensor(np.load(need_shared(*LITE0, "inputs_first4.npy"))[:1])
    with paddle.no_grad():
        np.testing.assert_allclose(tower(x).numpy(), lite0_classifier.forward_features(x).numpy(),
                                   atol=1e-5)

    out_cls = tmp_path / "lite0_cls.pdparams"
    assert tool.main([str(npz), str(out_cls), "--with-classifier"]) == 0
    assert paddle.load(str(out_cls))["visual.classifier.weight"].shape == [1280, 1000]
    assert tool.main([str(tmp_path / "absent.npz"), str(tmp_path / "x.pdparams")]) == 1

"""Exported towers (Paddle Inference, and ONNX when paddle2onnx is installed) and the standalone
deploy encoder agree with the eager model, for any batch size and text length."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import paddle
import pytest
import yaml

from conftest import ROOT
from ernievil2.cli import load_infer_config as load_config
from ernievil2.deploy_encoder import DeployEncoder, ExportError, read_export_meta
from ernievil2.export import export_from_config
from ernievil2.factory import create_model_and_transforms
from ernievil2.transforms import decode_image
from helpers import make_image, tiny_config

ATOL = 1e-5
TEXTS = ["红色的圆形", "a red circle on the left", "蓝色方块", "two blue squares and a green circle"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    cfg = load_config(None, tiny_config(tmp).items())
    out = tmp / "export"
    export_from_config(cfg, str(out))
    model, _, transform, _ = create_model_and_transforms(cfg)  # same seed: the same weights
    return cfg, str(out), model, transform


def eager(model, fn, x):
    with paddle.no_grad():
        return getattr(model, fn)(paddle.to_tensor(x)).numpy()


def test_export_folder_holds_both_towers_the_vocab_and_the_standalone_encoder(exported):
    _, out, _, _ = exported
    names = set(os.listdir(out))
    assert {"image.json", "image.pdiparams", "text.json", "text.pdiparams", "vocab.txt",
            "encoder.json", "deploy_encoder.py", "transforms.py", "tokenizer.py"} <= names
    meta = read_export_meta(out)
    assert meta["embed_dim"] == 64 and meta["image"]["image_size"] == 32
    assert meta["text"]["max_seq_len"] == 16 and meta["source"]["fingerprint"]


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_predictors_match_eager_for_any_batch_size(exported, batch):
    _, out, model, _ = exported
    enc = DeployEncoder(out, device="cpu")
    pixels = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(enc.run_image(pixels), eager(model, "encode_image", pixels), atol=ATOL, rtol=0)


@pytest.mark.parametrize("shape", [(1, 2), (2, 7), (4, 16), (3, 40)])
def test_predictors_match_eager_for_any_text_length(exported, shape):
    _, out, model, _ = exported
    enc = DeployEncoder(out, device="cpu")
    ids = np.random.default_rng(shape[1]).integers(5, 64, shape)
    ids[:, 0] = 1
    ids[0, max(1, shape[1] // 2):] = 0  # a padded row
    np.testing.assert_allclose(enc.run_text(ids), eager(model, "encode_text", ids), atol=ATOL, rtol=0)


def test_encoder_preprocesses_raw_inputs_as_the_pipeline(exported):
    cfg, out, model, transform = exported
    enc = DeployEncoder(out, device="cpu", text_padding="max_length")
    images = [make_image(s) for s in range(3)]
    pixels = np.stack([transform(decode_image(b)) for b in images])
    np.testing.assert_allclose(enc.encode_images(images, batch_size=2),
                               eager(model, "encode_image", pixels), atol=ATOL, rtol=0)
    from ernievil2.factory import create_tokenizer
    ids = create_tokenizer(cfg).batch_encode(TEXTS, padding="max_length")
    emb = enc.encode_texts(TEXTS)
    np.testing.assert_allclose(emb, eager(model, "encode_text", ids), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_copied_export_folder_runs_without_the_repository(exported, tmp_path):
    _, out, model, transform = exported
    img = tmp_path / "img.png"
    img.write_bytes(make_image(7))
    script = (
        "import sys, json; sys.path.insert(0, sys.argv[1]); import deploy_encoder as d;"
        "d.main([sys.argv[1], '--device', 'cpu', '--text', *json.loads(sys.argv[2]), "
        "'--image', sys.argv[3], '--save', sys.argv[4]]);"
        "assert not [m for m in sys.modules if m.startswith('ernievil2')], 'used the repository'")
    saved = tmp_path / "emb.npz"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", script, out, json.dumps(TEXTS[:2]), str(img), str(saved)],
                       capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 text(s), 1 image(s), dim 64" in r.stdout
    got = np.load(saved)
    pixels = transform(decode_image(img.read_bytes()))[None]
    np.testing.assert_allclose(got["image"], eager(model, "encode_image", pixels), atol=ATOL, rtol=0)
    assert got["text"].shape == (2, 64)


def test_unfinished_export_is_rejected_naming_the_file(exported, tmp_path):
    with pytest.raises(ExportError, match="encoder.json: not found"):
        DeployEncoder(tmp_path)
    _, out, _, _ = exported
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    meta = json.load(open(copy / "encoder.json"))
    meta["image"]["params"] = "missing.pdiparams"
    (copy / "encoder.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="image.params file .*missing.pdiparams is missing"):
        read_export_meta(copy)
    meta["version"] = 99
    (copy / "encoder.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="version 99"):
        read_export_meta(copy)


def test_export_cli_writes_a_verified_export(tmp_path):
    cfg = tiny_config(tmp_path)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    out = tmp_path / "exp"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "export_model.py"), str(path),
                        "infer_batch_size=4", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    diffs = read_export_meta(out)["verified_max_abs_diff"]  # verified by default
    assert set(diffs) == {"image", "text"} and max(diffs.values()) <= ATOL


def test_onnx_export_matches_eager(exported, tmp_path):
    pytest.importorskip("paddle2onnx", reason="paddle2onnx is optional (pip install paddle2onnx onnxruntime)")
    ort = pytest.importorskip("onnxruntime")
    from ernievil2.export import export_onnx
    _, out, model, _ = exported
    copy = tmp_path / "export"
    shutil.copytree(out, copy)
    meta = export_onnx(str(copy))
    assert read_export_meta(copy)["onnx"]["image"] == "image.onnx"
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    sess = ort.InferenceSession(str(copy / meta["onnx"]["image"]), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"images": pixels})[0],
                               eager(model, "encode_image", pixels), atol=ATOL, rtol=0)
    sess = ort.InferenceSession(str(copy / meta["onnx"]["text"]), providers=["CPUExecutionProvider"])
    for shape in [(1, 3), (3, 11)]:  # dynamic batch and length
        ids = rng.integers(5, 64, shape).astype(np.int64)
        ids[:, 0] = 1
        np.testing.assert_allclose(sess.run(None, {"input_ids": ids})[0],
                                   eager(model, "encode_text", ids), atol=ATOL, rtol=0)


# Small towers of every type: ViT; EfficientNet Lite-style (ReLU6, no squeeze-excite) and B-style
# (swish, squeeze-excite), both with TF "same" padding on stride-2 convolutions: 34 -> 17 pads
# (0, 1) in the stem, 17 -> 9 pads (2, 2) in the 5x5 depthwise convolution.
TINY_STAGES = [[1, 3, 1, 8, 1, 0.25], [6, 5, 2, 16, 1, 0.25], [6, 3, 2, 24, 1, 0.25]]
TOWERS = {
    "vit": None,  # tiny_config's
    "efficientnet_lite": {"type": "efficientnet", "name": "lite0", "image_size": 34,
                          "stages": TINY_STAGES},
    "efficientnet_b": {"type": "efficientnet", "name": "b0", "image_size": 34,
                       "width_coefficient": 0.5, "stages": TINY_STAGES},
}


def _onnx_modules():
    pytest.importorskip("paddle2onnx", reason="paddle2onnx is optional (pip install paddle2onnx onnxruntime)")
    return pytest.importorskip("onnxruntime")


def _config(tmp_path, tower="vit"):
    over = {"image_model": TOWERS[tower]} if TOWERS[tower] else {}
    return load_config(None, tiny_config(tmp_path, **over).items())


@pytest.mark.parametrize("tower", list(TOWERS))
def test_onnx_export_of_every_tower_type_is_verified_and_matches(tower, tmp_path):
    ort = _onnx_modules()
    cfg = _config(tmp_path, tower)
    out = tmp_path / "export"
    meta = export_from_config(cfg, str(out), onnx=True)
    diffs = meta["verified_max_abs_diff"]
    assert set(diffs) == {"image", "text", "image_onnx", "text_onnx"}
    assert max(diffs.values()) <= ATOL and read_export_meta(out)["onnx"]["image"] == "image.onnx"
    # Independently of verify_export: other pixels, another batch size, against the eager model.
    model = create_model_and_transforms(cfg)[0]
    size = meta["image"]["image_size"]
    pixels = np.random.default_rng(5).uniform(-1, 1, (2, 3, size, size)).astype(np.float32)
    sess = ort.InferenceSession(str(out / "image.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"images": pixels})[0],
                               eager(model, "encode_image", pixels), atol=ATOL, rtol=0)


def _export_files(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_failed_onnx_conversion_leaves_no_listed_onnx_file(tmp_path, monkeypatch):
    _onnx_modules()
    import ernievil2.export as export
    real = export.verify_export

    def onnx_off_by_half(model, export_dir, formats=("paddle", "onnx"), **kw):
        diffs = real(model, export_dir, formats, **kw)
        return {k: v + 0.5 if k.endswith("_onnx") else v for k, v in diffs.items()}

    monkeypatch.setattr(export, "verify_export", onnx_off_by_half)
    out = tmp_path / "export"
    with pytest.raises(ExportError) as err:
        export_from_config(_config(tmp_path), str(out), onnx=True)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{out}: the ONNX towers differ") and "image_onnx" in msg
    meta = read_export_meta(out)  # the Paddle export stays, verified, without the ONNX entry
    assert "onnx" not in meta and set(meta["verified_max_abs_diff"]) == {"image", "text"}
    assert not [n for n in _export_files(out) if n.endswith(".onnx")]


def test_an_onnx_conversion_that_raises_leaves_no_onnx_file(tmp_path, monkeypatch):
    _onnx_modules()
    import paddle2onnx

    def half_written(model_file, params_file, save_file, **kw):
        open(save_file, "wb").write(b"partial")
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(paddle2onnx, "export", half_written)
    out = tmp_path / "export"
    with pytest.raises(RuntimeError, match="conversion failed"):
        export_from_config(_config(tmp_path), str(out), onnx=True)
    assert "onnx" not in read_export_meta(out) and not (out / "image.onnx").exists()


def test_a_failed_paddle_export_is_removed_whole(tmp_path, monkeypatch):
    import ernievil2.export as export
    real = export.verify_export
    monkeypatch.setattr(export, "verify_export", lambda model, d, formats=("paddle", "onnx"), **kw: {
        k: float("nan") if k == "image" else v for k, v in real(model, d, formats, **kw).items()})
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # not the export's: stays
    with pytest.raises(ExportError, match=r"the exported towers differ .*image max \|diff\| nan.*"
                                          r"the export was removed"):
        export_from_config(_config(tmp_path), str(out))
    assert _export_files(out) == ["notes.txt"]


def _cpu_has_bf16():
    try:
        return bool(paddle.base.core.supports_bfloat16())
    except AttributeError:
        return False


@pytest.mark.skipif(not _cpu_has_bf16(), reason="this CPU has no bfloat16 support (AVX512-BF16/AMX)")
def test_bf16_on_cpu_stays_close_to_fp32(exported):
    """bf16 (oneDNN on CPUs that have it; the GPU path is untested here): cosine >= 0.999."""
    _, out, _, _ = exported
    fp32, bf16 = DeployEncoder(out, device="cpu"), DeployEncoder(out, device="cpu", precision="bf16")
    rng = np.random.default_rng(1)
    pixels = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    ids = rng.integers(5, 64, (4, 12))
    ids[:, 0] = 1
    for a, b in ((fp32.run_image(pixels), bf16.run_image(pixels)), (fp32.run_text(ids), bf16.run_text(ids))):
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cos.min() >= 0.999
        assert np.abs(a - b).max() > 0  # bf16 did run (fp32 would agree exactly)


def test_fp16_on_cpu_is_refused_with_a_clear_error(exported):
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        DeployEncoder(exported[1], device="cpu", precision="fp16")

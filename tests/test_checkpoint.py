import subprocess
import sys

import numpy as np
import paddle
import pytest

from ernievil2.checkpoint import (CheckpointError, detect_layout, load_checkpoint,
                                  official_to_paddlenlp, paddlenlp_to_official, read_state_dict)
from ernievil2.factory import build_dual_encoder as create_model
from helpers import TINY_ERNIE, TINY_VIT
from conftest import ROOT


def model(seed):
    paddle.seed(seed)
    m = create_model(dict(TINY_VIT), dict(TINY_ERNIE))
    m.eval()
    return m


def save(sd, path):
    paddle.save(sd, str(path))
    return str(path)


def as_numpy(m):
    return {k: v.numpy() for k, v in m.state_dict().items()}


def test_official_layout_round_trip_reproduces_the_embeddings(tmp_path):
    src, dst = model(1), model(2)
    info = load_checkpoint(dst, save(as_numpy(src), tmp_path / "w.pdparams"))
    assert info["layout"] == "official"
    x = paddle.randn([2, 3, 32, 32])
    np.testing.assert_array_equal(src.encode_image(x).numpy(), dst.encode_image(x).numpy())


def test_paddlenlp_layout_loads_into_the_same_model(tmp_path):
    src, dst = model(1), model(2)
    nlp = official_to_paddlenlp(as_numpy(src))
    assert detect_layout(nlp) == "paddlenlp"
    assert "vision_model.transformer.layers.0.self_attn.q_proj.weight" in nlp
    assert nlp["vision_model.class_embedding"].shape == (64,)
    assert load_checkpoint(dst, save(nlp, tmp_path / "model_state.pdparams"))["layout"] == "paddlenlp"
    ids = paddle.to_tensor([[1, 5, 6, 2]], dtype="int64")
    x = paddle.randn([1, 3, 32, 32])
    np.testing.assert_array_equal(src.encode_text(ids).numpy(), dst.encode_text(ids).numpy())
    np.testing.assert_array_equal(src.encode_image(x).numpy(), dst.encode_image(x).numpy())


def test_qkv_fusion_order_is_q_k_v():
    sd = as_numpy(model(0))
    nlp = official_to_paddlenlp(sd)
    w = sd["visual.blocks.1.attn.qkv.weight"]
    np.testing.assert_array_equal(nlp["vision_model.transformer.layers.1.self_attn.k_proj.weight"],
                                  w[:, 64:128])
    back = paddlenlp_to_official(nlp)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def test_strict_load_names_missing_unexpected_and_misshaped(tmp_path):
    sd = as_numpy(model(0))
    del sd["text_model.pooler.weight"]
    sd["visual.extra.weight"] = np.zeros(3, np.float32)
    sd["text_model.ln.bias"] = np.zeros(65, np.float32)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(model(1), save(sd, tmp_path / "bad.pdparams"))
    msg = str(e.value)
    assert "missing (1): text_model.pooler.weight" in msg
    assert "unexpected (1): visual.extra.weight" in msg
    assert "text_model.ln.bias: checkpoint [65] vs model [64]" in msg


def test_unused_official_classifier_is_dropped(tmp_path, caplog):
    sd = as_numpy(model(0))
    sd["visual.classfy.weight"] = np.zeros((64, 10), np.float32)
    info = load_checkpoint(model(1), save(sd, tmp_path / "old.pdparams"))
    assert info["dropped"] == ["visual.classfy.weight"]


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(str(tmp_path / "nope.pdparams"))


def test_converter_command_round_trip(tmp_path):
    sd = as_numpy(model(3))
    src = save(sd, tmp_path / "official.pdparams")
    nlp, back = tmp_path / "model_state.pdparams", tmp_path / "back.pdparams"
    tool = str(ROOT / "tools" / "convert_checkpoint.py")
    subprocess.run([sys.executable, tool, src, str(nlp), "--to", "paddlenlp"], check=True)
    subprocess.run([sys.executable, tool, str(nlp), str(back), "--to", "official"], check=True)
    assert detect_layout(read_state_dict(str(nlp))) == "paddlenlp"
    out = read_state_dict(str(back))
    assert set(out) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(out[k], sd[k])

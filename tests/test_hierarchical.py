"""Hierarchical alignment (ViCHA): `hierarchical_layers: K` adds the image-text loss on the pooled
features of the K-1 layers below the top of both towers, through training-only heads."""
import json
import subprocess

import numpy as np
import paddle
import pytest

import _hierarchical_dist_worker as W
from ernievil2.factory import build_dual_encoder
from ernievil2.losses import MultiViewContrastiveLoss
from ernievil2.models.efficientnet import EfficientNet
from ernievil2.train.feature_cache import LevelTower
from ernievil2.train.gradcache import gradcache_step
from helpers import TINY_ERNIE, TINY_VIT, launch_worker
from test_train_resume import cmd, train_config

PAIRS = [("image", "text", 1.0), ("image_h1", "text_h1", 0.5)]


def tiny(**text):
    paddle.seed(0)
    return build_dual_encoder(dict(TINY_VIT), {**TINY_ERNIE, **text})


# ------------------------------------------------------------------------------- the towers
def test_levels_top_is_the_output_and_lower_levels_are_the_layers_below():
    m = tiny(pooling="mean", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    m.eval()
    ids = paddle.to_tensor([[1, 7, 8, 9, 2, 0], [1, 5, 2, 0, 0, 0]], dtype="int64")
    text = m.text_model
    levels = text.forward_levels(ids, 2)
    np.testing.assert_array_equal(levels[0].numpy(), text(ids).numpy())
    # level 1 by hand: the mean over real tokens of the hidden states after the first block
    x = text.ln(text.word_emb(ids) + text.pos_emb(paddle.arange(6).unsqueeze(0)))
    keep = (ids != 0).astype("float32")
    x = text.encoder_stack.block[0](x, ((1.0 - keep) * -10000.0).unsqueeze([1, 2]))
    want = (x * keep.unsqueeze(-1)).sum(1) / keep.sum(1, keepdim=True)
    np.testing.assert_allclose(levels[1].numpy(), want.numpy(), atol=1e-6)

    images = paddle.randn([2, 3, 32, 32])
    vis = m.visual
    vlev = vis.forward_levels(images, 2)
    np.testing.assert_array_equal(vlev[0].numpy(), vis(images).numpy())
    x = vis.patch_embed(images)
    x = paddle.concat([vis.class_embedding.expand([2, 1, x.shape[2]]), x], 1) + vis.positional_embedding
    want = vis.blocks[0](vis.norm_pre(x))[:, 0]
    np.testing.assert_allclose(vlev[1].numpy(), want.numpy(), atol=1e-6)


def test_efficientnet_levels_are_the_pooled_stage_outputs():
    paddle.seed(0)
    net = EfficientNet("lite0", with_classifier=False, image_size=64)
    net.eval()
    x = paddle.randn([2, 3, 64, 64])
    levels = net.forward_levels(x, 3)
    assert [tuple(t.shape) for t in levels] == [(2, 1280), (2, 320), (2, 192)]
    assert net.level_widths(3) == [1280, 320, 192]
    np.testing.assert_array_equal(levels[0].numpy(), net(x).numpy())
    trunk = net.forward_trunk(x)  # the last stage's output
    np.testing.assert_allclose(levels[1].numpy(), trunk.mean(axis=[2, 3]).numpy(), atol=1e-6)
    cached = LevelTower(net, 3)(x)
    np.testing.assert_array_equal(cached.numpy(), paddle.concat(levels, -1).numpy())


def test_too_many_levels_is_one_clear_error():
    m = tiny()
    with pytest.raises(ValueError, match=r"hierarchical_layers 3 exceeds the depth of the image "
                                         r"tower \(2 levels\), text tower \(2 levels\)"):
        m.add_level_heads(3)
    shallow = tiny(num_hidden_layers=0, pooling="mean")
    with pytest.raises(ValueError, match=r"text tower \(1 level\)"):
        shallow.add_level_heads(2)


def test_level_heads_are_training_only():
    m = tiny()
    before = set(m.state_dict())
    m.add_level_heads(2)
    added = set(m.state_dict()) - before
    assert added == {"train_heads.image_h1_proj.weight", "train_heads.text_h1_proj.weight"}
    out = m.encode_image_levels(paddle.randn([2, 3, 32, 32]), 2)
    assert len(out) == 2 and all(abs(float(paddle.norm(o, axis=-1).mean()) - 1) < 1e-5 for o in out)


# ------------------------------------------------------------------------- cross-process, GradCache
@pytest.mark.slow
def test_two_processes_give_the_whole_batch_gradients(tmp_path):
    out = tmp_path / "grads.npz"
    got = launch_worker(tmp_path, "_hierarchical_dist_worker.py", out=out)
    _, ref = W.reference()
    assert {"train_heads.image_h1_proj.weight", "train_heads.text_h1_proj.weight",
            "train_heads.temperature_image_h1__text_h1"} <= set(ref) <= set(got)
    worst = max(float(np.abs(got[k] - ref[k]).max()) for k in ref)
    assert worst < 1e-5, worst


def _grads(m):
    return {k: p.grad.numpy().copy() for k, p in m.named_parameters() if p.grad is not None}


def test_gradcache_with_levels_equals_the_full_batch_with_dropout():
    m = tiny(hidden_dropout_prob=0.3)
    m.add_level_heads(2)
    m.add_temperatures(PAIRS)
    m.train()
    loss = MultiViewContrastiveLoss(PAIRS)
    rng = np.random.default_rng(3)
    batch = {"image": rng.standard_normal((8, 3, 32, 32)).astype("float32"),
             "text": rng.integers(5, 60, (8, 7)).astype("int64")}

    def enc(view):
        fn = m.encode_image_levels if view == "image" else m.encode_text_levels
        return lambda x: dict(zip((view, f"{view}_h1"), fn(paddle.to_tensor(x), 2)))

    encoders = {v: enc(v) for v in ("image", "text")}
    loss_fn = lambda f: loss(f, m.logit_scales(PAIRS))  # noqa: E731

    # reference: one graph over the same micro-batches (4 rows), same random states
    paddle.seed(9)
    parts = {}
    for view in ("image", "text"):
        for s in (0, 4):
            for k, t in encoders[view](batch[view][s:s + 4]).items():
                parts.setdefault(k, []).append(t)
    total, _ = loss_fn({k: paddle.concat(v) for k, v in parts.items()})
    total.backward()
    ref = _grads(m)
    m.clear_gradients()

    paddle.seed(9)
    info = gradcache_step(encoders, loss_fn, batch, 4)
    got = _grads(m)
    assert info["loss"] == pytest.approx(float(total), rel=1e-6)
    assert set(got) == set(ref) and "train_heads.text_h1_proj.weight" in got
    assert max(float(np.abs(got[k] - ref[k]).max()) for k in ref) < 1e-5
    # the text tower's dropout is really on: another random state gives other gradients
    m.clear_gradients()
    paddle.seed(10)
    gradcache_step(encoders, loss_fn, batch, 4)
    other = _grads(m)
    assert max(float(np.abs(other[k] - ref[k]).max()) for k in ref if "text_model" in k) > 1e-4


# ------------------------------------------------------------------------------------ training
def _run(tmp_path, name, **over):
    path, cfg = train_config(tmp_path / name, max_steps=4, save_every=4, **over)
    subprocess.run(cmd(path), check=True, capture_output=True, timeout=600)
    recs = [json.loads(line) for line in open(tmp_path / name / "out" / "train.jsonl", encoding="utf-8")]
    sd = paddle.load(str(tmp_path / name / "out" / "final" / "model.pdparams"))
    return [r for r in recs if "loss" in r], {k: np.asarray(v) for k, v in sd.items()}


@pytest.mark.slow
def test_the_top_level_is_todays_loss_bit_for_bit(tmp_path):
    """K=2 with the level weight 0 trains exactly as K=1: same image-text losses, same weights;
    with weight 1 the level changes training (so the comparison can fail)."""
    one, w1 = _run(tmp_path, "k1", log_every=1)
    zero, w0 = _run(tmp_path, "k2w0", log_every=1, hierarchical_layers=2, hierarchical_weights=[0.0])
    on, won = _run(tmp_path, "k2w1", log_every=1, hierarchical_layers=2)
    assert [r["loss/image-text"] for r in one] == [r["loss/image-text"] for r in zero]
    assert [r["loss"] for r in one] == [r["loss"] for r in zero]
    assert "loss/image_h1-text_h1" in zero[0] and "loss/image_h1-text_h1" not in one[0]
    assert set(w1) == set(w0) == set(won)  # the final model holds no level heads
    for k in w1:
        np.testing.assert_array_equal(w1[k], w0[k], err_msg=k)
    assert any(not np.array_equal(w1[k], won[k]) for k in w1 if k.startswith("text_model."))


def test_config_errors_are_one_line(tmp_path):
    path, _ = train_config(tmp_path / "bad", hierarchical_layers=3)
    proc = subprocess.run(cmd(path), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "hierarchical_layers 3 exceeds the depth" in proc.stderr
    assert "Traceback" not in proc.stderr
    path, _ = train_config(tmp_path / "bad2", hierarchical_layers=2, hierarchical_weights=[1, 2])
    proc = subprocess.run(cmd(path), capture_output=True, text=True, timeout=300)
    assert "hierarchical_weights has 2 number(s); hierarchical_layers 2 needs 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_feature_cache_keeps_every_level_under_its_own_key(tmp_path):
    from ernievil2.train.data import TrainIndex
    from ernievil2.train.feature_cache import fingerprint
    from ernievil2.transforms import make_eval_transform, make_train_transform

    path, _ = train_config(tmp_path / "fp")
    index = TrainIndex(path.replace("train.yaml", "train.tsv"))
    paddle.seed(0)
    net = EfficientNet("lite0", with_classifier=False, image_size=32)
    tfs = (make_train_transform(32), make_eval_transform(32))
    keys = [fingerprint(t, index, 2, *tfs, 0) for t in (net, LevelTower(net, 2), LevelTower(net, 3))]
    assert len(set(keys)) == 3
    assert keys[0] == fingerprint(net, index, 2, *tfs, 0)  # K=1 keeps the plain tower's key


@pytest.mark.slow
def test_levels_and_concepts_train_under_gradcache(tmp_path):
    """The trainer's GradCache path with level features and (features, tag ids) image inputs:
    with dropout off it gives the losses of the whole-batch step."""
    quiet = {**TINY_ERNIE, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    from helpers import write_json
    over = dict(log_every=1, hierarchical_layers=2, visual_concepts="embed",
                text_model_config=write_json(tmp_path / "quiet.json", quiet))
    whole, _ = _run(tmp_path, "whole", **over)
    micro, _ = _run(tmp_path, "micro", micro_batch_size=4, **over)
    assert "loss/image_h1-text_h1" in micro[0]
    for a, b in zip(whole, micro):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)


@pytest.mark.slow
def test_a_resume_with_other_levels_stops_naming_the_key(tmp_path):
    path, _ = train_config(tmp_path / "r", max_steps=2, save_every=2, hierarchical_layers=2)
    subprocess.run(cmd(path), check=True, capture_output=True, timeout=600)
    proc = subprocess.run(cmd(path, "max_steps=4", "resume=auto", "hierarchical_layers=1"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "hierarchical_layers" in proc.stderr and "Traceback" not in proc.stderr

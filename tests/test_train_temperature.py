"""The model owns every temperature: image-text under its official name, the other view pairs
under `train_heads.`; init_logit_scale applies only to a random start or when the config sets it;
inference and the final model see only the official names; old checkpoint dirs resume or stop
with one line saying what to do."""
import math
import os
import shutil
import subprocess

import numpy as np
import paddle
import pytest
import yaml

from conftest import ROOT
from ernievil2.checkpoint import CheckpointError, convert_checkpoint, load_checkpoint, read_state_dict
from ernievil2.cli import load_infer_config, load_train_config
from ernievil2.factory import build_dual_encoder, create_model
from ernievil2.models.dual_encoder import OFFICIAL_TEMPERATURE_B, temperature_name
from ernievil2.train.loop import build_model
from helpers import TINY_ERNIE, TINY_VIT, write_json, write_tsv
from test_train_resume import cmd, losses, train_config

FOUR_VIEWS = [["image", "text", 1.0], ["image", "image_aug", 0.5], ["text", "text_aug", 0.5],
              ["image", "tags", 0.5]]
HEADS = ["train_heads.temperature_image__image_aug", "train_heads.temperature_text__text_aug",
         "train_heads.temperature_image__tags"]


def tiny_model(seed=0):
    paddle.seed(seed)
    return build_dual_encoder(dict(TINY_VIT), dict(TINY_ERNIE))


def numpy_state(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


def save(sd, path):
    paddle.save(sd, str(path))
    return str(path)


def value(sd, name):
    return float(np.asarray(sd[name]).reshape(-1)[0])


# ------------------------------------------------------------------------------ the model
def test_temperatures_are_model_parameters_under_official_and_train_heads_names():
    assert OFFICIAL_TEMPERATURE_B == pytest.approx(math.log(1 / 0.07))
    assert OFFICIAL_TEMPERATURE_B == pytest.approx(2.65926, abs=1e-5)
    m = tiny_model()
    assert "contrastive_loss_mm.temperature_b" in m.state_dict()
    assert not any(k.startswith("train_heads.") for k in m.state_dict())  # inference model
    added = m.add_temperatures(FOUR_VIEWS)
    assert added == HEADS
    assert m.add_temperatures(FOUR_VIEWS) == []  # idempotent
    assert m.temperature("text", "image") is m.contrastive_loss_mm.temperature_b
    assert temperature_name("text", "image") == "contrastive_loss_mm.temperature_b"
    assert temperature_name("image", "tags") == "train_heads.temperature_image__tags"
    assert set(m.temperatures()) == {"contrastive_loss_mm.temperature_b", *HEADS}
    for name in HEADS:
        assert m.state_dict()[name].item() == pytest.approx(OFFICIAL_TEMPERATURE_B)
    with pytest.raises(KeyError, match="add_temperatures"):
        m.temperature("text", "tags")


def test_logit_scales_clip_and_clamp_writes_the_bound():
    m = tiny_model()
    m.add_temperatures(FOUR_VIEWS[:2])
    m.contrastive_loss_mm.temperature_b.set_value(paddle.to_tensor([6.0]))
    m.temperature("image", "image_aug").set_value(paddle.to_tensor([-1.0]))
    scales = m.logit_scales(FOUR_VIEWS[:2], max_logit_scale=math.log(100))
    assert scales["image-text"].item() == pytest.approx(100.0, rel=1e-5)  # clipped before the clamp
    assert scales["image-image_aug"].item() == pytest.approx(1.0)
    m.clamp_temperatures_(math.log(100))
    assert m.contrastive_loss_mm.temperature_b.item() == pytest.approx(math.log(100), rel=1e-6)
    assert m.temperature("image", "image_aug").item() == 0.0
    m.contrastive_loss_mm.temperature_b.set_value(paddle.to_tensor([3.0]))
    m.clamp_temperatures_(math.log(100))
    assert m.contrastive_loss_mm.temperature_b.item() == 3.0
    # at exactly the bound the gradient still passes (else the temperature would be stuck)
    m.contrastive_loss_mm.temperature_b.set_value(paddle.to_tensor([math.log(100)]))
    (m.logit_scales([("image", "text")], math.log(100))["image-text"] * 2.0).sum().backward()
    assert m.contrastive_loss_mm.temperature_b.grad.item() != 0.0


# ------------------------------------------------------------------------------ checkpoints
def test_inference_load_drops_train_heads_with_one_log_line(tmp_path, caplog):
    src = tiny_model(1)
    src.add_temperatures(FOUR_VIEWS)
    path = save(numpy_state(src), tmp_path / "trained.pdparams")
    dst = tiny_model(2)
    with caplog.at_level("INFO", logger="ernievil2"):
        info = load_checkpoint(dst, path)
    assert sorted(info["dropped"]) == sorted(HEADS)
    assert sum("training-only" in r.getMessage() for r in caplog.records) == 1
    x = paddle.randn([2, 3, 32, 32])
    np.testing.assert_array_equal(src.encode_image(x).numpy(), dst.encode_image(x).numpy())


def test_training_load_initialises_missing_heads_and_loads_present_ones(tmp_path):
    src = tiny_model(1)
    src.add_temperatures(FOUR_VIEWS[:2])
    src.temperature("image", "image_aug").set_value(paddle.to_tensor([1.25]))
    path = save(numpy_state(src), tmp_path / "ckpt.pdparams")
    dst = tiny_model(2)
    dst.add_temperatures(FOUR_VIEWS)
    info = load_checkpoint(dst, path, training=True)
    assert info["initialised"] == sorted(HEADS[1:])
    assert dst.temperature("image", "image_aug").item() == 1.25
    with pytest.raises(CheckpointError, match="missing"):  # only training tolerates missing heads
        load_checkpoint(dst, path)


def test_convert_to_official_or_paddlenlp_drops_train_heads(tmp_path):
    m = tiny_model()
    m.add_temperatures(FOUR_VIEWS)
    src = save(numpy_state(m), tmp_path / "trained.pdparams")
    official = set(tiny_model().state_dict())
    for to in ("official", "paddlenlp"):
        convert_checkpoint(src, str(tmp_path / f"{to}.pdparams"), to)
    assert set(read_state_dict(str(tmp_path / "official.pdparams"))) == official
    back = tmp_path / "back.pdparams"
    convert_checkpoint(str(tmp_path / "paddlenlp.pdparams"), str(back), "official")
    assert set(read_state_dict(str(back))) == official


# ------------------------------------------------------------------------ init_logit_scale rules
def tiny_train_config(tmp_path, *overrides):
    return load_train_config(None, [
        ("image_model", dict(TINY_VIT)), ("views", FOUR_VIEWS[:2]),
        ("text_model_config", write_json(tmp_path / "ernie.json", TINY_ERNIE)), *overrides])


def checkpoint_with(tmp_path, temperature_b, heads=None):
    sd = numpy_state(tiny_model(5))
    sd["contrastive_loss_mm.temperature_b"] = np.array([temperature_b], np.float32)
    for name, v in (heads or {}).items():
        sd[temperature_name(*name.split("__"))] = np.array([v], np.float32)
    return save(sd, tmp_path / "ckpt.pdparams")


def test_random_start_uses_init_logit_scale_default_or_set(tmp_path):
    m = build_model(tiny_train_config(tmp_path))
    assert m.contrastive_loss_mm.temperature_b.item() == pytest.approx(OFFICIAL_TEMPERATURE_B)
    assert m.temperature("image", "image_aug").item() == pytest.approx(OFFICIAL_TEMPERATURE_B)
    m = build_model(tiny_train_config(tmp_path, "init_logit_scale=3"))
    assert m.contrastive_loss_mm.temperature_b.item() == pytest.approx(3.0)
    assert m.temperature("image", "image_aug").item() == pytest.approx(3.0)


def test_checkpoint_temperatures_are_kept_unless_init_logit_scale_is_set(tmp_path):
    path = checkpoint_with(tmp_path, 4.0, {"image__image_aug": 1.5})
    m = build_model(tiny_train_config(tmp_path, f"init_from_params={path}",
                                      ("views", FOUR_VIEWS[:3])))
    assert m.contrastive_loss_mm.temperature_b.item() == pytest.approx(4.0)
    assert m.temperature("image", "image_aug").item() == pytest.approx(1.5)
    # the checkpoint lacks text-text_aug: a random start for that one
    assert m.temperature("text", "text_aug").item() == pytest.approx(OFFICIAL_TEMPERATURE_B)
    m = build_model(tiny_train_config(tmp_path, f"init_from_params={path}", "init_logit_scale=2.0"))
    assert m.contrastive_loss_mm.temperature_b.item() == pytest.approx(2.0)
    assert m.temperature("image", "image_aug").item() == pytest.approx(2.0)


@pytest.mark.slow
def test_fine_tuning_at_lr_0_keeps_the_checkpoint_temperature(tmp_path):
    """The reported bug: init_from_params with temperature_b 4.0, 2 steps at lr=0 (an int on the
    override line) ended with 2.65926."""
    path, cfg = train_config(tmp_path, max_steps=2)
    ckpt = checkpoint_with(tmp_path, 4.0)
    r = subprocess.run(cmd(path, "lr=0", f"init_from_params={ckpt}"), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    final = read_state_dict(os.path.join(cfg["output_dir"], "final", "model.pdparams"))
    assert value(final, "contrastive_loss_mm.temperature_b") == pytest.approx(4.0)
    step = read_state_dict(os.path.join(cfg["output_dir"], "checkpoints", "step_00000002",
                                        "model.pdparams"))
    assert value(step, "contrastive_loss_mm.temperature_b") == pytest.approx(4.0)
    for name in HEADS:  # the checkpoint has none: they start at the official value
        assert value(step, name) == pytest.approx(OFFICIAL_TEMPERATURE_B, rel=1e-6)


# ------------------------------------------------------------- 4 views -> run_infer.sh anywhere
@pytest.mark.slow
def test_four_view_training_gives_an_inference_model_run_infer_uses_from_any_directory(tmp_path):
    path, cfg = train_config(tmp_path / "run", max_steps=2)
    work = tmp_path / "run"
    # paths as a user writes them: relative to the directory the command runs in
    rel = {k: os.path.relpath(cfg[k], work) for k in ("vocab_file", "text_model_config",
                                                      "train_file", "output_dir", "log_dir")}
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump({**cfg, **rel, "views": FOUR_VIEWS, "output_file": "emb/out.txt"}, f,
                       allow_unicode=True)
    r = subprocess.run(cmd(path), capture_output=True, text=True, timeout=600, cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    final = work / rel["output_dir"] / "final"
    infer_cfg = yaml.safe_load((final / "infer.yaml").read_text(encoding="utf-8"))
    for k in ("vocab_file", "text_model_config", "init_from_params", "output_file", "log_dir"):
        assert os.path.isabs(infer_cfg[k]), (k, infer_cfg[k])
    model = create_model(load_infer_config(str(final / "infer.yaml")), load_weights=False)
    assert set(read_state_dict(str(final / "model.pdparams"))) == set(model.state_dict())
    step_model = work / rel["output_dir"] / "checkpoints" / "step_00000002" / "model.pdparams"
    assert set(HEADS) <= set(read_state_dict(str(step_model)))  # training checkpoints keep them

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    test_file = write_tsv(tmp_path / "test.tsv", [(f"红色{i}", f"img{i}", i) for i in range(5)])
    for weights in (final / "model.pdparams", step_model):
        r = subprocess.run(["bash", str(ROOT / "run_infer.sh"), "0", str(final / "infer.yaml"),
                            f"test_file={test_file}", f"init_from_params={weights}"],
                           capture_output=True, text=True, timeout=600, cwd=elsewhere)
        assert r.returncode == 0, r.stderr[-3000:]
        assert ("training-only" in r.stderr) == (weights == step_model)
    out = work / "emb" / "out.txt"
    assert out.is_file() and len(out.read_text(encoding="utf-8").splitlines()) == 5


# --------------------------------------------------------------------- checkpoints of old layout
def to_old_layout(step_dir, head_names=()):
    """Rewrite a step directory as the code before this change wrote it: view-pair temperatures in
    loss.pdparams (`temperature_<a>__<b>`), Paddle's optimizer state alone, keyed by the tensor
    names that process generated (its loss layer's tensors: multi_view_contrastive_loss_0.w_<i>)."""
    model = paddle.load(os.path.join(step_dir, "model.pdparams"))
    loss = {n[len("train_heads."):]: model.pop(n) for n in list(model) if n.startswith("train_heads.")}
    assert sorted(loss) == sorted(h[len("train_heads."):] for h in head_names)
    paddle.save(model, os.path.join(step_dir, "model.pdparams"))
    paddle.save(loss, os.path.join(step_dir, "loss.pdparams"))
    opt = paddle.load(os.path.join(step_dir, "optimizer.pdopt"))
    names = opt.pop("param_names")
    old = {internal: f"multi_view_contrastive_loss_0.w_{i}"
           for i, internal in enumerate(k for k, n in names.items() if n in head_names)}
    renamed = {}
    for key, v in opt.items():
        internal = next((k for k in old if key.startswith(k + "_")), None)
        renamed[old[internal] + key[len(internal):] if internal else key] = v
    paddle.save(renamed, os.path.join(step_dir, "optimizer.pdopt"))


@pytest.mark.slow
def test_old_layout_image_text_checkpoint_resumes_exactly(tmp_path):
    over = dict(max_steps=4, save_every=2, views=[["image", "text", 1.0]])
    full_path, full = train_config(tmp_path / "full", **over)
    subprocess.run(cmd(full_path), check=True, capture_output=True, timeout=600)
    path, cfg = train_config(tmp_path / "old", **over)
    step2 = os.path.join(cfg["output_dir"], "checkpoints", "step_00000002")
    shutil.copytree(os.path.join(full["output_dir"], "checkpoints", "step_00000002"), step2)
    to_old_layout(step2)
    r = subprocess.run(cmd(path, "resume=auto"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ref, got = losses(full["output_dir"]), losses(cfg["output_dir"])
    assert sorted(got) == [3, 4]
    for s in (3, 4):
        assert abs(got[s] - ref[s]) <= 1e-6, (s, got[s], ref[s])


@pytest.mark.slow
def test_old_layout_checkpoint_with_view_pair_temperatures_says_what_to_do(tmp_path):
    over = dict(max_steps=2, save_every=2, views=FOUR_VIEWS[:2])
    path, cfg = train_config(tmp_path, **over)
    subprocess.run(cmd(path), check=True, capture_output=True, timeout=600)
    step2 = os.path.join(cfg["output_dir"], "checkpoints", "step_00000002")
    to_old_layout(step2, HEADS[:1])
    r = subprocess.run(cmd(path, f"resume={step2}", "max_steps=3"), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    weights = os.path.join(step2, "model.pdparams")
    assert last.startswith(f"error: {step2}: ") and f"init_from_params={weights}" in last
    # and what it says works
    r = subprocess.run(cmd(path, f"init_from_params={weights}", "max_steps=1",
                           f"output_dir={tmp_path / 'again'}"), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

"""A user's path through training: one output_dir per run, resume only with the same model and
batch configuration and process count, one-line errors for broken inputs, Ctrl-C saves a
checkpoint, the time estimate, timed checkpoints, and which initial weights win."""
import logging
import os
import pickle
import signal
import subprocess
import time
from types import SimpleNamespace

import numpy as np
import paddle
import pytest

from conftest import ROOT
from ernievil2.checkpoint import CheckpointError, UnreadableCheckpoint, read_state_dict
from ernievil2.cli import load_train_config
from ernievil2.config import ConfigError
from ernievil2.factory import build_dual_encoder
from ernievil2.models.ernie import load_ernie_config
from ernievil2.tokenizer import ErnieTokenizer
from ernievil2.train import loop, runs
from ernievil2.train.validate import validate
from ernievil2.transforms import make_eval_transform
from helpers import TINY_ERNIE, TINY_VIT, write_json, write_tsv, write_vocab
from test_train_resume import cmd, losses, train_config

pytestmark = pytest.mark.slow


def run(path, *over, timeout=600):
    return subprocess.run(cmd(path, *over), capture_output=True, text=True, timeout=timeout)


def one_line_error(r):
    """The run failed with exactly one `error:` line and no traceback; returns that line."""
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    return errors[0]


def checkpoints(out_dir):
    folder = os.path.join(out_dir, "checkpoints")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


# ------------------------------------------------------------------------- 1. one run per folder
def test_a_used_output_dir_is_refused_unless_resume_or_overwrite(tmp_path):
    path, cfg = train_config(tmp_path, max_steps=4, save_every=2, keep_last=5)
    assert run(path).returncode == 0
    before = losses(cfg["output_dir"])
    line = one_line_error(run(path, "max_steps=2"))
    assert cfg["output_dir"] in line and "resume=auto" in line and "overwrite=true" in line
    assert losses(cfg["output_dir"]) == before  # nothing written by the refused run
    assert "exclude" in one_line_error(run(path, "overwrite=true", "resume=auto"))
    # overwrite empties the folder: only the new run's checkpoints and log lines remain
    r = run(path, "overwrite=true", "max_steps=3", "save_every=3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert checkpoints(cfg["output_dir"]) == ["step_00000003"]
    assert sorted(losses(cfg["output_dir"])) == [1, 2, 3]
    lines = open(os.path.join(cfg["output_dir"], "train.jsonl"), encoding="utf-8").read().splitlines()
    assert len(lines) == 3


def test_resume_refuses_another_model_or_batch_and_names_the_keys(tmp_path):
    path, cfg = train_config(tmp_path, max_steps=2, save_every=2)
    assert run(path).returncode == 0
    line = one_line_error(run(path, "resume=auto", "max_steps=4", "batch_size=4", "lr=0.002"))
    assert "batch_size: checkpoint 8, this run 4" in line
    assert "lr" not in line.split("(")[1].split(")")[0]  # not a model or batch key: may change
    assert "init_from_params=" in line
    wider = write_json(tmp_path / "wider.json", {**TINY_ERNIE, "num_hidden_layers": 3})
    line = one_line_error(run(path, "resume=auto", "max_steps=4", f"text_model_config={wider}"))
    assert "text_model_config" in line and "batch_size" not in line


def test_resume_with_another_process_count_says_how_to_proceed(tmp_path):
    path, cfg = train_config(tmp_path, max_steps=2, save_every=2)
    assert run(path).returncode == 0
    state_file = os.path.join(cfg["output_dir"], "checkpoints", "step_00000002", "state.pkl")
    with open(state_file, "rb") as f:
        state = pickle.load(f)
    with open(state_file, "wb") as f:  # as a 2-process run would have written it
        pickle.dump({**state, "world_size": 2}, f)
    line = one_line_error(run(path, "resume=auto", "max_steps=4"))
    assert "2 process" in line and "this run has 1" in line
    assert "init_from_params=" in line and "2 device" in line


# ------------------------------------------------------------------------- 2. one-line errors
def test_unreadable_checkpoint_files_name_the_file(tmp_path):
    paddle.save({"a": paddle.ones([64, 64])}, str(tmp_path / "ok.pdparams"))
    data = (tmp_path / "ok.pdparams").read_bytes()
    (tmp_path / "empty.pdparams").write_bytes(b"")
    (tmp_path / "cut.pdparams").write_bytes(data[: len(data) // 2])
    np.savez(tmp_path / "emb.npz", a=np.ones(3))
    for name, kind, words in (("empty.pdparams", UnreadableCheckpoint, "0 bytes"),
                              ("cut.pdparams", UnreadableCheckpoint, "truncated"),
                              ("emb.npz", CheckpointError, ".npz")):
        with pytest.raises(kind, match=words) as e:
            read_state_dict(str(tmp_path / name))
        assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value)
    run_dir = tmp_path / "run"
    (run_dir / "final").mkdir(parents=True)
    paddle.save({"a": paddle.ones([2])}, str(run_dir / "final" / "model.pdparams"))
    with pytest.raises(CheckpointError, match="is a directory") as e:
        read_state_dict(str(run_dir))
    assert str(run_dir / "final" / "model.pdparams") in str(e.value)


def test_broken_init_from_params_is_one_line_in_a_run(tmp_path):
    path, _ = train_config(tmp_path, max_steps=1)
    (tmp_path / "empty.pdparams").write_bytes(b"")
    line = one_line_error(run(path, f"init_from_params={tmp_path / 'empty.pdparams'}"))
    assert "empty.pdparams" in line and "0 bytes" in line
    line = one_line_error(run(path, f"init_from_params={tmp_path}"))
    assert "is a directory" in line


def test_ernie_json_missing_a_key_is_a_config_error_naming_the_file(tmp_path):
    bad = write_json(tmp_path / "bad.json", {k: v for k, v in TINY_ERNIE.items() if k != "vocab_size"})
    with pytest.raises(ConfigError, match="vocab_size") as e:
        load_ernie_config(bad)
    assert bad in str(e.value)
    with pytest.raises(ConfigError, match="_source"):
        load_ernie_config(write_json(tmp_path / "old.json", {**TINY_ERNIE, "_source": "x"}))
    path, _ = train_config(tmp_path / "run", max_steps=1)
    line = one_line_error(run(path, f"text_model_config={bad}"))
    assert bad in line and "vocab_size" in line


def test_empty_val_file_stops_before_training(tmp_path):
    (tmp_path / "val.tsv").write_text("", encoding="utf-8")
    path, cfg = train_config(tmp_path, max_steps=2, val_file=str(tmp_path / "val.tsv"))
    line = one_line_error(run(path))
    assert "val.tsv" in line and "no validation lines" in line
    assert checkpoints(cfg["output_dir"]) == []
    assert not os.path.exists(os.path.join(cfg["output_dir"], "train.jsonl"))


def test_batch_size_over_the_training_lines_is_capped_with_a_message(tmp_path):
    path, cfg = train_config(tmp_path, max_steps=2, save_every=2, batch_size=100)
    r = run(path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "batch_size 100 is larger than the 24 training lines" in r.stderr
    assert os.path.isfile(os.path.join(cfg["output_dir"], "final", "model.pdparams"))


def test_truncated_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
    full_path, full = train_config(tmp_path / "full", max_steps=6, save_every=2, keep_last=5)
    assert run(full_path).returncode == 0
    path, cfg = train_config(tmp_path / "cut", max_steps=6, save_every=2, keep_last=5)
    assert run(path, "max_steps=4").returncode == 0
    newest = os.path.join(cfg["output_dir"], "checkpoints", "step_00000004")
    assert os.path.isfile(os.path.join(newest, "COMPLETE"))
    model_file = os.path.join(newest, "model.pdparams")
    data = open(model_file, "rb").read()
    with open(model_file, "wb") as f:
        f.write(data[: len(data) // 3])
    r = run(path, "resume=auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "falling back to" in r.stderr and "step_00000002" in r.stderr
    ref, got = losses(full["output_dir"]), losses(cfg["output_dir"])
    for step in (3, 4, 5, 6):  # re-run from step 2: the same steps as the uninterrupted run
        assert abs(got[step] - ref[step]) <= 1e-6, (step, got[step], ref[step])


def test_ctrl_c_saves_a_checkpoint_and_resume_continues_exactly(tmp_path):
    full_path, full = train_config(tmp_path / "full", max_steps=8, save_every=100)
    assert run(full_path).returncode == 0
    ref = losses(full["output_dir"])
    path, cfg = train_config(tmp_path / "stopped", max_steps=8, save_every=100)
    proc = subprocess.Popen(cmd(path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log_file = os.path.join(cfg["output_dir"], "train.jsonl")
    deadline = time.time() + 300
    while not os.path.exists(log_file) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    saved = checkpoints(cfg["output_dir"])
    assert len(saved) == 1, saved
    stopped_at = int(saved[0].split("_")[1])
    assert stopped_at < 8, "the run finished before the signal"
    assert f"interrupted (SIGINT) at step {stopped_at}" in err and "resume=auto" in err
    r = run(path, "resume=auto")
    assert r.returncode == 0, r.stderr[-3000:]
    got = losses(cfg["output_dir"])
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert abs(got[step] - ref[step]) <= 1e-6, (step, got[step], ref[step])


# ------------------------------------------------------------------ 3. best by the pessimistic
class Collapsed(paddle.nn.Layer):
    """Towers whose output is the same vector for every input."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.embed_dim = 8

    def encode_image(self, x):
        return paddle.ones([x.shape[0], 8])

    def encode_text(self, x):
        return paddle.ones([x.shape[0], 8])


def test_collapsed_embeddings_never_become_the_best_checkpoint(tmp_path):
    paddle.seed(0)
    model = build_dual_encoder(dict(TINY_VIT), dict(TINY_ERNIE))
    tok = ErnieTokenizer.from_file(write_vocab(tmp_path / "v.txt"), max_seq_len=16)
    val = write_tsv(tmp_path / "val.tsv", [("红色的圆形" if i % 2 else "a red circle", f"img{i}", i)
                                            for i in range(24)])

    def score(m):
        return validate(m, val, make_eval_transform(32), lambda t: tok.batch_encode(t, padding="longest"),
                        batch_size=8, num_workers=0)

    real, collapsed = score(model), score(Collapsed(model))
    # the trap: counted in the query's favour, ties make the collapsed model perfect
    assert collapsed["multi_caption"]["MeanRecall"]["meanRecall"] == 100
    assert collapsed["multi_caption_pessimistic"]["MeanRecall"]["meanRecall"] == 0
    assert real["multi_caption_pessimistic"]["MeanRecall"]["meanRecall"] > 0
    state = SimpleNamespace(best={"step": None, "score": -1.0}, step=1)
    loop.update_best(state, real)
    state.step = 2
    loop.update_best(state, collapsed)
    assert state.best["step"] == 1
    assert "pessimistic 0.00" in loop.both_figures(collapsed, "multi_caption")


# ---------------------------------------------------- 4. estimate and checkpoints by the clock
def test_the_run_prints_its_time_estimate(tmp_path):
    path, _ = train_config(tmp_path, max_steps=3, save_every=100)
    r = run(path)
    assert r.returncode == 0, r.stderr[-3000:]
    estimates = [line for line in r.stderr.splitlines() if "step time" in line]
    assert len(estimates) == 1 and "peak memory" in estimates[0]
    assert "max_steps 3 will take" in estimates[0]
    assert "CPU recipe" not in estimates[0]  # a tiny model


def test_the_cpu_recipe_hint_is_for_large_models_on_a_cpu(monkeypatch, caplog):
    paddle.seed(0)
    model = build_dual_encoder(dict(TINY_VIT), dict(TINY_ERNIE))
    state = SimpleNamespace(cfg=SimpleNamespace(max_steps=100), step=2, device="cpu", model=model)
    caplog.set_level(logging.INFO, logger="ernievil2.train")
    monkeypatch.setattr(logging.getLogger("ernievil2"), "propagate", True)
    for threshold, device, hint in ((10**12, "cpu", False), (1, "cpu", True), (1, "gpu", False)):
        if device == "gpu" and not paddle.device.is_compiled_with_cuda():
            monkeypatch.setattr(runs, "peak_memory_gb", lambda device: 1.0)
        monkeypatch.setattr(runs, "CPU_HINT_PARAMETERS", threshold)
        state.device = device
        caplog.clear()
        runs.log_estimate(state, 36.0)
        assert "max_steps 100 will take about 0 h 59 min (98 steps left)" in caplog.text
        assert ("flickr8k_cn_lite0.yaml" in caplog.text) == hint


def test_timed_checkpoints_on_two_processes(tmp_path):
    path, cfg = train_config(tmp_path, max_steps=3, save_every=1000, keep_last=10,
                             save_every_minutes=0.0001)
    env = {**os.environ, "LAUNCH_LOG_DIR": str(tmp_path / "launch")}
    r = subprocess.run(["bash", str(ROOT / "run_train.sh"), "0,1", path], capture_output=True,
                       text=True, timeout=900, env=env, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr[-3000:]
    saved = checkpoints(cfg["output_dir"])
    assert "step_00000001" in saved and "step_00000002" in saved  # save_every=1000: by the clock
    for name in saved:
        folder = os.path.join(cfg["output_dir"], "checkpoints", name)
        assert {"COMPLETE", "rng_rank0.pkl", "rng_rank1.pkl"} <= set(os.listdir(folder))


def test_save_every_minutes_is_off_by_default(tmp_path):
    assert load_train_config(None, [])["save_every_minutes"] == 0
    path, cfg = train_config(tmp_path, max_steps=3, save_every=1000, keep_last=10)
    assert run(path).returncode == 0
    assert checkpoints(cfg["output_dir"]) == ["step_00000003"]  # only the last step's


# ------------------------------------------------------- 5. init_from_params vs init_image_tower
def test_init_image_tower_wins_over_init_from_params_for_the_image_tower(tmp_path, caplog):
    def saved(seed, name):
        paddle.seed(seed)
        m = build_dual_encoder(dict(TINY_VIT), dict(TINY_ERNIE))
        sd = {k: v.numpy() for k, v in m.state_dict().items()}
        paddle.save(sd, str(tmp_path / name))
        return str(tmp_path / name), sd

    full_path, full = saved(1, "full.pdparams")
    tower_path, tower = saved(2, "tower.pdparams")
    tower_path_only = str(tmp_path / "visual.pdparams")
    paddle.save({k: v for k, v in tower.items() if k.startswith("visual.")}, tower_path_only)
    cfg = load_train_config(None, [
        ("image_model", dict(TINY_VIT)), ("views", [["image", "text", 1.0]]),
        ("text_model_config", write_json(tmp_path / "ernie.json", TINY_ERNIE)),
        ("init_from_params", full_path), ("init_image_tower", tower_path_only)])
    caplog.set_level(logging.WARNING, logger="ernievil2.train")
    logging.getLogger("ernievil2").propagate = True
    model = loop.build_model(cfg)
    got = {k: v.numpy() for k, v in model.state_dict().items()}
    vis = [k for k in got if k.startswith("visual.")]
    assert vis and all(np.array_equal(got[k], tower[k]) for k in vis)
    assert not np.array_equal(tower[vis[0]], full[vis[0]])
    text = [k for k in got if k.startswith("text_model.")]
    assert all(np.array_equal(got[k], full[k]) for k in text)
    assert "image tower comes from init_image_tower" in caplog.text

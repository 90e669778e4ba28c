"""run_train end to end on tiny towers: it learns, and a killed run resumes exactly."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import ROOT
from helpers import TINY_ERNIE, TINY_VIT, make_image, tsv_line, write_json, write_vocab

pytestmark = pytest.mark.slow


def train_config(tmp_path, **over):
    tmp_path.mkdir(parents=True, exist_ok=True)
    lines = []
    words = ["红色", "绿色", "蓝色", "黄色"]
    for i in range(24):
        text = f"{words[i % 4]}的圆形"
        lines.append(tsv_line(text, f"img{i}", make_image(i, 24, 24)) + f"\t{words[i % 4]}")
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = {
        "device": "cpu", "max_text_seqlen": 16, "vocab_file": write_vocab(tmp_path / "vocab.txt"),
        "text_model_config": write_json(tmp_path / "ernie.json", TINY_ERNIE),
        "image_model": dict(TINY_VIT), "train_file": str(tmp_path / "train.tsv"),
        "output_dir": str(tmp_path / "out"), "log_dir": str(tmp_path / "out"),
        "batch_size": 8, "max_steps": 10, "lr": 1e-3, "warmup_steps": 2, "save_every": 2,
        "log_every": 1, "val_every": 1000, "num_workers": 0,
        "views": [["image", "text", 1.0], ["image", "image_aug", 0.5], ["text", "text_aug", 0.5],
                  ["image", "tags", 0.5]],
    }
    cfg.update(over)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return str(path), cfg


def losses(out_dir):
    by_step = {}
    for line in open(os.path.join(out_dir, "train.jsonl"), encoding="utf-8"):
        rec = json.loads(line)
        if "loss" in rec:
            by_step[rec["step"]] = rec["loss"]  # a resumed run re-logs steps after its checkpoint
    return by_step


def cmd(path, *over):
    return [sys.executable, str(ROOT / "run_train.py"), path, *over]


def test_killed_run_resumes_with_the_same_losses(tmp_path):
    full_path, full = train_config(tmp_path / "full")
    subprocess.run(cmd(full_path), check=True, capture_output=True, timeout=600)
    ref = losses(full["output_dir"])
    assert sorted(ref) == list(range(1, 11))

    path, cfg = train_config(tmp_path / "killed")
    proc = subprocess.Popen(cmd(path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt4 = os.path.join(cfg["output_dir"], "checkpoints", "step_00000004", "COMPLETE")
    deadline = time.time() + 300
    while not os.path.exists(ckpt4) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.exists(ckpt4), "the run never reached its step-4 checkpoint"
    done = max(losses(cfg["output_dir"]))
    assert done < 10, "the run finished before it could be killed"
    subprocess.run(cmd(path, "resume=auto"), check=True, capture_output=True, timeout=600)
    got = losses(cfg["output_dir"])
    assert sorted(got) == list(range(1, 11))
    for step in range(1, 11):
        assert abs(got[step] - ref[step]) <= 1e-6, (step, got[step], ref[step])
    # the final model is an inference checkpoint with its config
    final = os.path.join(cfg["output_dir"], "final")
    assert os.path.isfile(os.path.join(final, "model.pdparams"))
    assert yaml.safe_load(open(os.path.join(final, "infer.yaml")))["init_from_params"].endswith("model.pdparams")
    # only the last keep_last=2 checkpoints are kept
    kept = sorted(os.listdir(os.path.join(cfg["output_dir"], "checkpoints")))
    assert kept == ["step_00000008", "step_00000010"]


def test_gradcache_accumulation_trains_like_the_full_batch(tmp_path):
    """micro_batch_size 2 x 4 and the whole batch of 8 give the same losses when nothing is
    random inside the towers (dropout off), i.e. all negatives are kept."""
    over = dict(max_steps=3, save_every=100)
    ernie = {**TINY_ERNIE, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    a_path, a = train_config(tmp_path / "a", **over)
    b_path, b = train_config(tmp_path / "b", micro_batch_size=2, **over)
    for p, c in ((a_path, a), (b_path, b)):
        write_json(type(tmp_path)(c["text_model_config"]), ernie)
        subprocess.run(cmd(p), check=True, capture_output=True, timeout=600)
    la, lb = losses(a["output_dir"]), losses(b["output_dir"])
    for s in (1, 2, 3):
        assert abs(la[s] - lb[s]) < 1e-5, (s, la[s], lb[s])

"""User mistakes end in one line (`error: ...` or `interrupted ...`), never a traceback."""
import os
import signal
import subprocess
import sys
import time

import yaml

from conftest import ROOT
from helpers import TINY_ERNIE, tiny_config, tsv_line, make_image, write_json, write_vocab

PY = sys.executable


def _write(tmp_path, cfg):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return str(path)


def _one_line_error(r, *needles):
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_unknown_image_model_in_a_tool_is_one_line(tmp_path):
    path = _write(tmp_path, tiny_config(tmp_path, image_model="vit_b99"))
    r = subprocess.run([PY, str(ROOT / "tools" / "model_info.py"), path], capture_output=True,
                       text=True, timeout=300)
    _one_line_error(r, "unknown image_model", "vit_b99")


def test_vocab_larger_than_the_text_tower_at_inference_is_one_line(tmp_path):
    big = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"] + [f"w{i}" for i in range(200)]
    cfg = tiny_config(tmp_path, vocab_file=write_vocab(tmp_path / "big_vocab.txt", big),
                      text_model_config=write_json(tmp_path / "ernie.json", TINY_ERNIE))
    path = _write(tmp_path, cfg)
    r = subprocess.run(["bash", str(ROOT / "run_infer.sh"), "0", path], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    _one_line_error(r, "big_vocab.txt", "64")
    assert not os.path.exists(cfg["output_file"])


def test_ctrl_c_during_inference_is_one_line_and_leaves_no_output(tmp_path):
    rows = "\n".join(tsv_line(f"caption {i}", f"img{i}", make_image(i % 50, 64, 64))
                     for i in range(3000)) + "\n"
    (tmp_path / "big.tsv").write_text(rows, encoding="utf-8")
    cfg = tiny_config(tmp_path, test_file=str(tmp_path / "big.tsv"), infer_batch_size=8)
    path = _write(tmp_path, cfg)
    log = tmp_path / "log" / "infer.log"
    proc = subprocess.Popen([PY, "-m", "ernievil2.cli", "infer", path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "packages")})
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and "device" in log.read_text(encoding="utf-8", errors="replace"):
            break
        time.sleep(0.1)
    time.sleep(0.5)  # inside the embedding loop
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert "interrupted" in err
    assert not os.path.exists(cfg["output_file"])

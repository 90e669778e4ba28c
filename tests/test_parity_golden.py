"""Parity with the official ERNIE-ViL 2.0 code, against its own outputs in ../shared/golden.

The weights are made once per test session with the official helper make_weights.py; the whole
run_infer path (reader, tokenizer, preprocessing, model, writer) must reproduce the official
output within 1e-5 per value, with one process and with two.
"""
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import GOLDEN, ROOT, need_shared
from ernievil2.cli import load_infer_config as load_config
from ernievil2.engine.infer import run
from ernievil2.embeddings import read_embeddings

pytestmark = pytest.mark.shared


def _weights(tmp_path_factory, keys, seed, name):
    need_shared("golden", keys)
    out = tmp_path_factory.mktemp("golden_weights") / name
    subprocess.run([sys.executable, str(GOLDEN / "make_weights.py"), str(GOLDEN / keys), str(seed),
                    str(out)], check=True, capture_output=True)
    return str(out)


@pytest.fixture(scope="session")
def official_weights(tmp_path_factory):
    return _weights(tmp_path_factory, "official_keys_text3.json", 1, "w.pdparams")


@pytest.fixture(scope="session")
def paddlenlp_weights(tmp_path_factory):
    return _weights(tmp_path_factory, "paddlenlp_keys_text3.json", 4, "model_state.pdparams")


def golden_config(tmp_path, weights, **over):
    cfg = {"device": "cpu", "infer_batch_size": 10, "max_text_seqlen": 48,
           "vocab_file": str(need_shared("data", "vocab", "ernie-3.0-base-zh", "vocab.txt")),
           "text_model_config": str(need_shared("golden", "text_config_3layer.json")),
           "test_file": str(need_shared("golden", "set1.tsv")), "init_from_params": weights,
           "output_file": str(tmp_path / "out" / "cross_modal_embeddings.out"),
           "log_dir": str(tmp_path / "log")}
    cfg.update(over)
    path = tmp_path / "golden.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return str(path), cfg


def check_against(out_file, golden_name):
    ref = read_embeddings(str(need_shared("golden", golden_name)))
    got = read_embeddings(out_file)
    assert got.line_numbers.tolist() == list(range(1, 24))
    assert np.abs(got.text - ref.text).max() <= 1e-5
    assert np.abs(got.image - ref.image).max() <= 1e-5


def test_one_process_reproduces_the_official_output(tmp_path, official_weights):
    path, cfg = golden_config(tmp_path, official_weights)
    run(load_config(path))
    check_against(cfg["output_file"], "official_set1.out")


@pytest.mark.slow
def test_two_processes_reproduce_the_official_output(tmp_path, official_weights):
    path, cfg = golden_config(tmp_path, official_weights)
    r = subprocess.run(["bash", str(ROOT / "run_infer.sh"), "0,1", path], capture_output=True,
                       text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable,
                                                     "LAUNCH_LOG_DIR": str(tmp_path / "launch")})
    assert r.returncode == 0, r.stderr[-3000:]
    check_against(cfg["output_file"], "official_set1.out")


def test_paddlenlp_layout_reproduces_the_official_model_output(tmp_path, paddlenlp_weights):
    path, cfg = golden_config(tmp_path, paddlenlp_weights)
    run(load_config(path))
    check_against(cfg["output_file"], "official_set1_from_paddlenlp_seed4.out")
    assert "paddlenlp layout" in (tmp_path / "log" / "infer.log").read_text(encoding="utf-8")

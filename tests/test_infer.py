"""run_infer end to end on tiny random towers: output format, order, sharding, skip policy."""
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import ROOT
from ernievil2.cli import load_infer_config as load_config
from ernievil2.engine.infer import run
from ernievil2.embeddings import read_embeddings
from helpers import make_image, tiny_config, tsv_line


def write_cfg(tmp_path, **over):
    cfg = tiny_config(tmp_path, **over)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return str(path), cfg


def run_in_process(tmp_path, **over):
    path, cfg = write_cfg(tmp_path, **over)
    run(load_config(path))
    return cfg


def test_output_has_one_line_per_input_in_order_with_line_numbers(tmp_path):
    cfg = run_in_process(tmp_path)
    out = cfg["output_file"]
    lines = open(out, encoding="utf-8").read().splitlines()
    assert len(lines) == 8
    cols = [l.split("\t") for l in lines]
    assert all(len(c) == 3 for c in cols)
    assert [int(c[2]) for c in cols] == list(range(1, 9))
    emb = read_embeddings(out)
    assert emb.text.shape == (8, 64) and emb.image.shape == (8, 64)
    np.testing.assert_allclose(np.linalg.norm(emb.text, axis=1), 1, atol=1e-5)
    assert not list((tmp_path / "out").glob("*.part*"))  # parts merged and removed


def test_padding_to_longest_gives_the_official_max_length_output(tmp_path):
    a = read_embeddings(run_in_process(tmp_path / "a", text_padding="longest")["output_file"])
    b = read_embeddings(run_in_process(tmp_path / "b", text_padding="max_length")["output_file"])
    np.testing.assert_allclose(a.text, b.text, atol=1e-5)
    np.testing.assert_array_equal(a.image, b.image)


def test_worker_threads_give_the_same_output(tmp_path):
    a = read_embeddings(run_in_process(tmp_path / "a", num_workers=0)["output_file"])
    b = read_embeddings(run_in_process(tmp_path / "b", num_workers=2)["output_file"])
    np.testing.assert_array_equal(a.text, b.text)
    np.testing.assert_array_equal(a.image, b.image)


def _add_bad_line(cfg_path, cfg):
    lines = open(cfg["test_file"], encoding="utf-8").read().splitlines()
    lines.insert(3, "a broken line\tid\tnot*base64")  # becomes line 4
    open(cfg["test_file"], "w", encoding="utf-8").write("\n".join(lines) + "\n")


def test_bad_line_stops_with_file_and_line_and_leaves_no_output(tmp_path):
    path, cfg = write_cfg(tmp_path)
    _add_bad_line(path, cfg)
    with pytest.raises(ValueError, match=r"test\.tsv:4: "):
        run(load_config(path))
    assert not (tmp_path / "out" / "emb.out").exists()


def test_skip_bad_lines_keeps_alignment_by_line_number(tmp_path):
    path, cfg = write_cfg(tmp_path, skip_bad_lines=True)
    _add_bad_line(path, cfg)
    run(load_config(path))
    emb = read_embeddings(cfg["output_file"])
    assert emb.line_numbers.tolist() == [1, 2, 3, 5, 6, 7, 8, 9]


def test_unknown_config_key_is_an_error_naming_it(tmp_path):
    path, _ = write_cfg(tmp_path)
    with pytest.raises(ValueError, match="infer_batchsize"):
        load_config(path, ["infer_batchsize=4"])


def test_run_infer_sh_single_process_cli(tmp_path):
    path, cfg = write_cfg(tmp_path)
    r = subprocess.run(["bash", str(ROOT / "run_infer.sh"), "0", path, "infer_batch_size=5"],
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin",
                                                            "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(read_embeddings(cfg["output_file"]).text) == 8
    assert "infer_batch_size': 5" in open(tmp_path / "log" / "infer.log", encoding="utf-8").read()


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    path1, cfg1 = write_cfg(tmp_path / "one")
    run(load_config(path1))
    path2, cfg2 = write_cfg(tmp_path / "two")
    r = subprocess.run(["bash", str(ROOT / "run_infer.sh"), "0,1", path2],
                       capture_output=True, text=True, cwd=tmp_path,
                       env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable,
                            "LAUNCH_LOG_DIR": str(tmp_path / "launch")})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    a, b = read_embeddings(cfg1["output_file"]), read_embeddings(cfg2["output_file"])
    np.testing.assert_array_equal(a.line_numbers, b.line_numbers)
    np.testing.assert_allclose(a.text, b.text, atol=1e-6)
    np.testing.assert_allclose(a.image, b.image, atol=1e-6)

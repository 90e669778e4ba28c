"""Every fp32 execution mode of run_infer gives the eager embeddings (within 1e-5), on tiny towers.

to_static compiles each tower once with a dynamic batch and text length; inference runs the towers
exported on the fly (into export_dir, or a cache folder named by the config) in Paddle Inference
predictors with oneDNN.
"""
import numpy as np
import pytest

from ernievil2.cli import load_infer_config as load_config
from ernievil2.engine.infer import run
from ernievil2.export import CACHE_ENV, config_fingerprint
from ernievil2.embeddings import read_embeddings
from helpers import tiny_config

ATOL = 1e-5


def run_mode(tmp_path, **over):
    cfg = load_config(None, tiny_config(tmp_path, **over).items())
    run(cfg)
    return read_embeddings(cfg["output_file"]), cfg


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    # batch 3 over 8 lines: a short last batch, and texts of several lengths (padding: longest)
    return run_mode(tmp_path_factory.mktemp("eager"), execution="eager")[0]


def assert_same_embeddings(a, b):
    np.testing.assert_array_equal(a.line_numbers, b.line_numbers)
    np.testing.assert_allclose(a.text, b.text, atol=ATOL, rtol=0)
    np.testing.assert_allclose(a.image, b.image, atol=ATOL, rtol=0)


def test_to_static_matches_eager(tmp_path, eager):
    out, _ = run_mode(tmp_path, execution="to_static")
    assert_same_embeddings(out, eager)


def test_to_static_with_max_length_padding_matches_eager(tmp_path, eager):
    out, _ = run_mode(tmp_path, execution="to_static", text_padding="max_length", num_workers=2)
    assert_same_embeddings(out, eager)


def test_inference_matches_eager_and_reuses_its_export_dir(tmp_path, eager):
    export_dir = tmp_path / "export"
    out, cfg = run_mode(tmp_path / "a", execution="inference", export_dir=str(export_dir))
    assert_same_embeddings(out, eager)
    assert (export_dir / "encoder.json").is_file()
    assert "parameters:" in open(f"{cfg['log_dir']}/infer.log", encoding="utf-8").read()  # built
    out2, cfg = run_mode(tmp_path / "b", execution="inference", export_dir=str(export_dir),
                         infer_batch_size=5, text_padding="max_length")
    log = open(f"{cfg['log_dir']}/infer.log", encoding="utf-8").read()
    assert "using the export in" in log and "parameters:" not in log  # the model was not built
    assert_same_embeddings(out2, eager)


def test_inference_caches_the_export_per_model(tmp_path, eager, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    out, cfg = run_mode(tmp_path / "a", execution="inference")
    assert_same_embeddings(out, eager)
    assert [p.name for p in cache.iterdir()] == [config_fingerprint(cfg)]
    # other weights (another seed) -> another export, not the cached one
    other, cfg2 = run_mode(tmp_path / "b", execution="inference", seed=1)
    assert len(list(cache.iterdir())) == 2
    assert np.abs(other.image - out.image).max() > 1e-3


def test_inference_rejects_an_export_for_another_image_size(tmp_path):
    export_dir = str(tmp_path / "export")
    run_mode(tmp_path / "a", execution="inference", export_dir=export_dir)
    vit48 = dict(tiny_config(tmp_path)["image_model"], image_size=48)
    with pytest.raises(ValueError, match="image_size 32"):
        run_mode(tmp_path / "b", execution="inference", export_dir=export_dir, image_model=vit48)


@pytest.mark.slow
def test_inference_with_two_processes_matches_eager(tmp_path, eager):
    """Rank 0 makes the export while rank 1 waits; both then run it (run_infer.sh 0,1)."""
    import subprocess
    import sys

    import yaml

    from conftest import ROOT
    cfg = tiny_config(tmp_path, execution="inference", export_dir=str(tmp_path / "export"))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    r = subprocess.run(["bash", str(ROOT / "run_infer.sh"), "0,1", str(path)], capture_output=True,
                       text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable,
                                                     "LAUNCH_LOG_DIR": str(tmp_path / "launch")})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert_same_embeddings(read_embeddings(cfg["output_file"]), eager)

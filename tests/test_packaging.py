"""The package installed (not editable, without the network) works from another folder: the shipped
configs are package data found by name, the API snippet embeds an image and a caption, and the
console script runs inference."""
import importlib.util
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT
from ernievil2.embeddings import read_embeddings
from helpers import make_image, write_tsv, write_vocab

SNIPPET = """
import json, sys
import numpy as np, paddle
import ernievil2

model, train_tf, eval_tf, tokenizer = ernievil2.create_model_and_transforms("demo_tiny", vocab_file="vocab.txt")
image = eval_tf(ernievil2.decode_image(open("photo.png", "rb").read()))
with paddle.no_grad():
    img = model.encode_image(paddle.to_tensor(image[None])).numpy()
    txt = model.encode_text(paddle.to_tensor(tokenizer.batch_encode(["a red circle"]))).numpy()
print(json.dumps({"module": ernievil2.__file__, "configs": ernievil2.shipped_run_configs(),
                  "image": img.tolist(), "text": txt.tolist(), "input": list(image.shape)}))
"""


def test_console_scripts_name_existing_functions():
    import importlib
    import tomllib
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"ernievil2-infer", "ernievil2-train", "ernievil2-eval", "ernievil2-download",
                            "ernievil2-zeroshot", "ernievil2-index", "ernievil2-search", "ernievil2-serve"}
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target


def can_build_wheels():
    """pip builds a wheel even for a plain install; setuptools < 70.1 needs the wheel package."""
    if importlib.util.find_spec("wheel"):
        return True
    import setuptools
    return tuple(int(p) for p in setuptools.__version__.split(".")[:2]) >= (70, 1)


def copy_source(dst):
    """What a build needs: the project files and packages/ (no caches, builds or outputs)."""
    dst.mkdir()
    for name in ("pyproject.toml", "setup.py", "readme_en.md"):
        shutil.copy2(ROOT / name, dst / name)
    shutil.copytree(ROOT / "packages", dst / "packages",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    return dst


def make_venv(path):
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path)],
                   check=True, timeout=300)
    if sys.prefix != sys.base_prefix:
        # This interpreter is itself a venv: its packages (paddle, numpy, pip) play the system's.
        purelib = subprocess.run([str(path / "bin" / "python"), "-c",
                                  "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        Path(purelib, "_parent_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return path / "bin"


def test_installed_package_works_from_another_folder(tmp_path):
    if not can_build_wheels():
        pytest.skip("pip cannot build a wheel here: install `wheel` (requirements.txt)")
    src = copy_source(tmp_path / "src")
    bin_dir = make_venv(tmp_path / "venv")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "HOME": str(tmp_path)}
    r = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-deps",
                        "--no-build-isolation", "--no-index", str(src)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for script in ("ernievil2-infer", "ernievil2-train", "ernievil2-eval", "ernievil2-download",
                   "ernievil2-zeroshot", "ernievil2-index", "ernievil2-search", "ernievil2-serve"):
        assert (bin_dir / script).is_file(), script

    work = tmp_path / "elsewhere"
    work.mkdir()
    write_vocab(work / "vocab.txt")
    (work / "photo.png").write_bytes(make_image(3, 50, 70))
    r = subprocess.run([str(bin_dir / "python"), "-c", SNIPPET], capture_output=True, text=True,
                       env=env, cwd=work, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = yaml.safe_load(r.stdout.strip().splitlines()[-1])
    assert Path(out["module"]).is_relative_to(tmp_path / "venv")  # the installed copy ran
    assert "demo_tiny" in out["configs"] and out["input"] == [3, 64, 64]
    img, txt = np.array(out["image"]), np.array(out["text"])
    assert img.shape == txt.shape == (1, 128)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1, atol=1e-5)

    r = subprocess.run([str(bin_dir / "ernievil2-infer"), "--help"], capture_output=True, text=True,
                       env=env, cwd=work)
    assert r.returncode == 0 and "DEVICES" in r.stdout
    write_tsv(work / "test.tsv", [("a red circle", "img0", 0), ("蓝色方块", "img1", 1),
                                  ("a green square", "img2", 2)])
    r = subprocess.run([str(bin_dir / "ernievil2-infer"), "0", "demo_tiny", "vocab_file=vocab.txt",
                        "test_file=test.tsv", "output_file=out/emb.out", "log_dir=log"],
                       capture_output=True, text=True, env=env, cwd=work, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    emb = read_embeddings(str(work / "out" / "emb.out"))
    assert emb.text.shape == emb.image.shape == (3, 128) and emb.line_numbers.tolist() == [1, 2, 3]
    assert not list(work.glob("*.egg-info")) and not (ROOT / "build").exists()
    assert os.path.isfile(work / "log" / "infer.log")

"""Small stand-ins shared by the tests: tiny towers, vocab and TSV files made on the fly."""
import base64
import json

import cv2
import numpy as np

TINY_VIT = {"type": "vit", "image_size": 32, "patch_size": 16, "width": 64, "layers": 2, "heads": 4}
TINY_ERNIE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "vocab_size": 64, "max_position_embeddings": 64, "hidden_dropout_prob": 0.1,
              "attention_probs_dropout_prob": 0.1}

TINY_VOCAB = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"] + list(
    "红绿蓝黄色的圆形方块三角在上下左右一个两") + ["a", "red", "green", "blue", "circle", "square",
                                             "on", "the", "left", "right", "##s", "and", "of"]


def write_json(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return str(path)


def write_vocab(path, tokens=TINY_VOCAB):
    path.write_text("".join(f"{t}\t{i}\n" for i, t in enumerate(tokens)), encoding="utf-8")
    return str(path)


def make_image(seed, h=40, w=56):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def tsv_line(text, image_id, image_bytes):
    return f"{text}\t{image_id}\t{base64.b64encode(image_bytes).decode()}"


def write_tsv(path, rows, newline="\n"):
    """rows: (text, image_id, seed) triples -> a TSV in the official format."""
    path.write_text(newline.join(tsv_line(t, i, make_image(s)) for t, i, s in rows) + newline,
                    encoding="utf-8")
    return str(path)


def tiny_config(tmp_path, **over):
    """A run config (key -> value) for the tiny towers, with its vocab/text config/TSV in tmp_path."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    rows = [(t, f"img{k}", k) for k, t in enumerate(
        ["红色的圆形", "a red circle", "蓝色方块", "green squares on the left", "黄色三角",
         "一个绿色的圆", "two blue squares", "红色方块在上"])]
    cfg = {
        "device": "cpu", "infer_batch_size": 3, "max_text_seqlen": 16,
        "vocab_file": write_vocab(tmp_path / "vocab.txt"),
        "text_model_config": write_json(tmp_path / "ernie_tiny.json", TINY_ERNIE),
        "test_file": write_tsv(tmp_path / "test.tsv", rows),
        "output_file": str(tmp_path / "out" / "emb.out"),
        "init_from_params": "", "image_model": dict(TINY_VIT), "num_workers": 0,
        "log_dir": str(tmp_path / "log"),
    }
    cfg.update(over)
    return cfg


def launch_worker(tmp_path, worker, *args, out):
    """`python -m paddle.distributed.launch --nproc_per_node 2 tests/WORKER ARGS... OUT`, then the
    arrays rank 0 saved in OUT (a .npz); the workers' logs in the failure message."""
    import subprocess
    import sys
    from pathlib import Path

    import pytest
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node",
                           "2", "--log_dir", str(tmp_path / "log"), str(root / "tests" / worker),
                           *map(str, args), str(out)],
                          capture_output=True, text=True, timeout=300, cwd=root)
    if proc.returncode != 0 or not Path(out).exists():
        logs = "".join(p.read_text()[-2000:] for p in (tmp_path / "log").glob("workerlog.*"))
        pytest.fail(f"launch failed: {proc.stderr[-2000:]}\n{logs}")
    return dict(np.load(out))

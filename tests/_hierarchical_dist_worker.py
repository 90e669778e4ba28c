"""Worker for test_hierarchical.py: hierarchical alignment (2 levels) under 2 processes.

Each rank encodes its half of a fixed batch (text dropout on, seeded with SEED + rank) at both
levels, contrasts against both ranks' features of every level (gathered with gradient), averages
gradients and saves them; `reference()` is one process on the whole batch replaying each half's
random state.
"""
import os
import sys

import numpy as np
import paddle

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "packages"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _dist_train_worker import N, replay, run  # noqa: E402  (the same replay and run)
from ernievil2.factory import build_dual_encoder  # noqa: E402
from ernievil2.losses import MultiViewContrastiveLoss  # noqa: E402
from helpers import TINY_ERNIE, TINY_VIT  # noqa: E402

SEED = 4321
PAIRS = [("image", "text", 1.0), ("image_h1", "text_h1", 0.7)]


def model_and_loss():
    paddle.seed(0)
    m = build_dual_encoder(dict(TINY_VIT), {**TINY_ERNIE, "hidden_dropout_prob": 0.2})
    m.add_level_heads(2)
    m.add_temperatures(PAIRS)
    m.train()
    loss = MultiViewContrastiveLoss(PAIRS)
    return m, lambda feats, **kw: loss(feats, m.logit_scales(PAIRS), **kw)


def batch():
    rng = np.random.default_rng(11)
    return {"image": rng.standard_normal((N, 3, 32, 32)).astype("float32"),
            "text": rng.integers(5, 60, (N, 9)).astype("int64")}


def encode(m, b, rows, seed):
    paddle.seed(seed)
    sl = slice(*rows)
    img = m.encode_image_levels(paddle.to_tensor(b["image"][sl]), 2)
    txt = m.encode_text_levels(paddle.to_tensor(b["text"][sl]), 2)
    return {"image": img[0], "image_h1": img[1], "text": txt[0], "text_h1": txt[1]}


def reference(seed=SEED):
    return replay(sys.modules[__name__], seed)


if __name__ == "__main__":
    run(sys.modules[__name__], sys.argv[1])

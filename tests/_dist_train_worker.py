"""Worker for test_train_distributed.py: the real tiny towers (text dropout on) under 2 processes.

Each rank encodes its half of a fixed batch after seeding with (SEED + rank), contrasts against
both ranks' features (gathered with gradient), averages gradients over ranks and saves them.
`reference()` is one process on the whole batch that replays the same random state per half.
"""
import os
import sys

import numpy as np
import paddle

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "packages"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ernievil2.distributed import all_reduce_gradients, init_distributed  # noqa: E402
from ernievil2.losses import MultiViewContrastiveLoss  # noqa: E402
from ernievil2.factory import build_dual_encoder as create_model  # noqa: E402
from helpers import TINY_ERNIE, TINY_VIT  # noqa: E402

N, SEED = 8, 1234
PAIRS = [("image", "text", 1.0), ("text", "text_aug", 0.5)]


def model_and_loss():
    """The model with a temperature per pair, and its loss: features -> (total, info)."""
    paddle.seed(0)
    m = create_model(dict(TINY_VIT), {**TINY_ERNIE, "hidden_dropout_prob": 0.2})
    m.add_temperatures(PAIRS)
    m.train()
    loss = MultiViewContrastiveLoss(PAIRS)
    return m, lambda feats, **kw: loss(feats, m.logit_scales(PAIRS), **kw)


def batch():
    rng = np.random.default_rng(7)
    return {"image": rng.standard_normal((N, 3, 32, 32)).astype("float32"),
            "text": rng.integers(5, 60, (N, 9)).astype("int64"),
            "text_aug": rng.integers(5, 60, (N, 9)).astype("int64"),
            "ids": np.arange(N)}


def encode(m, b, rows, seed):
    paddle.seed(seed)  # the random state this half's dropout draws from
    sl = slice(*rows)
    return {"image": m.encode_image(paddle.to_tensor(b["image"][sl])),
            "text": m.encode_text(paddle.to_tensor(b["text"][sl])),
            "text_aug": m.encode_text(paddle.to_tensor(b["text_aug"][sl]))}


def grads(m):
    return {k: p.grad.numpy() for k, p in m.named_parameters() if p.grad is not None}


def replay(setup, seed):
    """One process on the whole batch, each half encoded from the random state of its rank.
    setup: a worker module (model_and_loss, batch, encode)."""
    m, loss = setup.model_and_loss()
    b = setup.batch()
    halves = [setup.encode(m, b, (r * N // 2, (r + 1) * N // 2), seed + r) for r in range(2)]
    feats = {v: paddle.concat([h[v] for h in halves]) for v in halves[0]}
    total, _ = loss(feats, rank=0, world_size=1)
    total.backward()
    return float(total), grads(m)


def run(setup, out):
    """This rank's half, contrasted against both halves; averaged gradients saved by rank 0."""
    rank, world = init_distributed()
    assert world == 2
    m, loss = setup.model_and_loss()
    b = setup.batch()
    feats = setup.encode(m, b, (rank * N // 2, (rank + 1) * N // 2), setup.SEED + rank)
    total, _ = loss(feats)
    total.backward()
    params = [p for p in m.parameters() if p.grad is not None]
    all_reduce_gradients(params, average=True)
    if rank == 0:
        np.savez(out, loss=float(total), **grads(m))


def reference(seed=SEED):
    return replay(sys.modules[__name__], seed)


if __name__ == "__main__":
    run(sys.modules[__name__], sys.argv[1])

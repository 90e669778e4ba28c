"""Worker for test_unicl.py: a mixed image-text + image-label batch under 2 processes.

Each rank takes its slice of a MixedSampler batch from the real batcher (label rows with drawn
prompts), encodes it with the tiny towers (text dropout on, seeded SEED + rank), contrasts it
against both ranks' features with UniCL targets (ids gathered), averages the gradients and saves
them with the batch's ids. `reference(folder)` is one process on the whole batch, replaying the
same random state per half.
"""
import os
import sys

import numpy as np
import paddle

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "packages"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ernievil2.distributed import all_reduce_gradients, all_gather_no_grad, init_distributed  # noqa: E402
from ernievil2.factory import build_dual_encoder  # noqa: E402
from ernievil2.losses import MultiViewContrastiveLoss  # noqa: E402
from ernievil2.tokenizer import ErnieTokenizer  # noqa: E402
from ernievil2.train.data import (LabelPrompts, MixedSampler, MultiViewBatcher, TrainIndex,  # noqa: E402
                                  TrainSources)
from ernievil2.transforms import make_eval_transform, make_train_transform  # noqa: E402
from _dist_train_worker import encode, grads  # noqa: E402  (the same per-half encoding)
from _unicl_data import CLASSES, TEMPLATES  # noqa: E402
from helpers import TINY_ERNIE, TINY_VIT  # noqa: E402

N, SEED, STEP = 8, 1234, 3
PAIRS = [("image", "text", 1.0), ("text", "text_aug", 0.5)]
VIEWS = ["image", "text", "text_aug"]


def model_and_loss(targets="unicl"):
    paddle.seed(0)
    m = build_dual_encoder(dict(TINY_VIT), {**TINY_ERNIE, "hidden_dropout_prob": 0.2})
    m.add_temperatures(PAIRS)
    m.train()
    loss = MultiViewContrastiveLoss(PAIRS, targets=targets)
    return m, lambda feats, ids, **kw: loss(feats, m.logit_scales(PAIRS), ids=ids, **kw)


def batch(folder, rank=0, world=1):
    """This rank's share of the mixed batch of step STEP (and the kind of each row: 1 = label)."""
    prompts = LabelPrompts(CLASSES, TEMPLATES)
    index = TrainSources([TrainIndex(os.path.join(folder, "text.tsv")),
                          TrainIndex(os.path.join(folder, "labels.tsv"), need_labels="a label file")],
                         [1.0, 1.0], ["text", "label"], resolve=prompts.resolve)
    tok = ErnieTokenizer.from_file(os.path.join(folder, "vocab.txt"), max_seq_len=16)
    b = MultiViewBatcher(index, VIEWS, tok, make_train_transform(32), make_eval_transform(32),
                         seed=SEED, rank=rank, world_size=world, num_workers=0, prompts=prompts)
    epochs, rows = MixedSampler(index.sizes, index.weights, N, SEED).rows(STEP)
    out = b.batch(epochs, rows)
    out["kinds"] = (index.class_index[b.local_rows(rows)] >= 0).astype(np.int64)
    b.close()
    return out


def reference(folder, targets="unicl"):
    """One process, the loss on the whole batch: the halves are encoded as the ranks encode
    theirs (each padded to its own longest text, so dropout draws the same masks)."""
    m, loss = model_and_loss(targets)
    shares = [batch(folder, r, 2) for r in range(2)]
    halves = [encode(m, b, (0, N // 2), SEED + r) for r, b in enumerate(shares)]
    feats = {v: paddle.concat([h[v] for h in halves]) for v in halves[0]}
    ids = np.concatenate([b["ids"] for b in shares])
    total, _ = loss(feats, paddle.to_tensor(ids) if targets == "unicl" else None, rank=0, world_size=1)
    total.backward()
    return batch(folder), grads(m)


def main(folder, out):
    rank, world = init_distributed()
    assert world == 2
    m, loss = model_and_loss()
    b = batch(folder, rank, world)
    feats = encode(m, b, (0, N // 2), SEED + rank)
    total, _ = loss(feats, paddle.to_tensor(b["ids"]))
    total.backward()
    params = [p for p in m.parameters() if p.grad is not None]
    all_reduce_gradients(params, average=True)
    ids = all_gather_no_grad(paddle.to_tensor(b["ids"])).numpy()
    if rank == 0:
        np.savez(out, ids=ids, **grads(m))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

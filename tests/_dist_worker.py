"""Worker for tests/test_distributed_gather.py, run on 2 CPU processes by
`python -m paddle.distributed.launch --nproc_per_node 2 --log_dir LOG tests/_dist_worker.py OUT.npz`.

Every rank builds the same toy model (two towers; the text tower has dropout 0.1) and the same
global batch, takes its slice of rows, computes the loss against negatives gathered from all
ranks, backpropagates, all-reduces the parameter gradients (mean over ranks, as DataParallel
does) and rank 0 writes them to OUT.npz, one scenario per key prefix. The test recomputes the loss
on the whole batch in one process and compares.

Dropout masks are keyed by the GLOBAL row index (a numpy RNG seeded with (seed, row)), so the
one-process reference draws exactly the masks the ranks drew, whatever the split.
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages"))

import paddle  # noqa: E402
import paddle.nn as nn  # noqa: E402
import paddle.nn.functional as F  # noqa: E402

from ernievil2 import distributed  # noqa: E402
from ernievil2.losses import MultiViewContrastiveLoss  # noqa: E402
from ernievil2.train.gradcache import gradcache_step  # noqa: E402

N_GLOBAL, HIDDEN, DROPOUT, MASK_SEED = 16, 16, 0.1, 1234
IDS = np.array([0, 1, 2, 3, 4, 5, 6, 7, 0, 9, 2, 11, 12, 13, 7, 15], dtype=np.int64)  # cross-rank dups
PAIRS = [("image", "text", 1.0), ("image", "image_aug", 0.5)]

# name -> (loss kwargs, use gradcache)
SCENARIOS = {
    "clip_local": (dict(targets="clip", local_loss=True), False),
    "unicl_local": (dict(targets="unicl", local_loss=True), False),
    "clip_global": (dict(targets="clip", local_loss=False), False),
    "clip_local_gradcache": (dict(targets="clip", local_loss=True), True),
    # Control: other ranks' features as constants -> gradients NOT those of the whole batch.
    "clip_local_nograd_gather": (dict(targets="clip", local_loss=True, gather_with_grad=False), False),
}


class RowKeyedDropout(nn.Layer):
    """Inverted dropout whose mask for a row depends only on (MASK_SEED, global row index)."""

    def forward(self, x, rows):
        if not self.training:
            return x
        masks = np.stack([np.random.default_rng([MASK_SEED, int(r)]).random(x.shape[1]) >= DROPOUT
                          for r in rows.numpy()]).astype(np.float32) / (1 - DROPOUT)
        return x * paddle.to_tensor(masks)


class Tower(nn.Layer):
    def __init__(self, d_in, dropout):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, HIDDEN), nn.Linear(HIDDEN, 4)
        self.drop = RowKeyedDropout() if dropout else None

    def forward(self, inputs):
        h = F.relu(self.fc1(inputs["x"]))
        if self.drop is not None:
            h = self.drop(h, inputs["rows"])
        return F.normalize(self.fc2(h), axis=-1)


def build_model():
    paddle.seed(0)
    towers = nn.LayerDict({"image": Tower(6, dropout=False), "text": Tower(5, dropout=True)})
    towers.train()
    return towers


def global_batch():
    rng = np.random.default_rng(0)
    image = rng.standard_normal((N_GLOBAL, 6)).astype(np.float32)
    rows = np.arange(N_GLOBAL, dtype=np.int64)
    return {"image": {"x": image, "rows": rows},
            "image_aug": {"x": image + 0.3 * rng.standard_normal(image.shape).astype(np.float32),
                          "rows": rows},
            "text": {"x": rng.standard_normal((N_GLOBAL, 5)).astype(np.float32), "rows": rows}}


def rows_of(batch, start, stop):
    return {v: {k: paddle.to_tensor(a[start:stop]) for k, a in d.items()} for v, d in batch.items()}


def encoders(towers):
    return {"image": towers["image"], "image_aug": towers["image"], "text": towers["text"]}


def temperatures():
    """One trainable log temperature per pair (in training the model owns them)."""
    return {f"{a}-{b}": paddle.create_parameter([1], "float32",
                                                default_initializer=nn.initializer.Constant(2.0))
            for a, b, _ in PAIRS}


def trainable(towers, temps):
    named = [(n, p) for n, p in towers.named_parameters() if not p.stop_gradient]
    return named + [(f"temperature.{k}", p) for k, p in temps.items()]


def run_scenario(towers, loss_kwargs, use_gradcache, start, stop, rank, world):
    """Loss on rows [start, stop) of the global batch against all ranks; returns the loss value."""
    loss = MultiViewContrastiveLoss(PAIRS, **loss_kwargs)
    temps = temperatures()
    batch = rows_of(global_batch(), start, stop)
    ids = paddle.to_tensor(IDS[start:stop])

    def loss_fn(feats):
        scales = {k: paddle.exp(t) for k, t in temps.items()}
        return loss(feats, scales, ids=ids, rank=rank, world_size=world)

    if use_gradcache:
        value = gradcache_step(encoders(towers), loss_fn, batch, micro_batch_size=2)["loss"]
    else:
        total, _ = loss_fn({v: fn(batch[v]) for v, fn in encoders(towers).items()})
        total.backward()
        value = float(total)
    params = trainable(towers, temps)
    distributed.all_reduce_gradients([p for _, p in params], average=True)
    grads = {n: p.grad.numpy().copy() for n, p in params}
    for _, p in params:
        p.clear_gradient(False)
    return value, grads


def main(out_path):
    rank, world = distributed.init_distributed()
    assert world == 2, f"expected 2 processes, got {world}"
    b = N_GLOBAL // world
    towers = build_model()
    result = {}
    for name, (kwargs, use_gc) in SCENARIOS.items():
        value, grads = run_scenario(towers, kwargs, use_gc, rank * b, (rank + 1) * b, rank, world)
        result[f"{name}/losses"] = np.array(distributed.all_gather_object(value))
        result.update({f"{name}/grad/{k}": g for k, g in grads.items()})
    # Unequal shapes must fail with a clear error on every rank (not hang).
    try:
        distributed.all_gather_with_grad(paddle.ones([2 + rank, 3]))
        message = ""
    except ValueError as e:
        message = str(e)
    result["shape_errors"] = np.array(distributed.all_gather_object(message))
    distributed.barrier()
    if distributed.is_main():
        np.savez(out_path, **result)


if __name__ == "__main__":
    main(sys.argv[1])

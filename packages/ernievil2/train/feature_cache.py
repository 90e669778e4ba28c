"""Frozen image tower, computed once: its features for K fixed views of every training image.

With `freeze_image_tower: true` (LiT) the tower is a fixed function, so re-running it on every
step only re-buys the same numbers: on CPU it is most of a step's cost. `image_feature_cache: K`
runs it once on K views of each distinct training image (view 0: the eval transform; views 1..K-1:
the train-time augmentation, seeded by (seed, image, view) so every process and every resumed run
sees the same features) and keeps the [images, K, features] array in memory. A step's image view
is then one of the K cached views of its image, drawn by the sample's own generator, and only the
projection head (and the text tower) is trained. Each process computes a share of the images and
the shares are all-gathered, so K views cost one pass over the data however many processes run.

`image_feature_cache_dir` keeps the array on disk under a fingerprint of everything it depends on
(training file, tower weights, K, seed, transforms), so runs that differ only in what they train
(an ablation, another seed of the text tower with the same cache seed) compute it once.

With `hierarchical_layers: K` > 1 the cached tower is `LevelTower`: each view's pooled features
of the K levels, concatenated (ErnieViL2.project_image_levels splits them again).
"""
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
import warnings

import numpy as np
import paddle
import paddle.nn as nn
from tqdm import tqdm

from ..distributed import all_gather_no_grad, all_gather_object, folder_writer, is_distributed
from ..fileio import atomic_path
from .data import ThreadFiles

log = logging.getLogger("ernievil2.train")
CACHE_STREAM = 7_919  # separates the cache's augmentation draws from the training samples'
FORMAT_VERSION = 1  # bump when the meaning of a cached view changes


def fingerprint(tower, index, views_per_image, train_transform, eval_transform, seed):
    """Hex digest of what the cached features depend on; any change gives another file."""
    st = os.stat(index.path)
    h = hashlib.sha256()
    meta = {
        "version": FORMAT_VERSION, "file": os.path.abspath(index.path), "size": st.st_size,
        "mtime_ns": st.st_mtime_ns, "views": int(views_per_image), "seed": int(seed),
        "train": _describe(train_transform), "eval": _describe(eval_transform),
    }
    if isinstance(tower, LevelTower):
        meta["levels"] = tower.levels
    h.update(json.dumps(meta, sort_keys=True).encode())
    for name, value in sorted(tower.state_dict().items()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(value.numpy()).tobytes())
    return h.hexdigest()[:20]


def _describe(transform):
    items = {k: v for k, v in vars(transform).items() if k != "rng"} if hasattr(transform, "__dict__") else {}
    return f"{type(transform).__name__}:{sorted((k, repr(v)) for k, v in items.items())}"


def view_generator(seed, image, view):
    return np.random.default_rng([seed, CACHE_STREAM, int(image), int(view)])


class LevelTower(nn.Layer):
    """The tower's pooled features of its top `levels` levels (forward_levels), concatenated
    along the last axis: what the cache keeps per view for hierarchical alignment."""

    def __init__(self, tower, levels):
        super().__init__()
        self.tower, self.levels = tower, int(levels)

    def forward(self, images):
        return paddle.concat(self.tower.forward_levels(images, self.levels), axis=-1)


@contextlib.contextmanager
def tower_runner(tower, eval_transform, runner="auto", world_size=1):
    """A numpy -> numpy function running `tower`. On CPU, Paddle Inference with oneDNN runs an
    EfficientNet 2.5x faster than eager (Lite0, 224 px, batch 32: 1.8 vs 4.5 s; same features
    within 1e-5), so `auto` exports the tower to a temporary folder and uses that."""
    if runner not in ("auto", "eager", "inference"):
        raise ValueError(f"runner must be auto, eager or inference, got {runner!r}")
    on_cpu = "cpu" in str(paddle.get_device())
    if runner == "eager" or (runner == "auto" and not on_cpu):
        yield lambda x: tower(paddle.to_tensor(x)).numpy()
        return
    from ..deploy_encoder import TowerPredictor

    size = eval_transform.image_size
    with tempfile.TemporaryDirectory(prefix="ernievil2_tower_") as tmp:
        # traced from the bound forward, as export.py does: to_static(layer) would convert the
        # training model's own tower in place
        static = paddle.jit.to_static(
            tower.forward, input_spec=[paddle.static.InputSpec([None, 3, size, size], "float32")],
            full_graph=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "What you save is a function")
            paddle.jit.save(static, os.path.join(tmp, "tower"))
        model_file = next(os.path.join(tmp, f) for f in ("tower.json", "tower.pdmodel")
                          if os.path.isfile(os.path.join(tmp, f)))
        threads = max(1, (os.cpu_count() or 1) // max(1, world_size))
        yield TowerPredictor(model_file, os.path.join(tmp, "tower.pdiparams"), device="cpu",
                             num_threads=threads)


class ImageFeatureCache:
    """features[image_index, view] = tower output (before the projection head) of that view."""

    def __init__(self, features):
        self.features = np.asarray(features, np.float32)  # [images, K, D]

    @property
    def views_per_image(self):
        return self.features.shape[1]

    def draw_views(self, rng, n):
        """`n` distinct view numbers (distinct while K allows) for one sample."""
        k = self.views_per_image
        return rng.permutation(k)[:n] if n <= k else rng.integers(0, k, n)

    def take(self, images, views):
        return self.features[np.asarray(images), np.asarray(views)]

    @classmethod
    def load_or_build(cls, cache_dir, tower, index, views_per_image, train_transform,
                      eval_transform, seed, rank=0, world_size=1, **build_kw):
        """`build`, or the file a previous run with the same fingerprint saved in `cache_dir`
        (written atomically by one process per folder: distributed.folder_writer)."""
        if not cache_dir:
            return cls.build(tower, index, views_per_image, train_transform, eval_transform, seed,
                             rank, world_size, **build_kw)
        key = fingerprint(tower, index, views_per_image, train_transform, eval_transform, seed)
        path = os.path.join(cache_dir, f"image_features_{key}.npy")
        # building is collective, so all ranks take one branch: load only when every process
        # has the file (the machines of a run need not share cache_dir)
        if all(all_gather_object(os.path.isfile(path))):
            features = np.load(path)
            log.info("frozen image features from %s %s", path, features.shape)
            return cls(features)
        cache = cls.build(tower, index, views_per_image, train_transform, eval_transform, seed,
                          rank, world_size, **build_kw)
        os.makedirs(cache_dir, exist_ok=True)
        if folder_writer(cache_dir):
            with atomic_path(path) as tmp:  # keeps the .npy extension, so np.save adds none
                np.save(tmp, cache.features)
            log.info("saved the frozen image features to %s", path)
        return cache

    @classmethod
    def build(cls, tower, index, views_per_image, train_transform, eval_transform, seed,
              rank=0, world_size=1, batch_size=32, pool=None, progress=True, runner="auto"):
        """Run `tower` (eval mode, no gradient) on every image's K views; this process takes
        images rank, rank+world, ... and the shares are gathered (shapes padded to be equal).
        runner: eager, inference (Paddle Inference + oneDNN on CPU), auto (inference on CPU)."""
        first_row = {}
        for row, img in enumerate(index.image_index.tolist()):
            first_row.setdefault(img, row)
        n_images, k = len(first_row), views_per_image
        if k < 1:
            raise ValueError(f"image_feature_cache needs at least 1 view per image, got {k}")
        if n_images < world_size:
            raise ValueError(f"{index.path}: {n_images} images for {world_size} processes")
        mine = list(range(rank, n_images, world_size))
        jobs = [(img, v) for img in mine for v in range(k)]
        t0 = time.time()
        files = ThreadFiles(index.path)

        def view(job):
            img, v = job
            _, _, pixels = index.read_image(files.get(), first_row[img])
            return eval_transform(pixels) if v == 0 else train_transform(pixels, view_generator(seed, img, v))

        was_training = tower.training
        tower.eval()
        feats = []
        bar = tqdm(total=len(jobs), desc="caching frozen image features", unit="views",
                   disable=not progress or rank != 0, leave=False)
        try:
            with paddle.no_grad(), tower_runner(tower, eval_transform, runner, world_size) as run:
                for s in range(0, len(jobs), batch_size):
                    chunk = jobs[s:s + batch_size]
                    pixels = list(pool.map(view, chunk)) if pool else [view(j) for j in chunk]
                    feats.append(run(np.stack(pixels)))
                    bar.update(len(chunk))
        finally:
            bar.close()
            files.close()
            tower.train(was_training)
        shape = feats[0].shape[1:]  # [D] pooled features, or [C, H, W] maps (train_image_head)
        local = np.concatenate(feats).reshape((len(mine), k) + shape)
        if world_size > 1 and is_distributed():
            per_rank = -(-n_images // world_size)
            padded = np.zeros((per_rank, k) + shape, np.float32)
            padded[:len(mine)] = local
            gathered = all_gather_no_grad(paddle.to_tensor(padded)).numpy()
            out = np.zeros((n_images, k) + shape, np.float32)
            for r in range(world_size):
                ids = list(range(r, n_images, world_size))
                out[ids] = gathered[r * per_rank:r * per_rank + len(ids)]
        else:
            out = local
        log.info("cached the frozen image tower's features: %d images x %d views x %s in %.1f s "
                 "(%.1f MB)", n_images, k, list(shape), time.time() - t0, out.nbytes / 2**20)
        return cls(out)

"""Frozen image tower, computed once: its features for K fixed views of every training image.

With `freeze_image_tower: true` (LiT) the tower is a fixed function, so re-running it on every
step only re-buys the same numbers: on CPU it is most of a step's cost. `image_feature_cache: K`
runs it once on K views of each distinct training image (view 0: the eval transform; views 1..K-1:
the train-time augmentation, seeded by (seed, image, view) so every process and every resumed run
sees the same features) and keeps the [images, K, features] array in memory. A step's image view
is then one of the K cached views of its image, drawn by the sample's own generator, and only the
projection head (and the text tower) is trained. Each process computes a share of the images and
the shares are all-gathered, so K views cost one pass over the data however many processes run.
"""
import logging
import time

import numpy as np
import paddle
from tqdm import tqdm

from ..data.tsv import DataError, decode_b64
from ..distributed import all_gather_no_grad, is_distributed
from ..transforms import decode_image

log = logging.getLogger("ernievil2.train")
CACHE_STREAM = 7_919  # separates the cache's augmentation draws from the training samples'


def view_generator(seed, image, view):
    return np.random.default_rng([seed, CACHE_STREAM, int(image), int(view)])


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
    def build(cls, tower, index, views_per_image, train_transform, eval_transform, seed,
              rank=0, world_size=1, batch_size=32, pool=None, progress=True):
        """Run `tower` (eval mode, no gradient) on every image's K views; this process takes
        images rank, rank+world, ... and the shares are gathered (shapes padded to be equal)."""
        first_row = {}
        for row, img in enumerate(index.image_index.tolist()):
            first_row.setdefault(img, row)
        n_images, k = len(first_row), views_per_image
        if k < 1:
            raise ValueError(f"image_feature_cache needs at least 1 view per image, got {k}")
        mine = list(range(rank, n_images, world_size))
        jobs = [(img, v) for img in mine for v in range(k)]
        t0 = time.time()
        files = {}

        def view(job):
            import threading
            f = files.setdefault(threading.get_ident(), open(index.path, "rb"))
            img, v = job
            line_no, fields = index.read(f, first_row[img])
            try:
                pil = decode_image(decode_b64(fields[2]))
            except ValueError as e:
                raise DataError(index.path, line_no, str(e)) from None
            return eval_transform(pil) if v == 0 else train_transform(pil, view_generator(seed, img, v))

        was_training = tower.training
        tower.eval()
        feats = []
        bar = tqdm(total=len(jobs), desc="caching frozen image features", unit="views",
                   disable=not progress or rank != 0, leave=False)
        try:
            with paddle.no_grad():
                for s in range(0, len(jobs), batch_size):
                    chunk = jobs[s:s + batch_size]
                    pixels = list(pool.map(view, chunk)) if pool else [view(j) for j in chunk]
                    feats.append(tower(paddle.to_tensor(np.stack(pixels))).numpy())
                    bar.update(len(chunk))
        finally:
            bar.close()
            for f in files.values():
                f.close()
            tower.train(was_training)
        dim = tower.num_features
        local = (np.concatenate(feats) if feats else np.zeros((0, dim), np.float32)).reshape(len(mine), k, dim)
        if world_size > 1 and is_distributed():
            per_rank = -(-n_images // world_size)
            padded = np.zeros((per_rank, k, dim), np.float32)
            padded[:len(mine)] = local
            gathered = all_gather_no_grad(paddle.to_tensor(padded)).numpy()
            out = np.zeros((n_images, k, dim), np.float32)
            for r in range(world_size):
                ids = list(range(r, n_images, world_size))
                out[ids] = gathered[r * per_rank:r * per_rank + len(ids)]
        else:
            out = local
        log.info("cached the frozen image tower's features: %d images x %d views x %d in %.1f s "
                 "(%.1f MB)", n_images, k, dim, time.time() - t0, out.nbytes / 2**20)
        return cls(out)

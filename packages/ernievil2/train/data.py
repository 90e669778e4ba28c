"""Training data: the multi-view batches of the paper from a TSV.

The file is indexed once (byte offset, image id, label of every line), so batches can be drawn in
a seeded random order and a resumed run continues at the exact same sample. Each epoch is a
permutation of all lines (seed, epoch); global step s takes rows [s*B, (s+1)*B) of it (the last
incomplete batch of an epoch is dropped) and rank r takes its contiguous slice of those rows.
Every sample's randomness (crops, jitter, text masking) comes from a generator keyed by
(seed, epoch, line), so the data does not depend on the number of processes or workers.

Views: `image` and `image_aug` are two augmentations of the image; `text` is the caption;
`text_aug` a masked/dropped copy of it or another caption of the same image; `tags` the object
tags of the 4th column (never derived from the caption).
"""
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from ..data.tsv import DataError, decode_b64, index_lines, read_line_at
from ..transforms import decode_image

log = logging.getLogger("ernievil2.train")


class TrainIndex:
    """Byte offsets, image ids and labels of every line of a training TSV (one streamed pass of
    data/tsv.py index_lines, so its BOM, CRLF and blank-line rules)."""

    def __init__(self, path, need_tags=False, need_labels=False, kind="training"):
        self.path = path
        offsets, line_numbers, image_ids, labels = [], [], [], []
        with tqdm(desc=f"indexing {path}", unit="lines", leave=False) as bar:
            for line_no, offset, raw in index_lines(path):
                fields = raw.split(b"\t", 5)
                if not 3 <= len(fields) <= 5:
                    raise DataError(path, line_no, f"expected 3 to 5 tab-separated columns, got {len(fields)}")
                if need_tags and (len(fields) < 4 or not fields[3].strip()):
                    raise DataError(path, line_no, "the tags view needs object tags in column 4 "
                                    "(precompute them with tools/extract_tags.py)")
                if need_labels and len(fields) < 5:
                    raise DataError(path, line_no, "unicl_key: label needs a label in column 5")
                offsets.append(offset)
                line_numbers.append(line_no)
                image_ids.append(fields[1].decode("utf-8", "replace").strip())
                labels.append(fields[4].decode("utf-8", "replace").strip() if len(fields) == 5 else "")
                bar.update()
        if not offsets:
            raise DataError(path, None, f"no {kind} lines (the file is empty)")
        self.offsets = np.asarray(offsets, np.int64)
        self.line_numbers = np.asarray(line_numbers, np.int64)  # 1-based, as editors count
        self.image_ids = image_ids
        uniq = {k: i for i, k in enumerate(dict.fromkeys(image_ids))}
        self.image_index = np.asarray([uniq[k] for k in image_ids], np.int64)
        label_uniq = {k: i for i, k in enumerate(dict.fromkeys(labels))}
        self.label_index = np.asarray([label_uniq[k] for k in labels], np.int64)
        # rows of each image, for the other-caption text view
        self.rows_of_image = {}
        for row, img in enumerate(self.image_index.tolist()):
            self.rows_of_image.setdefault(img, []).append(row)

    def __len__(self):
        return len(self.offsets)

    def read(self, f, row):
        """(line_no, fields) of one row, through an open binary file handle."""
        raw = read_line_at(f, int(self.offsets[row]))
        line_no = int(self.line_numbers[row])
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(self.path, line_no, f"invalid UTF-8 at byte {e.start}") from None
        return line_no, [x.strip() for x in text.split("\t")]

    def read_image(self, f, row):
        """(line_no, fields, decoded RGB image) of one row; a bad image is a FILE:LINE error."""
        line_no, fields = self.read(f, row)
        try:
            return line_no, fields, decode_image(decode_b64(fields[2]))
        except ValueError as e:
            raise DataError(self.path, line_no, str(e)) from None


class ThreadFiles:
    """One open binary handle of `path` per thread (seek + readline are not thread-safe)."""

    def __init__(self, path):
        self.path, self._files = path, {}

    def get(self):
        tid = threading.get_ident()
        if tid not in self._files:
            self._files[tid] = open(self.path, "rb")
        return self._files[tid]

    def close(self):
        for f in self._files.values():
            f.close()
        self._files.clear()


class EpochSampler:
    """Seeded permutation per epoch; position = global step. Same result for any process count."""

    def __init__(self, n_rows, global_batch, seed):
        if global_batch > n_rows:
            raise ValueError(f"batch_size {global_batch} exceeds the {n_rows} training lines")
        self.n, self.batch, self.seed = n_rows, global_batch, seed
        self.steps_per_epoch = n_rows // global_batch
        self._cache = (None, None)

    def rows(self, step):
        """(epoch, global rows of this step)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._cache[0] != epoch:
            self._cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return epoch, self._cache[1][k * self.batch:(k + 1) * self.batch]


class MultiViewBatcher:
    """Builds this rank's share of a global batch with every view the loss needs."""

    def __init__(self, index, views, tokenizer, train_transform, eval_transform, seed,
                 rank=0, world_size=1, text_aug="mask", text_mask_prob=0.15, augment=True,
                 num_workers=2, id_source="image_id", feature_cache=None):
        self.index, self.views, self.tok = index, set(views), tokenizer
        self.train_tf, self.eval_tf = train_transform, eval_transform
        self.seed, self.rank, self.world = seed, rank, world_size
        self.text_aug, self.mask_prob, self.augment = text_aug, text_mask_prob, augment
        self.ids = index.label_index if id_source == "label" else index.image_index
        self.pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
        self._files = ThreadFiles(index.path)
        # With a frozen-feature cache (feature_cache.py) the image views are cached features of
        # K fixed views instead of pixels: no image is decoded during training.
        self.cache = feature_cache

    def local_rows(self, global_rows):
        b = len(global_rows) // self.world
        if b * self.world != len(global_rows):
            raise ValueError(f"batch_size {len(global_rows)} is not divisible by {self.world} processes")
        return global_rows[self.rank * b:(self.rank + 1) * b]

    def _sample(self, epoch, row):
        rng = np.random.default_rng([self.seed, epoch, int(row)])
        image_views = [v for v in ("image", "image_aug") if v in self.views]
        if image_views and self.cache is None:
            _, fields, img = self.index.read_image(self._files.get(), row)
        else:
            _, fields = self.index.read(self._files.get(), row)
        out = {"text": fields[0]}
        if image_views and self.cache is not None:
            drawn = self.cache.draw_views(rng, len(image_views)) if self.augment else [0, 0]
            for v, k in zip(image_views, drawn):
                out[v] = int(k)
        elif image_views:
            for v in image_views:
                out[v] = self.train_tf(img, rng) if self.augment else self.eval_tf(img)
        if "text_aug" in self.views:
            out["text_aug"] = self._other_caption(row, rng) if self.text_aug == "other_caption" else None
        if "tags" in self.views:
            out["tags"] = fields[3].replace(",", " ")
        out["rng"] = rng
        return out

    def _other_caption(self, row, rng):
        rows = [r for r in self.index.rows_of_image[int(self.index.image_index[row])] if r != row]
        if not rows:
            return None  # a single caption: fall back to masking
        _, fields = self.index.read(self._files.get(), int(rng.choice(rows)))
        return fields[0]

    def _mask_ids(self, ids, rng):
        """Token-level text view: each content token is masked (p/2) or dropped (p/2)."""
        out = []
        for t in ids:
            if t in (self.tok.cls_id, self.tok.sep_id):
                out.append(t)
                continue
            u = rng.random()
            if u < self.mask_prob / 2:
                out.append(self.tok.mask_id)
            elif u >= self.mask_prob:
                out.append(t)
        return out

    def _pad(self, seqs):
        width = max(len(s) for s in seqs)
        arr = np.full((len(seqs), width), self.tok.pad_id, np.int64)
        for i, s in enumerate(seqs):
            arr[i, :len(s)] = s
        return arr

    def batch(self, epoch, global_rows):
        rows = self.local_rows(global_rows)
        fn = lambda r: self._sample(epoch, r)  # noqa: E731
        samples = list(self.pool.map(fn, rows)) if self.pool else [fn(r) for r in rows]
        out = {"ids": self.ids[rows], "rows": np.asarray(rows)}
        for v in ("image", "image_aug"):
            if v in self.views and self.cache is not None:
                out[v] = self.cache.take(self.index.image_index[rows], [s[v] for s in samples])
            elif v in self.views:
                out[v] = np.stack([s[v] for s in samples])
        text_ids = [self.tok.encode(s["text"]) for s in samples]
        if "text" in self.views:
            out["text"] = self._pad(text_ids)
        if "text_aug" in self.views:
            aug = [self.tok.encode(s["text_aug"]) if s.get("text_aug") else
                   self._mask_ids(ids, s["rng"]) for s, ids in zip(samples, text_ids)]
            out["text_aug"] = self._pad(aug)
        if "tags" in self.views:
            out["tags"] = self._pad([self.tok.encode(s["tags"]) for s in samples])
        return out

    def close(self):
        if self.pool:
            self.pool.shutdown()
        self._files.close()

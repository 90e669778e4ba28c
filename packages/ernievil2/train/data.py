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

Several files (UniCL, Yang et al. 2022): `TrainSources` puts the rows of several indexed files
into one row space and `MixedSampler` draws each global batch's rows from them by weight. A file
is of kind `text` (image-text rows, as above) or `label` (image-label rows: column 5 is a class
index or name of the class-name file). A label row's views: `image` / `image_aug` as any row;
`text` a prompt template filled with its class name, drawn per (seed, epoch, row); `text_aug`
another template's prompt of the same class (text_aug: other_caption; a masked copy of the
prompt with text_aug: mask); `tags` column 4 where the row has one, else the class name (the
label is a human-given object tag of the image). UniCL ids: label rows share an id when they
share a class, text rows when they share an image id of the same file (or a label, with
unicl_key: label); the three kinds of keys are kept apart, so a class and an image never share
an id.
"""
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from ..config import ConfigError
from ..data.tsv import DataError, decode_b64, index_lines, read_line_at
from ..datasets.labels import ClassLabels
from ..keys import SOURCE_KINDS
from ..transforms import decode_image
from ..zeroshot import TEMPLATES, LabelResolver, load_templates

log = logging.getLogger("ernievil2.train")


class TrainIndex:
    """Byte offsets, image ids and labels of every line of a training TSV (one streamed pass of
    data/tsv.py index_lines, so its BOM, CRLF and blank-line rules)."""

    def __init__(self, path, need_tags=False, need_labels="", kind="training"):
        """need_labels: why column 5 must hold a label (for the error), "" = it need not."""
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
                if need_labels and (len(fields) < 5 or not fields[4].strip()):
                    raise DataError(path, line_no, f"{need_labels} needs a label in column 5")
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
        self.labels = labels  # column 5 as written ("" where absent)

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


PROMPT_STREAM = 4_447  # separates the prompt draws from a sample's augmentation draws
MIX_STREAM = 6_113  # the mixed sampler's draws


class Source(NamedTuple):
    """One training file of a mix: its rows are drawn with probability weight / sum of weights."""
    path: str
    weight: float = 1.0
    kind: str = "text"  # SOURCE_KINDS: image-text or image-label rows


def sources_of(cfg):
    """The training files of a config: train_file (weight 1.0, image-text) if set, then
    train_files ([path, weight] or [path, weight, kind])."""
    sources = [Source(cfg.train_file)] if cfg.train_file else []
    sources += [Source(p[0], float(p[1]), p[2] if len(p) > 2 else SOURCE_KINDS[0])
                for p in cfg.train_files]
    if not sources:
        raise ConfigError("no training data: set train_file or train_files")
    return sources


def label_prompts(cfg, sources):
    """The LabelPrompts of the config's label rows, or None when no file is of kind label."""
    if not any(s.kind == "label" for s in sources):
        return None
    if not cfg.label_classes:
        raise ConfigError("train_files has image-label rows (kind label): set label_classes "
                          "(a class-name file such as imagenet_classes.tsv)")
    templates = (load_templates(cfg.label_templates) if cfg.label_templates
                 else TEMPLATES[cfg.label_lang])
    classes = ClassLabels(cfg.label_classes, cfg.label_lang)
    return LabelPrompts(classes.names, templates, resolve=classes)


class LabelPrompts:
    """A label row's text: one of the prompt templates (each with one `{}`) filled with its class
    name, drawn by a generator keyed by (seed, epoch, row), so it is the same on every process and
    after a resume, and independent of the row's image augmentation."""

    def __init__(self, class_names, templates, resolve=None):
        """resolve(label, path, line_no) -> class index; default: LabelResolver(class_names)."""
        if not templates:
            raise ValueError("label rows need at least one prompt template")
        self.class_names, self.templates = list(class_names), list(templates)
        self.resolve = resolve or LabelResolver(self.class_names)

    def draw(self, class_index, seed, epoch, row, n=1):
        """n prompts of one class from distinct templates (while there are enough of them)."""
        rng = np.random.default_rng([seed, PROMPT_STREAM, int(epoch), int(row)])
        picks = rng.permutation(len(self.templates))[:n]
        name = self.class_names[class_index]
        return [self.templates[t].format(name) for t in picks]


class TrainSources:
    """Indexed training files as one row space: file s's rows are the global rows
    row_offsets[s] .. row_offsets[s+1]-1 and its distinct images the global images
    image_offsets[s] + its own image index (images are never shared across files).

    unicl_ids: a label row's key is its class (class-name file index), a text row's its image id
    within its file (or its column-5 label, with unicl_key='label'); each distinct key is one id,
    so the three kinds of keys never collide. class_index: the class of a label row, -1 for a
    text row. `resolve(label, path, line_no) -> class index` (LabelPrompts.resolve) is needed
    when a file is of kind label."""

    def __init__(self, indexes, weights=None, kinds=None, resolve=None, unicl_key="image_id"):
        n = len(indexes)
        self.indexes = list(indexes)
        self.kinds = list(kinds or ["text"] * n)
        self.weights = np.asarray(weights if weights is not None else [1.0] * n, np.float64)
        lens = [len(ix) for ix in self.indexes]
        self.row_offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        images = [int(ix.image_index.max()) + 1 for ix in self.indexes]
        self.image_offsets = np.concatenate([[0], np.cumsum(images)]).astype(np.int64)
        self.source_of_row = np.repeat(np.arange(n), lens)
        self.image_index = np.concatenate([ix.image_index + off for ix, off
                                           in zip(self.indexes, self.image_offsets)])
        self.class_index = np.full(len(self.image_index), -1, np.int64)
        keys = []
        for s, (ix, kind) in enumerate(zip(self.indexes, self.kinds)):
            if kind == "label":
                classes = [resolve(label, ix.path, int(line))
                           for label, line in zip(ix.labels, ix.line_numbers)]
                self.class_index[self.row_offsets[s]:self.row_offsets[s + 1]] = classes
                keys += [("class", c) for c in classes]
            elif unicl_key == "label":
                keys += [("label", label) for label in ix.labels]
            else:
                keys += [("image", s, i) for i in ix.image_index.tolist()]
        uniq = {}
        self.unicl_ids = np.asarray([uniq.setdefault(k, len(uniq)) for k in keys], np.int64)
        # rows of each image, for the other-caption text view
        self.rows_of_image = {}
        for row, img in enumerate(self.image_index.tolist()):
            self.rows_of_image.setdefault(img, []).append(row)
        self._files = [ThreadFiles(ix.path) for ix in self.indexes]

    def __len__(self):
        return len(self.image_index)

    @property
    def sizes(self):
        return [len(ix) for ix in self.indexes]

    def _locate(self, row):
        s = int(self.source_of_row[row])
        return self.indexes[s], self._files[s].get(), int(row - self.row_offsets[s])

    def read(self, row):
        """(line_no, fields) of a global row."""
        index, f, local = self._locate(row)
        return index.read(f, local)

    def read_image(self, row):
        index, f, local = self._locate(row)
        return index.read_image(f, local)

    def close(self):
        for files in self._files:
            files.close()


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

    def epoch(self, step):
        return step // self.steps_per_epoch


class MixedSampler:
    """Several files by weight: each row of a global batch comes from file s with probability
    weights[s] / sum(weights), drawn by a generator keyed by (seed, step); within a file the rows
    follow that file's own seeded permutations, pass after pass, so every row of a file is used
    once per pass over it. Same result for any process count; rows(step) depends on the step
    only (the files' positions are the sums of the earlier steps' counts, kept as it goes).

    rows(step) -> (per-row epoch: the pass over its own file, global rows)."""

    def __init__(self, sizes, weights, global_batch, seed):
        weights = np.asarray(weights, np.float64)
        if len(sizes) != len(weights) or not len(sizes) or (weights <= 0).any():
            raise ValueError(f"MixedSampler needs one positive weight per file, got {weights.tolist()}")
        self.sizes = np.asarray(sizes, np.int64)
        self.p = weights / weights.sum()
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.batch, self.seed = global_batch, seed
        self.steps_per_epoch = max(1, int(self.sizes.sum()) // global_batch)  # nominal
        self._at = (0, np.zeros(len(sizes), np.int64))  # (step, rows taken before it per file)
        self._perms = {}

    def counts(self, step):
        """Rows of each file in the global batch of `step`."""
        return np.random.default_rng([self.seed, MIX_STREAM, step]).multinomial(self.batch, self.p)

    def _position(self, step):
        at, pos = self._at if self._at[0] <= step else (0, np.zeros(len(self.sizes), np.int64))
        for k in range(at, step):
            pos = pos + self.counts(k)
        self._at = (step, pos)
        return pos

    def _perm(self, source, epoch):
        key = (source, epoch)
        if key not in self._perms:
            if len(self._perms) > 4 * len(self.sizes):
                self._perms.clear()
            self._perms[key] = np.random.default_rng(
                [self.seed, MIX_STREAM, source, epoch]).permutation(int(self.sizes[source]))
        return self._perms[key]

    def rows(self, step):
        start, counts = self._position(step), self.counts(step)
        epochs, rows = [], []
        for s, c in enumerate(counts.tolist()):
            for p in range(int(start[s]), int(start[s]) + c):
                epoch, k = divmod(p, int(self.sizes[s]))
                epochs.append(epoch)
                rows.append(int(self.offsets[s]) + int(self._perm(s, epoch)[k]))
        # mixed, so every process's slice holds rows of every file
        order = np.random.default_rng([self.seed, MIX_STREAM, step, 1]).permutation(self.batch)
        return np.asarray(epochs, np.int64)[order], np.asarray(rows, np.int64)[order]

    def epoch(self, step):
        return step // self.steps_per_epoch


class MultiViewBatcher:
    """Builds this rank's share of a global batch with every view the loss needs."""

    def __init__(self, index, views, tokenizer, train_transform, eval_transform, seed,
                 rank=0, world_size=1, text_aug="mask", text_mask_prob=0.15, augment=True,
                 num_workers=2, id_source="image_id", feature_cache=None, prompts=None):
        """index: a TrainSources, or one TrainIndex (a single image-text file); prompts: the
        LabelPrompts of label rows."""
        if isinstance(index, TrainIndex):
            index = TrainSources([index], unicl_key=id_source)
        if (index.class_index >= 0).any() and prompts is None:
            raise ValueError("label rows need prompts (class names and templates)")
        self.index, self.views, self.tok, self.prompts = index, set(views), tokenizer, prompts
        self.train_tf, self.eval_tf = train_transform, eval_transform
        self.seed, self.rank, self.world = seed, rank, world_size
        self.text_aug, self.mask_prob, self.augment = text_aug, text_mask_prob, augment
        self.ids = index.unicl_ids
        self.pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
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
        img = None
        if image_views and self.cache is None:
            _, fields, img = self.index.read_image(row)
        else:
            _, fields = self.index.read(row)
        label = int(self.index.class_index[row])
        if label >= 0:  # an image-label row: prompts instead of a caption
            return self._label_sample(epoch, row, label, fields, image_views, img, rng)
        out = {"text": fields[0]}
        self._image_views(out, image_views, img, rng)
        if "text_aug" in self.views:
            out["text_aug"] = self._other_caption(row, rng) if self.text_aug == "other_caption" else None
        if "tags" in self.views:
            out["tags"] = fields[3].replace(",", " ")
        out["rng"] = rng
        return out

    def _image_views(self, out, image_views, img, rng):
        if image_views and self.cache is not None:
            drawn = self.cache.draw_views(rng, len(image_views)) if self.augment else [0, 0]
            for v, k in zip(image_views, drawn):
                out[v] = int(k)
        elif image_views:
            for v in image_views:
                out[v] = self.train_tf(img, rng) if self.augment else self.eval_tf(img)

    def _label_sample(self, epoch, row, label, fields, image_views, img, rng):
        """A label row: text = a drawn prompt of its class; text_aug (other_caption) = another
        template's; tags = column 4, else the class name."""
        prompts = self.prompts.draw(label, self.seed, epoch, row, n=2)
        out = {"text": prompts[0], "rng": rng}
        self._image_views(out, image_views, img, rng)
        if "text_aug" in self.views:
            out["text_aug"] = (prompts[1] if self.text_aug == "other_caption" and len(prompts) > 1
                               else None)
        if "tags" in self.views:
            tags = fields[3].replace(",", " ") if len(fields) > 3 else ""
            out["tags"] = tags if tags.strip() else self.prompts.class_names[label]
        return out

    def _other_caption(self, row, rng):
        rows = [r for r in self.index.rows_of_image[int(self.index.image_index[row])] if r != row]
        if not rows:
            return None  # a single caption: fall back to masking
        _, fields = self.index.read(int(rng.choice(rows)))
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
        """epoch: one for all rows (EpochSampler) or one per row (MixedSampler)."""
        rows = self.local_rows(global_rows)
        epochs = self.local_rows(np.broadcast_to(np.asarray(epoch), (len(global_rows),)))
        fn = lambda er: self._sample(int(er[0]), er[1])  # noqa: E731
        pairs = list(zip(epochs.tolist(), rows))
        samples = list(self.pool.map(fn, pairs)) if self.pool else [fn(p) for p in pairs]
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
        self.index.close()

"""Build an index folder from a TSV or an image folder, or add a source's new images to one.

Every distinct image (data.pipeline.image_key of its bytes) is embedded once and gets one row,
in the order it first appears; the TSV's captions (column 1) of all its lines are kept and
embedded as texts, for search over the captions. `add_to_index` embeds only images whose key the
index does not hold yet (their captions are left out too) and copies the old rows as they are.
Both write the folder through fileio.atomic_dir: a failure anywhere leaves the previous index.
"""
from __future__ import annotations

import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
from tqdm import tqdm

from ..data.pipeline import image_key
from ..data.tsv import DataError, SkipReport, count_lines, iter_records, record_image_bytes
from ..factory import as_config
from ..fileio import atomic_dir
from ..zeroshot import IMAGE_SUFFIXES
from . import store, vectors
from .encoder import MAX_THUMBNAIL_SIZE, THUMBNAIL_SIZE, Encoder

log = logging.getLogger("ernievil2.search")


@dataclass
class _Image:
    image_id: str
    where: str  # FILE:LINE or the image file, for errors
    captions: list = field(default_factory=list)
    row: int | None = None  # set once embedded; None while pending; -1 when skipped


@dataclass
class _Collected:
    ids: list = field(default_factory=list)
    keys: list = field(default_factory=list)
    embeddings: list = field(default_factory=list)  # float32 [b, D] blocks in row order
    images: dict = field(default_factory=dict)  # key -> _Image
    skipped: list = field(default_factory=list)  # FILE[:LINE]: problem


# ------------------------------------------------------------------------------------ sources
def folder_files(folder) -> list[str]:
    """The image files under `folder` (recursively, hidden names left out), sorted."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files)
                  if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
    return found


def _source_items(source, skip_bad: bool, skipped: list) -> tuple[int, Iterator]:
    """(items to read, iterator of (image bytes, image id, caption or None, where))."""
    if os.path.isdir(source):
        files = folder_files(source)

        def from_folder():
            for path in files:
                with open(path, "rb") as f:
                    raw = f.read()
                yield raw, os.path.relpath(path, source).replace(os.sep, "/"), None, path
        return len(files), from_folder()
    if not os.path.isfile(source):
        raise FileNotFoundError(f"source not found (a TSV or an image folder): {source}")

    def from_tsv():
        report = SkipReport(os.fspath(source))
        for record in iter_records(source, skip_bad_lines=skip_bad, report=report):
            try:
                raw = record_image_bytes(source, record)
            except DataError as e:
                if not skip_bad:
                    raise
                skipped.append(str(e))
                continue
            yield raw, record.image_id, record.text, f"{source}:{record.line_no}"
        skipped.extend(report.details())
    return count_lines(source), from_tsv()


# ------------------------------------------------------------------------------------ embedding
def _embed_source(encoder: Encoder, cfg, source, out_dir, first_row: int, known: set,
                  thumbnail_size: int, progress: bool) -> _Collected:
    """Embed the images of `source` whose key is not in `known`, writing their thumbnails into
    out_dir/thumbs; rows are numbered from `first_row`."""
    got = _Collected()
    total, items = _source_items(source, cfg.skip_bad_lines, got.skipped)
    pending: list = []  # (key, image bytes) not embedded yet
    workers = ThreadPoolExecutor(cfg.num_workers) if cfg.num_workers else None

    def prepare(raw):
        try:
            return encoder.prepare(raw, thumbnail_size)
        except ValueError as e:
            return e

    def flush():
        prepared = list(workers.map(prepare, [raw for _, raw in pending]) if workers
                        else map(prepare, [raw for _, raw in pending]))
        pixels = []
        for (key, _), result in zip(pending, prepared):
            image = got.images[key]
            if isinstance(result, ValueError):
                error = f"{image.where}: undecodable image: {result}"
                if not cfg.skip_bad_lines:
                    raise DataError(image.where, None, f"undecodable image: {result}")
                got.skipped.append(error)
                image.row = -1
                continue
            image.row = first_row + len(got.ids)
            got.ids.append(image.image_id)
            got.keys.append(key.hex())
            pix, thumb = result
            pixels.append(pix)
            with open(os.path.join(out_dir, store.thumbnail_name(image.row)), "wb") as f:
                f.write(thumb)
        if pixels:
            got.embeddings.append(encoder.pixels(np.stack(pixels)))
        pending.clear()

    try:
        with tqdm(total=total, unit="img" if os.path.isdir(source) else "lines",
                  desc="index", disable=not progress, dynamic_ncols=True) as bar:
            for raw, image_id, caption, where in items:
                bar.update(1)
                key = image_key(raw)
                if key in known:
                    continue
                image = got.images.get(key)
                if image is None:
                    image = got.images[key] = _Image(image_id, where)
                    pending.append((key, raw))
                if caption is not None:
                    image.captions.append(caption)
                if len(pending) >= encoder.batch_size:
                    flush()
            if pending:
                flush()
    finally:
        if workers:
            workers.shutdown(cancel_futures=True)
    if got.skipped:
        log.warning("%s: skipped %d bad line(s)/image(s); first: %s", source, len(got.skipped),
                    got.skipped[0])
    return got


def _captions(got: _Collected) -> tuple[list, list]:
    """(texts, image rows) of the embedded images' captions, in row order."""
    texts, rows = [], []
    for image in sorted((i for i in got.images.values() if i.row is not None and i.row >= 0),
                        key=lambda i: i.row):
        texts += image.captions
        rows += [image.row] * len(image.captions)
    return texts, rows


def _check_thumbnail_size(size):
    if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= MAX_THUMBNAIL_SIZE:
        raise store.SearchError(f"thumbnail size must be an int in 16..{MAX_THUMBNAIL_SIZE}, "
                                f"got {size!r}")


def _write_folder(tmp, cfg, manifest_base, image_parts, ids, keys, caption_parts, texts, rows,
                  settings, index=None, sources=()):
    """Everything but the thumbnails; the manifest last."""
    dim = manifest_base["embed_dim"]
    n_images = store.write_rows(os.path.join(tmp, store.IMAGE_EMB), image_parts, dim)
    n_captions = store.write_rows(os.path.join(tmp, store.CAPTION_EMB), caption_parts, dim)
    store.write_json(os.path.join(tmp, store.IMAGES), {"ids": ids, "keys": keys})
    store.write_json(os.path.join(tmp, store.CAPTIONS), {"texts": texts, "rows": rows})
    store.write_json(os.path.join(tmp, store.CONFIG), store.storable_config(cfg))
    if settings["type"] != "flat":
        if index is None:
            index = vectors.build(store.open_rows(os.path.join(tmp, store.IMAGE_EMB), dim), settings)
        vectors.save(index, os.path.join(tmp, store.VECTOR_INDEX))
    manifest = {**manifest_base, "images": n_images, "captions": n_captions,
                "vector_index": settings, "sources": list(sources)}
    store.write_json(os.path.join(tmp, store.MANIFEST), manifest)
    return manifest


def build_index(config, source, out_dir, *, index_type="flat", nlist=None, nprobe=None, m=None,
                ef_search=None, thumbnail_size=THUMBNAIL_SIZE, progress=False, encoder=None,
                **overrides) -> dict:
    """Build the index folder `out_dir` (replacing one there, only once complete) from a TSV or
    an image folder with the model of `config` (a name, path, mapping or Config; `overrides` are
    config keys). Returns the manifest. `encoder` replaces the config's towers (tests)."""
    cfg = as_config(config, **overrides)
    settings = vectors.index_settings(index_type, nlist, nprobe, m, ef_search)
    _check_thumbnail_size(thumbnail_size)
    source = os.fspath(source)
    if not os.path.exists(source):
        raise FileNotFoundError(f"source not found (a TSV or an image folder): {source}")
    encoder = encoder or Encoder.from_config(cfg)
    base = {"format": store.FORMAT, "version": store.VERSION, "embed_dim": int(encoder.embed_dim),
            "fingerprint": store.fingerprint(cfg), "thumbnail_size": thumbnail_size}
    with atomic_dir(out_dir) as tmp:
        os.makedirs(os.path.join(tmp, store.THUMBS))
        got = _embed_source(encoder, cfg, source, tmp, 0, set(), thumbnail_size, progress)
        if not got.ids:
            raise DataError(source, None, "no images to index")
        texts, rows = _captions(got)
        manifest = _write_folder(tmp, cfg, base, got.embeddings, got.ids, got.keys,
                                 [encoder.texts(texts)], texts, rows, settings,
                                 sources=[{"path": os.path.abspath(source), "images": len(got.ids)}])
    log.info("index %s: %d images, %d captions, %s vector index", out_dir, manifest["images"],
             manifest["captions"], settings["type"])
    return manifest


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)  # the old folder goes away once the new one is in place
    except OSError:
        shutil.copyfile(src, dst)


def add_to_index(index_dir, source, *, config=None, progress=False, encoder=None) -> dict:
    """Add the images of `source` that the index does not hold yet (by image_key) as new rows;
    old rows are copied, not embedded again. `config` defaults to the one the index was built
    with; either way its model must be the index's. Returns the new manifest."""
    index_dir = os.fspath(index_dir)
    manifest = store.read_manifest(index_dir)
    cfg = as_config(config if config is not None
                    else store.read_json(os.path.join(index_dir, store.CONFIG)))
    store.check_fingerprint(manifest, cfg, index_dir)
    source = os.fspath(source)
    if not os.path.exists(source):
        raise FileNotFoundError(f"source not found (a TSV or an image folder): {source}")
    encoder = encoder or Encoder.from_config(cfg)
    dim, settings = manifest["embed_dim"], dict(manifest["vector_index"])
    old_images = store.read_json(os.path.join(index_dir, store.IMAGES))
    old_captions = store.read_json(os.path.join(index_dir, store.CAPTIONS))
    old_emb = store.open_rows(os.path.join(index_dir, store.IMAGE_EMB), dim)
    old_caption_emb = store.open_rows(os.path.join(index_dir, store.CAPTION_EMB), dim)
    n_old = len(old_images["ids"])
    known = {bytes.fromhex(k) for k in old_images["keys"]}
    base = {k: manifest[k] for k in ("format", "version", "embed_dim", "fingerprint",
                                     "thumbnail_size")}
    with atomic_dir(index_dir) as tmp:
        os.makedirs(os.path.join(tmp, store.THUMBS))
        for row in range(n_old):
            name = store.thumbnail_name(row)
            _link_or_copy(os.path.join(index_dir, name), os.path.join(tmp, name))
        got = _embed_source(encoder, cfg, source, tmp, n_old, known, manifest["thumbnail_size"],
                            progress)
        texts, rows = _captions(got)
        index = None
        if settings["type"] != "flat":
            index = vectors.extend(vectors.load(os.path.join(index_dir, store.VECTOR_INDEX),
                                                settings), np.concatenate(got.embeddings)
                                   if got.embeddings else np.zeros((0, dim), np.float32))
        manifest = _write_folder(
            tmp, cfg, base, [old_emb, *got.embeddings], old_images["ids"] + got.ids,
            old_images["keys"] + got.keys, [old_caption_emb, encoder.texts(texts)],
            old_captions["texts"] + texts, old_captions["rows"] + rows, settings, index,
            sources=manifest.get("sources", []) + [{"path": os.path.abspath(source),
                                                    "images": len(got.ids)}])
    log.info("index %s: %d new images (%d in all), %d captions", index_dir, len(got.ids),
             manifest["images"], manifest["captions"])
    return manifest

"""Build an index folder from a TSV or an image folder, or add a source's new images to one.

Every distinct image (data.pipeline.image_key of its bytes) is embedded once and gets one row,
in the order it first appears; the TSV's captions (column 1) of all its lines are kept and
embedded as texts, for search over the captions. `add_to_index` embeds only images whose key the
index does not hold yet (their captions are left out too) and copies the old rows as they are.
Both write the folder through fileio.atomic_dir: a failure anywhere leaves the previous index.
Under paddle.distributed.launch (`ernievil2-index ... --nproc N`) the distinct new images are
dealt out to the processes in turn; rank 0 puts their shares together.
"""
from __future__ import annotations

import contextlib
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
from ..distributed import all_gather_object, get_rank, get_world_size
from ..factory import as_config
from ..fileio import atomic_dir
from ..zeroshot import IMAGE_SUFFIXES
from . import store, vectors
from .encoder import MAX_THUMBNAIL_SIZE, THUMBNAIL_SIZE, Encoder

log = logging.getLogger("ernievil2.search")
PARTS = ".parts"  # inside the temporary folder: each process's thumbnails and embeddings


@dataclass
class _Image:
    ordinal: int  # order of first appearance among the source's new images
    image_id: str
    where: str  # FILE:LINE or the image file, for errors
    captions: list = field(default_factory=list)
    row: int | None = None  # set once every process's share is in; None when skipped


@dataclass
class _Collected:
    images: dict = field(default_factory=dict)  # key -> _Image
    ordinals: list = field(default_factory=list)  # this process's embedded images, in order
    embeddings: list = field(default_factory=list)  # their float32 [b, D] blocks
    skipped: list = field(default_factory=list)  # FILE[:LINE]: problem
    ids: list = field(default_factory=list)  # by row, once merged (rank 0)
    keys: list = field(default_factory=list)


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
def _embed_source(encoder: Encoder, cfg, source, parts_dir, known: set, thumbnail_size: int,
                  progress: bool) -> _Collected:
    """Embed this process's share of the images of `source` whose key is not in `known` (the
    distinct new images are dealt out in turn: every process reads the whole source, so all
    agree on the images and their order). Thumbnails go to parts_dir/ORDINAL.jpg."""
    rank, world = get_rank(), get_world_size()
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
        prepared = list((workers.map if workers else map)(prepare, [raw for _, raw in pending]))
        pixels = []
        for (key, _), result in zip(pending, prepared):
            image = got.images[key]
            if isinstance(result, ValueError):
                if not cfg.skip_bad_lines:
                    raise DataError(image.where, None, f"undecodable image: {result}")
                got.skipped.append(f"{image.where}: undecodable image: {result}")
                continue
            pix, thumb = result
            pixels.append(pix)
            got.ordinals.append(image.ordinal)
            with open(os.path.join(parts_dir, f"{image.ordinal}.jpg"), "wb") as f:
                f.write(thumb)
        if pixels:
            got.embeddings.append(encoder.pixels(np.stack(pixels)))
        pending.clear()

    try:
        with tqdm(total=total, unit="img" if os.path.isdir(source) else "lines",
                  desc="index", disable=not progress or rank != 0, dynamic_ncols=True) as bar:
            for raw, image_id, caption, where in items:
                bar.update(1)
                key = image_key(raw)
                if key in known:
                    continue
                image = got.images.get(key)
                if image is None:
                    image = got.images[key] = _Image(len(got.images), image_id, where)
                    if image.ordinal % world == rank:
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
    return got


def _merge(got: _Collected, parts_dir, out_dir, first_row: int, source) -> _Collected:
    """Rank 0: every process's share in ordinal order as rows from `first_row` (skipped images
    leave no gap), thumbnails under their row's name; the other processes' embeddings come
    through parts_dir. Every process: the list of skipped images, logged once."""
    rank = get_rank()
    if rank != 0 and got.embeddings:
        np.save(os.path.join(parts_dir, f"rank{rank}.npy"), np.concatenate(got.embeddings))
    shares = all_gather_object((got.ordinals, got.skipped))
    skipped = sorted({s for _, share_skipped in shares for s in share_skipped})
    if skipped and rank == 0:
        log.warning("%s: skipped %d bad line(s)/image(s); first: %s", source, len(skipped),
                    skipped[0])
    if rank != 0:
        return got
    blocks, ordinals = [], []
    for r, (share, _) in enumerate(shares):
        if share:
            blocks.append(np.concatenate(got.embeddings) if r == 0
                          else np.load(os.path.join(parts_dir, f"rank{r}.npy")))
            ordinals += share
    by_ordinal = {image.ordinal: image for image in got.images.values()}
    order = np.argsort(ordinals, kind="stable")
    for row, ordinal in enumerate(np.asarray(ordinals)[order].tolist(), start=first_row):
        by_ordinal[ordinal].row = row
        os.replace(os.path.join(parts_dir, f"{ordinal}.jpg"),
                   os.path.join(out_dir, store.thumbnail_name(row)))
    key_of = {image.ordinal: key for key, image in got.images.items()}
    got.ids = [by_ordinal[o].image_id for o in sorted(ordinals)]
    got.keys = [key_of[o].hex() for o in sorted(ordinals)]
    got.embeddings = [np.concatenate(blocks)[order]] if blocks else []
    return got


def _captions(got: _Collected) -> tuple[list, list]:
    """(texts, image rows) of the embedded images' captions, in row order."""
    texts, rows = [], []
    for image in sorted((i for i in got.images.values() if i.row is not None),
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


@contextlib.contextmanager
def _output_folder(out_dir):
    """fileio.atomic_dir on rank 0, its temporary folder shared with the other processes, which
    write their shares into its PARTS folder; it replaces out_dir when rank 0 is done (the others
    are done once _merge has their shares). Yields (folder, its PARTS folder)."""
    if get_rank() != 0:
        tmp = all_gather_object(None)[0]
        yield tmp, os.path.join(tmp, PARTS)
        return
    with atomic_dir(out_dir) as tmp:
        for sub in (store.THUMBS, PARTS):
            os.makedirs(os.path.join(tmp, sub))
        all_gather_object(tmp)
        yield tmp, os.path.join(tmp, PARTS)


def build_index(config, source, out_dir, *, index_type="flat", nlist=None, nprobe=None, m=None,
                ef_search=None, thumbnail_size=THUMBNAIL_SIZE, progress=False, encoder=None,
                **overrides) -> dict:
    """Build the index folder `out_dir` (replacing one there, only once complete) from a TSV or
    an image folder with the model of `config` (a name, path, mapping or Config; `overrides` are
    config keys). Returns the manifest (None on the other processes of a multi-process build:
    under paddle.distributed.launch each embeds its share). `encoder` replaces the config's
    towers (tests)."""
    cfg = as_config(config, **overrides)
    settings = vectors.index_settings(index_type, nlist, nprobe, m, ef_search)
    _check_thumbnail_size(thumbnail_size)
    source = os.fspath(source)
    if not os.path.exists(source):
        raise FileNotFoundError(f"source not found (a TSV or an image folder): {source}")
    encoder = encoder or Encoder.from_config(cfg)
    base = {"format": store.FORMAT, "version": store.VERSION, "embed_dim": int(encoder.embed_dim),
            "fingerprint": store.fingerprint(cfg), "thumbnail_size": thumbnail_size}
    with _output_folder(out_dir) as (tmp, parts):
        got = _merge(_embed_source(encoder, cfg, source, parts, set(), thumbnail_size, progress),
                     parts, tmp, 0, source)
        if get_rank() != 0:
            return None
        shutil.rmtree(parts)
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
    with; either way its model must be the index's. Returns the new manifest (None on the other
    processes of a multi-process run)."""
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
    with _output_folder(index_dir) as (tmp, parts):
        got = _merge(_embed_source(encoder, cfg, source, parts, known, manifest["thumbnail_size"],
                                   progress), parts, tmp, n_old, source)
        if get_rank() != 0:
            return None
        shutil.rmtree(parts)
        for row in range(n_old):
            name = store.thumbnail_name(row)
            _link_or_copy(os.path.join(index_dir, name), os.path.join(tmp, name))
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

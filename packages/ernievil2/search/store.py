"""The index folder on disk: its files, its manifest and the model fingerprint it was built with.

    manifest.json            format, version, counts, embedding width, fingerprint, vector index
    config.json              the run config the index was built with (paths made absolute)
    image_embeddings.npy     float32 [N, D] L2-normalised, one row per distinct image (mmap'd)
    images.json              {"ids": [N], "keys": [N]}: id (TSV column 2 or the file's path
                             relative to the folder) and image_key (hex) of every row
    caption_embeddings.npy   float32 [M, D] text embeddings of the captions (a TSV's column 1)
    captions.json            {"texts": [M], "rows": [M]}: each caption and its image's row
    thumbs/000012.jpg        JPEG thumbnail of row 12 (long side <= thumbnail_size)
    images.faiss             the approximate vector index (ivf, hnsw); flat is made at open

The folder is written whole by fileio.atomic_dir (build and add alike): a crash leaves the
previous index as it was.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from ..config import ConfigError
from ..fileio import write_text

FORMAT = "ernievil2-search-index"
VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "config.json"
IMAGE_EMB = "image_embeddings.npy"
IMAGES = "images.json"
CAPTION_EMB = "caption_embeddings.npy"
CAPTIONS = "captions.json"
THUMBS = "thumbs"
VECTOR_INDEX = "images.faiss"
# Config keys naming files: stored absolute, so the index opens from any working directory.
PATH_KEYS = ("vocab_file", "text_model_config", "init_from_params", "export_dir")
# Config keys that change the embeddings (execution, batch size, device... only change speed).
MODEL_KEYS = ("image_model", "image_size", "embed_dim", "input_dtype", "max_text_seqlen",
              "pad_token", "cls_token", "sep_token", "mask_token")


class SearchError(ConfigError):
    """A search problem the user can fix; one line (the entry points print ConfigErrors so)."""


class IndexFolderError(SearchError):
    """An index folder that cannot be used: not an index, another format version, another
    model than the one asked for."""


class QueryError(SearchError):
    """A query that cannot be answered: empty or too long text, an undecodable or too large
    image, a bad k; the page answers these with 400."""


def thumbnail_name(row: int) -> str:
    return f"{THUMBS}/{row:06d}.jpg"


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_path(path) -> str:
    """A file's SHA-256; a folder's: of its files' names and digests, sorted."""
    if not os.path.isdir(path):
        return _sha256(path)
    h = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(folder, name)
            h.update(f"{os.path.relpath(full, path)}\0{_sha256(full)}\n".encode())
    return h.hexdigest()


def fingerprint(cfg) -> dict:
    """What the embeddings depend on: the weights' and vocab's and text config's bytes (SHA-256)
    and the model-defining keys; `digest` hashes them all."""
    items = {key: cfg[key] for key in MODEL_KEYS}
    items["weights_sha256"] = _sha256_path(cfg.init_from_params) if cfg.init_from_params else None
    items["random_seed"] = None if cfg.init_from_params else cfg.seed
    items["vocab_sha256"] = _sha256(cfg.vocab_file)
    items["text_model_config_sha256"] = _sha256(cfg.text_model_config)
    digest = hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()
    return {"digest": digest, "items": items}


def check_fingerprint(manifest: dict, cfg, index_dir, config_name="the config") -> None:
    """IndexFolderError when `cfg`'s model is not the one the index was built with."""
    stored = manifest["fingerprint"]
    current = fingerprint(cfg)
    if current["digest"] == stored["digest"]:
        return
    differ = sorted(k for k in set(stored["items"]) | set(current["items"])
                    if stored["items"].get(k) != current["items"].get(k)) or ["digest"]
    raise IndexFolderError(
        f"{os.path.join(index_dir, MANIFEST)}: the index was built with another model than "
        f"{config_name} (differs in {', '.join(differ)}): search it with the model it was built "
        f"with, or build a new index")


def storable_config(cfg) -> dict:
    """The config as config.json keeps it: JSON values, file paths absolute."""
    out = json.loads(json.dumps(dict(cfg), default=str))
    for key in PATH_KEYS:
        if out.get(key):
            out[key] = os.path.abspath(out[key])
    return out


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, ensure_ascii=False, indent=1) + "\n")


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise IndexFolderError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None


def read_manifest(index_dir) -> dict:
    """manifest.json of an index folder, checked (format and version)."""
    index_dir = os.fspath(index_dir)
    path = os.path.join(index_dir, MANIFEST)
    if not os.path.isdir(index_dir):
        raise FileNotFoundError(f"index folder not found: {index_dir}")
    if not os.path.isfile(path):
        raise IndexFolderError(f"{path}: not found; {index_dir} is not a search index (make one "
                               "with ernievil2-index build)")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexFolderError(f"{path}: not a search index manifest (format "
                               f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("version") != VERSION:
        raise IndexFolderError(f"{path}: index format version {manifest.get('version')!r}; this "
                               f"version reads {VERSION}: rebuild the index")
    return manifest


def write_rows(path, parts, dim: int) -> int:
    """A float32 [sum(len), dim] .npy from row blocks (arrays or memmaps), streamed: no block
    is concatenated with another in memory. Returns the row count."""
    n = sum(len(p) for p in parts)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                "fortran_order": False, "shape": (n, dim)})
        for part in parts:
            for start in range(0, len(part), 65536):
                f.write(np.ascontiguousarray(part[start:start + 65536], np.float32).tobytes())
    return n


def open_rows(path, dim: int) -> np.ndarray:
    """A .npy of rows, memory-mapped read-only (an empty one as an empty array)."""
    try:
        rows = np.load(path, mmap_mode="r")
    except ValueError:  # an empty array cannot be mapped
        rows = np.load(path)
    if rows.dtype != np.float32 or rows.ndim != 2 or rows.shape[1] != dim:
        raise IndexFolderError(f"{path}: expected float32 [N, {dim}], got {rows.dtype} "
                               f"{list(rows.shape)}")
    return rows

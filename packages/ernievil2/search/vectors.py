"""Vector search through faiss: exact inner product (flat) by default, or an approximate index
for large collections: IVF-Flat (nlist cells, nprobe searched) or HNSW (M links, efSearch).
Embeddings are L2-normalised, so the inner product is the cosine similarity."""
from __future__ import annotations

import logging
import math

import numpy as np

from .store import SearchError

INDEX_TYPES = ("flat", "ivf", "hnsw")
DEFAULTS = {"ivf": {"nlist": None, "nprobe": 16}, "hnsw": {"M": 32, "efSearch": 64}}


def faiss_module():
    """faiss, imported with its "Loading faiss..." INFO lines (root logger) kept off the console."""
    logging.getLogger("faiss").setLevel(logging.WARNING)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss
    return faiss


def index_settings(index_type="flat", nlist=None, nprobe=None, m=None, ef_search=None) -> dict:
    """The vector index's settings as the manifest stores them (defaults filled in, checked)."""
    if index_type not in INDEX_TYPES:
        raise SearchError(f"index type must be one of {', '.join(INDEX_TYPES)}, got {index_type!r}")
    given = {"nlist": nlist, "nprobe": nprobe, "M": m, "efSearch": ef_search}
    for key, value in given.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise SearchError(f"{key} must be a positive int, got {value!r}")
    settings = {"type": index_type}
    for key, default in DEFAULTS.get(index_type, {}).items():
        settings[key] = given[key] if given[key] is not None else default
    unused = [k for k, v in given.items() if v is not None and k not in settings]
    if unused:
        raise SearchError(f"{', '.join(unused)} apply to another index type than {index_type}")
    return settings


def default_nlist(n: int) -> int:
    """~4 sqrt(N) cells, each trained on >= 39 points (faiss's minimum for a good k-means)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def build(vectors: np.ndarray, settings: dict):
    """A faiss index over `vectors` (float32 [N, D]); for ivf `settings["nlist"]` is filled in."""
    faiss = faiss_module()
    x = np.ascontiguousarray(vectors, np.float32)
    dim = x.shape[1]
    kind = settings["type"]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, settings["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = settings["efSearch"]
    else:
        if len(x) == 0:
            raise SearchError("an ivf index needs vectors to train on: the index is empty")
        nlist = min(settings["nlist"] or default_nlist(len(x)), len(x))
        settings["nlist"] = nlist
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.nprobe = settings["nprobe"]
    index.add(x)
    return index


def extend(index, vectors: np.ndarray):
    """Append rows to a built index (an IVF keeps its trained cells)."""
    if len(vectors):
        index.add(np.ascontiguousarray(vectors, np.float32))
    return index


def save(index, path) -> None:
    faiss_module().write_index(index, str(path))


def load(path, settings: dict):
    faiss = faiss_module()
    index = faiss.read_index(str(path))
    if settings["type"] == "ivf":
        faiss.extract_index_ivf(index).nprobe = settings["nprobe"]
    elif settings["type"] == "hnsw":
        index.hnsw.efSearch = settings["efSearch"]
    return index


def search(index, queries: np.ndarray, k: int):
    """(scores [Q, k'], rows [Q, k']) best first; k' = min(k, rows in the index)."""
    k = min(k, index.ntotal)
    if k == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    return index.search(np.ascontiguousarray(queries, np.float32), k)

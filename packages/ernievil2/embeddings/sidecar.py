"""The binary sidecar ``FILE.npz`` next to an embeddings text file.

It holds the parsed arrays plus the SHA-256 of the text file's bytes (all of them: an edit
anywhere, even one that keeps the size, makes the sidecar stale). The writer hashes the bytes as
it writes them; loading a sidecar hashes the text file (~0.13 s for a 10k x 768 file: SHA-256
with the CPU's SHA extensions ran 1.5x faster than BLAKE2b here).
"""
from __future__ import annotations

import hashlib
import os
import warnings
import zipfile

import numpy as np

from ..fileio import atomic_write
from .format import EmbeddingFile, StaleSidecarWarning

SIDECAR_SUFFIX = ".npz"
SIDECAR_VERSION = 2  # 2: digest of the whole text file (1 hashed only its ends)
HASH_BLOCK_BYTES = 1 << 20


def sidecar_path(path) -> str:
    return os.fspath(path) + SIDECAR_SUFFIX


def new_hasher():
    return hashlib.sha256()


def content_digest(path) -> str:
    h = new_hasher()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK_BYTES):
            h.update(block)
    return h.hexdigest()


def write_sidecar(path, emb: EmbeddingFile) -> str:
    """Write ``path + ".npz"`` for the text file at ``path`` (which must already be final).
    ``emb.digest`` is trusted when set (the writer computes it from the bytes it writes)."""
    path = os.fspath(path)
    digest = emb.digest or content_digest(path)
    out = sidecar_path(path)
    with atomic_write(out, "wb") as f:
        np.savez(f, text=np.ascontiguousarray(emb.text, np.float32),
                 image=np.ascontiguousarray(emb.image, np.float32),
                 line_numbers=np.asarray(emb.line_numbers, np.int64),
                 source_size=np.int64(os.path.getsize(path)), source_sha256=np.str_(digest),
                 version=np.int64(SIDECAR_VERSION))
    return out


def _warn(message):
    warnings.warn(message, StaleSidecarWarning, stacklevel=4)  # the caller of read_embeddings


def load_fresh_sidecar(path: str):
    """The sidecar's EmbeddingFile when it matches the text file at ``path``, else None (with a
    StaleSidecarWarning if a sidecar exists but is stale or unreadable)."""
    sc = sidecar_path(path)
    if not os.path.isfile(sc):
        return None
    try:
        with np.load(sc, allow_pickle=False) as z:
            if int(z["version"]) != SIDECAR_VERSION:
                raise ValueError(f"version {int(z['version'])}, expected {SIDECAR_VERSION}")
            digest = str(z["source_sha256"])
            if (int(z["source_size"]) != os.path.getsize(path)  # cheap check first
                    or digest != content_digest(path)):
                _warn(f"{sc}: ignoring stale sidecar ({path} has changed since it was written); "
                     f"parsing the text file")
                return None
            text, image, ids = z["text"], z["image"], z["line_numbers"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        _warn(f"{sc}: ignoring unreadable sidecar ({e}); parsing the text file")
        return None
    if (text.dtype != np.float32 or text.ndim != 2 or text.shape != image.shape
            or ids.shape != (text.shape[0],)):
        _warn(f"{sc}: ignoring sidecar with inconsistent arrays")
        return None
    return EmbeddingFile(text, image, ids.astype(np.int64, copy=False), "sidecar", digest)

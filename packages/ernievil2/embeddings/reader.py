"""Read an embeddings file: its sidecar when that still matches the text, else the text."""
from __future__ import annotations

import os

from .format import EmbeddingFile
from .parser import parse_text_file


def read_embeddings(path, use_sidecar: bool = True, workers: int | None = None) -> EmbeddingFile:
    """Read an embeddings file; use ``path + ".npz"`` instead when its digest matches the text
    file's bytes. ``workers``: parsing threads (default min(4, CPUs))."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such embeddings file")
    if use_sidecar:
        from .sidecar import load_fresh_sidecar  # zipfile, hashlib: only when a sidecar may be read

        cached = load_fresh_sidecar(path)
        if cached is not None:
            return cached
    return parse_text_file(path, workers)

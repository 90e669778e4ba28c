"""The retrieval embeddings file: format (format.py), writer, parser, binary sidecar.

The writer and the sidecar (zipfile, hashlib) are imported on first use: evaluating a text file
needs neither."""
import importlib

from .format import EmbeddingFile, EmbeddingFormatError, StaleSidecarWarning
from .reader import read_embeddings

_LAZY = {
    "format_float32_rows": "writer",
    "sidecar_path": "sidecar",
    "write_embeddings": "writer",
    "write_sidecar": "sidecar",
}

__all__ = [
    "EmbeddingFile",
    "EmbeddingFormatError",
    "StaleSidecarWarning",
    "format_float32_rows",
    "read_embeddings",
    "sidecar_path",
    "write_embeddings",
    "write_sidecar",
]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

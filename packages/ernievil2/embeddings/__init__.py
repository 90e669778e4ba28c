"""The retrieval embeddings file: format (format.py), writer, parser, binary sidecar.

The writer and the sidecar (zipfile, hashlib) are imported on first use: evaluating a text file
needs neither."""
from ..lazy import lazy_exports
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


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

"""The retrieval embeddings file: format (format.py), writer, parser, binary sidecar."""
from .format import EmbeddingFile, EmbeddingFormatError, StaleSidecarWarning
from .reader import read_embeddings
from .sidecar import sidecar_path, write_sidecar
from .writer import format_float32_rows, write_embeddings

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

"""The retrieval embeddings file that inference writes and evaluation reads.

Format (the official run_infer.py output): one line per input line, in input order::

    <D text floats, space-separated> \\t <D image floats> \\t <int>

The official writes the constant ``1`` in column 3; we write the 1-based input line number, so a
file can be mapped back to its TSV. Readers accept both. Floats are written exactly as
``str(np.float32(x))`` prints them (what the official does) and read exactly as the official reads
them: decimal -> float64 (correctly rounded, like ``float()``) -> float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# |x| >= this rounds to infinity in float32 (halfway between FLT_MAX and 2**128; ties go to even)
FLOAT32_OVERFLOW = 2.0 ** 128 - 2.0 ** 103


class EmbeddingFormatError(ValueError):
    """A malformed embeddings (or id / TSV) file; the message starts with ``FILE:LINE:``."""


class StaleSidecarWarning(UserWarning):
    """A ``.npz`` sidecar exists but no longer matches its text file, so it was ignored."""


@dataclass(frozen=True)
class EmbeddingFile:
    text: np.ndarray  # float32 [N, D]
    image: np.ndarray  # float32 [N, D]
    line_numbers: np.ndarray  # int64 [N]: column 3 (official: all 1; ours: 1-based input line)
    source: str = "text"  # "text" (parsed) or "sidecar" (loaded from FILE.npz)
    digest: str | None = None  # sidecar.content_digest of the text file, when known

    @property
    def num_lines(self) -> int:
        return int(self.text.shape[0])

    @property
    def dim(self) -> int:
        return int(self.text.shape[1])

    @property
    def has_official_ids(self) -> bool:
        """True when column 3 is the official constant 1 on every line (no line numbers)."""
        return bool(self.num_lines) and bool(np.all(self.line_numbers == 1))

    def check_line_numbers(self, path) -> None:
        """Column 3 as 1-based input line numbers: each positive and each once, else
        EmbeddingFormatError naming the file's line."""
        ids = np.asarray(self.line_numbers)
        bad = np.flatnonzero(ids < 1)
        if len(bad):
            raise EmbeddingFormatError(f"{path}:{bad[0] + 1}: column 3 is {ids[bad[0]]}, not a "
                                       "1-based input line number")
        _, first = np.unique(ids, return_index=True)
        if len(first) < len(ids):
            seen = np.zeros(len(ids), bool)
            seen[first] = True
            i = int(np.flatnonzero(~seen)[0])  # the first line repeating an earlier one
            j = int(np.flatnonzero(ids == ids[i])[0])
            raise EmbeddingFormatError(f"{path}:{i + 1}: column 3 says input line {ids[i]}, "
                                       f"like line {j + 1}: each input line is embedded once")

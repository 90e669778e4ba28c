"""One run at a time per output file, every rank's part gathered to rank 0, and a merge that
checks completeness.

Rank 0 holds an exclusive lock on OUTPUT.lock (fcntl.flock, released by the OS if the process
dies) for the whole run, so a second run on the same output fails at once; holding it, rank 0
removes what a killed run left (temporaries). Each rank's rows reach rank 0 over the process group,
not through files, so the nodes of a multi-machine run need not share a folder; the merge writes
the output only when the parts hold exactly the lines of the TSV that were not skipped.
"""
import contextlib
import fcntl
import glob
import logging
import os
from typing import NamedTuple

import numpy as np

from ..config import ConfigError
from ..data.tsv import SkipReport, count_lines
from ..distributed import all_gather_object, gather_rows
from ..fileio import TMP_MARK

log = logging.getLogger("ernievil2.infer")


class OutputBusyError(ConfigError):
    """Another run is writing the same output_file."""


class OutputLock:
    """Exclusive, non-blocking lock on OUTPUT.lock; the file holds the owner's pid."""

    def __init__(self, output_file):
        self.output_file = os.fspath(output_file)
        self.path = self.output_file + ".lock"
        self.fd = None

    def acquire(self):
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise OutputBusyError(f"{self.output_file} is being written by another run "
                                      f"(pid {owner}); wait or choose another output_file") from None
            # The owner removes the file when it is done; if it did so between our open and our
            # flock, the lock is on a removed file: take the new one.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as e:  # a full disk: no lock file left behind, an error naming it
            self.release()
            raise OSError(e.errno, e.strerror, self.path) from e

    def release(self):
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)  # before unlocking, so no one locks a file about to vanish
            os.close(self.fd)
            self.fd = None


def remove_leftovers(output_file):
    """Temporaries of OUTPUT (and its sidecar) left by a killed or failed run; call only while
    holding the lock, when no other run can be writing them."""
    folder, base = os.path.split(os.path.abspath(output_file))
    patterns = []
    for name in (base, base + ".npz"):  # fileio's temporaries of the output and its sidecar
        stem, ext = os.path.splitext(name)
        patterns.append(f".{glob.escape(stem)}{TMP_MARK}*{glob.escape(ext)}")
    found = sorted({p for pattern in patterns
                    for p in glob.glob(os.path.join(glob.escape(folder), pattern))})
    for path in found:
        os.remove(path)
    if found:
        log.warning("removed %d file(s) of an unfinished run: %s", len(found),
                    ", ".join(os.path.basename(p) for p in found))


class Part(NamedTuple):
    """One rank's share: its rows, their line numbers and the lines it skipped (number, problem)."""
    text: np.ndarray
    image: np.ndarray
    line_numbers: np.ndarray
    skipped: list


def gather_parts(embeddings, rank):
    """Rank 0: every rank's Part, received over the process group (the nodes of a run need not
    share a folder); other ranks: None. All ranks call it."""
    texts, images = gather_rows(embeddings.text), gather_rows(embeddings.image)
    rest = all_gather_object((embeddings.line_numbers, list(embeddings.skip_report.entries)))
    if rank != 0:
        return None
    return [Part(t, i, lines, skipped) for t, i, (lines, skipped) in zip(texts, images, rest)]


def _few(numbers, n=10):
    return ", ".join(map(str, numbers[:n])) + (" ..." if len(numbers) > n else "")


def merge_parts(parts, output_file, test_file):
    """Every rank's Part, checked to hold exactly the lines of `test_file` that were not skipped,
    as (text, image, line_numbers) in line order and a SkipReport of the skipped lines."""
    world = len(parts)
    report = SkipReport(os.fspath(test_file))
    for part in parts:
        report.entries += part.skipped
    lines = np.concatenate([p.line_numbers for p in parts])
    skipped = np.sort(np.asarray([n for p in parts for n, _ in p.skipped], np.int64))
    order = np.argsort(lines, kind="stable")
    expected = np.setdiff1d(np.arange(1, count_lines(test_file) + 1), skipped)
    if not np.array_equal(lines[order], expected):
        missing = np.setdiff1d(expected, lines).tolist()
        extra = np.setdiff1d(lines, expected).tolist()
        twice = len(lines) - len(np.unique(lines))
        raise RuntimeError(
            f"{output_file} not written: the {world} part(s) of this run hold {len(lines)} "
            f"line(s) of {test_file}, expected {len(expected)}"
            + (f"; missing lines {_few(missing)}" if missing else "")
            + (f"; lines not in the file {_few(extra)}" if extra else "")
            + (f"; {twice} line(s) embedded twice" if twice else "")
            + " (did the file change during the run?)")
    return (np.concatenate([p.text for p in parts])[order],
            np.concatenate([p.image for p in parts])[order], lines[order], report)

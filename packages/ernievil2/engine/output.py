"""One run at a time per output file, parts named per run, and a merge that checks completeness.

Rank 0 holds an exclusive lock on OUTPUT.lock (fcntl.flock, released by the OS if the process
dies) for the whole run, so a second run on the same output fails at once; holding it, rank 0
removes what a killed run left (parts, temporaries). Each rank's part is OUTPUT.part-RUN-RANK.npz
with a run id all ranks share, and the merge writes the output only when the parts hold exactly
the lines of the TSV that were not skipped.
"""
import contextlib
import fcntl
import glob
import logging
import os
import uuid

import numpy as np

from ..config import ConfigError
from ..data.tsv import SkipReport, count_lines
from ..fileio import TMP_MARK, atomic_path

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


def new_run_id():
    return uuid.uuid4().hex[:12]


def part_path(output_file, run_id, rank):
    return f"{output_file}.part-{run_id}-{rank}.npz"


def remove_leftovers(output_file):
    """Parts and temporaries of OUTPUT (and its sidecar) left by a killed or failed run; call
    only while holding the lock, when no other run can be writing them."""
    folder, base = os.path.split(os.path.abspath(output_file))
    b = glob.escape(base)
    patterns = [f"{b}.part-*.npz", f".{b}.part-*{TMP_MARK}*"]
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


def write_part(output_file, run_id, rank, embeddings):
    with atomic_path(part_path(output_file, run_id, rank)) as tmp:
        np.savez(tmp, text=embeddings.text, image=embeddings.image,
                 line_numbers=embeddings.line_numbers,
                 skipped=np.asarray([n for n, _ in embeddings.skip_report.entries], np.int64),
                 problems=np.asarray([p for _, p in embeddings.skip_report.entries], np.str_))


def _few(numbers, n=10):
    return ", ".join(map(str, numbers[:n])) + (" ..." if len(numbers) > n else "")


def merge_parts(output_file, run_id, world, test_file):
    """Rank 0: every rank's part of this run, checked to hold exactly the lines of `test_file`
    that were not skipped, as (text, image, line_numbers) in line order and a SkipReport of the
    skipped lines (all ranks). The parts are removed."""
    paths = [part_path(output_file, run_id, r) for r in range(world)]
    texts, images, lines, skipped = [], [], [], []
    report = SkipReport(os.fspath(test_file))
    for path in paths:
        with np.load(path) as part:
            texts.append(part["text"]), images.append(part["image"])
            lines.append(part["line_numbers"]), skipped.append(part["skipped"])
            report.entries += zip(part["skipped"].tolist(), part["problems"].tolist())
    lines, skipped = np.concatenate(lines), np.sort(np.concatenate(skipped))
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
    for path in paths:
        os.remove(path)
    return np.concatenate(texts)[order], np.concatenate(images)[order], lines[order], report

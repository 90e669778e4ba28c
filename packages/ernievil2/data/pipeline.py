"""Batches of decoded, preprocessed image-text pairs from a TSV file, prepared in parallel.

The file is read lazily in the consumer's thread (``tsv.iter_records``, this rank's lines only);
each batch's base64 decoding, image decoding, image transform and text encoding run as one task.

Why threads and not processes: cv2 (imdecode, resize) and the numpy arithmetic release the GIL,
and a thread hands its [B,3,224,224] float32 result back without pickling it. Measured on the
2-core dev machine, 400 Flickr8k JPEGs, batch 10, the official eval transform: serial ~550-680
img/s, 2 threads ~1150-1200 img/s, 2 forked processes ~360-440 img/s (slower than serial: each
batch's 6 MB result is pickled through a pipe). The callables must therefore be thread-safe
(pure functions of their input are).

Bounded memory: at most ``prefetch + num_workers`` batches are submitted and not yet handed to
the consumer; a new batch is only read from the file when one is taken. Order is the file order
in both modes, and errors surface in line order: if a batch holds a bad line, iteration raises
there, after every earlier batch was yielded, whatever the worker timing.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from .tsv import SHARDS, DataError, Record, SkipReport, iter_records, record_image_bytes


def image_key(image_bytes: bytes) -> bytes:
    """What makes two images the same image: their file bytes (never the id column, which the
    official reader ignores)."""
    return hashlib.blake2b(image_bytes, digest_size=16).digest()


@dataclass
class Batch:
    line_numbers: np.ndarray  # int64 [B], 1-based physical line numbers in the file
    image_ids: list[str]
    texts: list[str]
    images: np.ndarray  # float32 [B, 3, H, W]
    input_ids: np.ndarray  # int64 [B, L]
    tags: list[str | None]
    labels: list[str | None]  # the optional 5th (UniCL label) column
    image_keys: list[bytes]  # image_key of each line's image bytes: equal for equal images

    def __len__(self) -> int:
        return len(self.line_numbers)


class RecordProcessingError(RuntimeError):
    """A non-ValueError exception (most likely a bug in an injected callable) while preparing
    one line; the message starts with ``FILE:LINE:`` and the original is chained as __cause__.
    Never skipped by ``skip_bad_lines``: skipping every line because of a bug would hide it."""


@dataclass
class _BatchResult:
    batch: Batch | None  # None when every line of the batch was skipped
    skipped: list[DataError]


class _InlineExecutor:
    """Runs a task at submit time (num_workers=0), so both modes share one code path."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # delivered in order by Future.result(), like a worker's
            future.set_exception(e)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


class BatchLoader:
    """Iterable of ``Batch`` for this rank's lines of a TSV file (``shard``: "line" or "image",
    see ``tsv.iter_records``).

    ``decode_image(bytes) -> HWC uint8 RGB`` must raise ValueError on undecodable bytes;
    ``image_transform(HWC) -> CHW float32`` must give the same shape for every image;
    ``text_encoder(list[str]) -> int [B, L]``. A ValueError from decoding or transforming an
    image becomes ``DataError("FILE:LINE: ...")``; with ``skip_bad_lines`` the line is skipped
    instead (so a batch can be shorter than ``batch_size``; a batch with no line left is not
    yielded) and listed in ``skip_report``, a fresh ``SkipReport`` for each iteration.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        batch_size: int,
        image_transform: Callable[[np.ndarray], np.ndarray],
        text_encoder: Callable[[list[str]], np.ndarray],
        decode_image: Callable[[bytes], np.ndarray],
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        prefetch: int = 4,
        skip_bad_lines: bool = False,
        shard: str = "line",
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0 or prefetch < 0:
            raise ValueError(f"need num_workers >= 0 and prefetch >= 0, got {num_workers}, {prefetch}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if shard not in SHARDS:
            raise ValueError(f"shard must be one of {SHARDS}, got {shard!r}")
        self.path = os.fspath(path)
        self.batch_size = batch_size
        self.image_transform = image_transform
        self.text_encoder = text_encoder
        self.decode_image = decode_image
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.prefetch = prefetch
        self.skip_bad_lines = skip_bad_lines
        self.shard = shard
        self.skip_report = SkipReport(self.path)

    # -- iteration ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        report = SkipReport(self.path)
        self.skip_report = report
        chunks = self._record_chunks(report)
        if self.num_workers == 0:
            executor, max_in_flight = _InlineExecutor(), 1  # no read-ahead in-process
        else:
            executor = ThreadPoolExecutor(self.num_workers, thread_name_prefix="tsv-batch")
            max_in_flight = self.prefetch + self.num_workers
        in_flight: deque[Future] = deque()
        exhausted = False
        try:
            while True:
                while not exhausted and len(in_flight) < max_in_flight:
                    chunk = next(chunks, None)
                    if chunk is None:
                        exhausted = True
                    else:
                        in_flight.append(executor.submit(self._prepare, *chunk))
                if not in_flight:
                    return
                result: _BatchResult = in_flight.popleft().result()  # re-raises a worker's error
                for error in result.skipped:
                    report.add(error)
                if result.batch is not None:
                    yield result.batch
        finally:  # also runs when the consumer stops early or an error propagates
            executor.shutdown(wait=True, cancel_futures=True)
            chunks.close()  # closes the file now rather than at garbage collection

    def _record_chunks(self, report: SkipReport) -> Iterator[tuple[list[Record], DataError | None]]:
        """(records, reader error) per batch. A reader error (strict mode) ends the stream; it is
        raised by the task after the records read before it, so errors come out in line order."""
        records: list[Record] = []
        reader = iter_records(
            self.path, self.rank, self.world_size, skip_bad_lines=self.skip_bad_lines, report=report,
            shard=self.shard,
        )
        try:
            for record in reader:
                records.append(record)
                if len(records) == self.batch_size:
                    yield records, None
                    records = []
        except DataError as e:
            yield records, e
            return
        if records:
            yield records, None

    def _prepare(self, records: list[Record], reader_error: DataError | None) -> _BatchResult:
        kept: list[Record] = []
        images: list[np.ndarray] = []
        keys: list[bytes] = []
        done: dict[bytes, np.ndarray] = {}  # an image repeated in the batch is prepared once
        skipped: list[DataError] = []
        for record in records:
            try:
                raw = record_image_bytes(self.path, record)  # DataError on corrupt base64
                key = image_key(raw)
                image = done[key] if key in done else self._prepare_image(record, raw)
                done[key] = image
                if images and image.shape != images[0].shape:
                    raise DataError(
                        self.path, record.line_no,
                        f"transformed image has shape {image.shape}, line {kept[0].line_no} had "
                        f"{images[0].shape}",
                    )
            except DataError as e:
                if not self.skip_bad_lines:
                    raise
                skipped.append(e)
                continue
            kept.append(record)
            images.append(image)
            keys.append(key)
        if reader_error is not None:
            raise reader_error
        if not kept:
            return _BatchResult(None, skipped)
        texts = [r.text for r in kept]
        input_ids = np.asarray(self.text_encoder(texts), dtype=np.int64)
        if input_ids.ndim != 2 or input_ids.shape[0] != len(texts):
            raise ValueError(
                f"text_encoder returned shape {input_ids.shape} for {len(texts)} texts; need [B, L]"
            )
        batch = Batch(
            line_numbers=np.array([r.line_no for r in kept], dtype=np.int64),
            image_ids=[r.image_id for r in kept],
            texts=texts,
            images=np.stack(images),
            input_ids=input_ids,
            tags=[r.tags for r in kept],
            labels=[r.label for r in kept],
            image_keys=keys,
        )
        return _BatchResult(batch, skipped)

    def _prepare_image(self, record: Record, raw: bytes) -> np.ndarray:
        stage = "decode_image"
        try:
            image = self.decode_image(raw)
            stage = "image_transform"
            return np.asarray(self.image_transform(image), dtype=np.float32)
        except ValueError as e:  # the callables' contract for bad image data
            what = "undecodable image" if stage == "decode_image" else "image transform failed"
            raise DataError(self.path, record.line_no, f"{what}: {e}") from e
        except Exception as e:
            raise RecordProcessingError(
                f"{self.path}:{record.line_no}: {type(e).__name__} in {stage}: {e}"
            ) from e

"""Embed a TSV with both towers: the engine behind run_infer.sh.

Each process embeds its shard of lines with embed.embed, sharded by image (every line of one image
on one rank, so each distinct image goes through the image tower once in the whole run);
rank 0 receives every shard over the process group (output.py) and merges them in line order into
the official three-column output.
One run at a time per output file (see output.py); every file appears under its final name
complete (fileio), or not at all.
"""
import contextlib
import os
import time

from ..data.pipeline import BatchLoader
from ..data.tsv import DataError, count_lines
from ..device import select_device
from ..distributed import all_gather_object, barrier, init_distributed
from ..embed import build_towers, embed
from ..logging_utils import FILE_ONLY, setup_logging
from ..embeddings import write_embeddings
from ..transforms import decode_image, set_max_image_pixels
from .output import OutputBusyError, OutputLock, gather_parts, merge_parts, remove_leftovers


def _claim_output(output_file, rank):
    """Rank 0 locks the output (every rank gets the lock or None), or every rank raises
    OutputBusyError when another run holds the output."""
    lock, busy = None, None
    if rank == 0:
        lock = OutputLock(output_file)
        try:
            lock.acquire()
            remove_leftovers(output_file)
        except OutputBusyError as e:
            busy = str(e)
    busy = all_gather_object(busy)[0]
    if busy:
        raise OutputBusyError(busy)
    return lock


def _log_skipped(logger, report, log_path, shown=5):
    """The count and the first few skipped lines on the console; every one, with its reason, in
    the log file (on the console too when there is no log file)."""
    where = f"; every skipped line and its reason: {log_path}" if log_path else ""
    logger.warning("%s%s", report.summary(max_lines=shown), where)
    for line in report.details():
        logger.warning("skipped %s", line, extra={FILE_ONLY: bool(log_path)})


def run(cfg):
    rank, world = init_distributed()
    set_max_image_pixels(cfg.max_image_pixels)  # decode_image's limit, in this process's threads
    logger, log_path = setup_logging(cfg.log_dir, "infer.log", rank)
    place, amp = select_device(cfg.device, cfg.amp)
    logger.info("config: %s", dict(cfg), extra={FILE_ONLY: True})
    logger.info("device %s, %d process(es), amp %s, execution %s", place, world, amp, cfg.execution)
    if not os.path.isfile(cfg.test_file):
        raise FileNotFoundError(f"test_file not found: {cfg.test_file}")
    if count_lines(cfg.test_file) == 0:
        raise DataError(cfg.test_file, None, "no data lines (the file is empty): nothing to embed")
    if rank == 0:  # the only writer: other nodes need no output folder
        os.makedirs(os.path.dirname(os.path.abspath(cfg.output_file)), exist_ok=True)
    lock = _claim_output(cfg.output_file, rank)
    try:
        t0 = time.time()
        towers, transform, encode_texts = build_towers(cfg, place, amp, tagged_file=cfg.test_file)
        loader = BatchLoader(cfg.test_file, cfg.infer_batch_size, image_transform=transform,
                             text_encoder=encode_texts, decode_image=decode_image, rank=rank,
                             world_size=world, num_workers=cfg.num_workers, prefetch=cfg.prefetch,
                             skip_bad_lines=cfg.skip_bad_lines, shard="image")
        t_ready = time.time()
        emb = embed(towers, loader, progress=rank == 0, desc=f"embed[rank {rank}]")
        parts = gather_parts(emb, rank)
        t_done = time.time()  # after the gather: every rank is done (shares are not equal)
        if rank == 0:
            text, image, lines, skipped = merge_parts(parts, cfg.output_file, cfg.test_file)
            write_embeddings(cfg.output_file, text, image, lines, sidecar=cfg.write_sidecar)
            if skipped:
                _log_skipped(logger, skipped, log_path)
            rate = len(lines) / max(t_done - t_ready, 1e-9)
            logger.info("wrote %s: %d lines (%d skipped); start-up %.1fs, embedding %.1fs "
                        "(~%.2f lines/s over %d process(es))", cfg.output_file, len(lines),
                        skipped.count, t_ready - t0, t_done - t_ready, rate, world)
            if log_path:
                logger.info("log: %s", log_path)
        barrier()
    except BaseException:
        if lock is not None:  # no part of this failed run left behind (a full disk, a bad line)
            with contextlib.suppress(OSError):
                remove_leftovers(cfg.output_file)
        raise
    finally:
        if lock is not None:
            lock.release()

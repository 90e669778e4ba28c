"""Logs go to the console and to a file, one logger tree (`ernievil2`) for the whole library."""
import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FILE_ONLY = "file_only"  # logger.info(..., extra={FILE_ONLY: True}): the log file, not the console


def setup_logging(log_dir=None, filename="run.log", rank=0, level=logging.INFO):
    """Console for rank 0 (others log warnings only), a file per rank under `log_dir`."""
    logger = logging.getLogger("ernievil2")
    logger.setLevel(level)
    logger.propagate = False  # paddle configures the root logger; keep our format
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level if rank == 0 else logging.WARNING)
    console.setFormatter(logging.Formatter(FORMAT if rank == 0 else f"[rank {rank}] " + FORMAT))
    console.addFilter(lambda record: not getattr(record, FILE_ONLY, False))
    logger.addHandler(console)
    path = None
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        stem, ext = os.path.splitext(filename)
        path = os.path.join(log_dir, filename if rank == 0 else f"{stem}.rank{rank}{ext}")
        fh = logging.FileHandler(path, encoding="utf-8")
        fh.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(fh)
    return logger, path

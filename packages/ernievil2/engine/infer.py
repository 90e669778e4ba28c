"""Embed a TSV with both towers: the engine behind run_infer.sh.

Each process embeds its shard of lines (line i goes to rank (i-1) % world) with embed.embed and
writes a part file; rank 0 merges the parts in line order into the official three-column output.
Every file appears under its final name complete (fileio), or not at all.
"""
import logging
import os
import time

import numpy as np

from ..data.pipeline import BatchLoader
from ..device import select_device
from ..distributed import barrier, init_distributed
from ..embed import embed, model_towers
from ..export import predictor_towers
from ..factory import (create_model_and_transforms, create_tokenizer, create_transforms,
                       image_preprocess_spec, text_encoder)
from ..fileio import atomic_path
from ..logging_utils import setup_logging
from ..metrics.embeddings_io import write_embeddings
from ..transforms import decode_image

log = logging.getLogger("ernievil2.infer")


def build_towers(cfg, device="cpu", amp="none"):
    """(towers, eval image transform, text encoder) for the config's `execution`."""
    if cfg.execution == "inference":
        _, transform = create_transforms(cfg)
        tokenizer = create_tokenizer(cfg)
        towers = predictor_towers(cfg, device, amp)
    else:
        model, _, transform, tokenizer = create_model_and_transforms(cfg)
        towers = model_towers(model, amp, to_static=cfg.execution == "to_static",
                              image_size=image_preprocess_spec(cfg.image_model, cfg.image_size)[0],
                              input_dtype=cfg.input_dtype)
    return towers, transform, text_encoder(cfg, tokenizer)


def _part_path(output_file, rank):
    return f"{output_file}.part{rank}.npz"


def merge_parts(output_file, world, write_sidecar):
    """Rank 0: gather every rank's part, order by line number, write the output."""
    texts, images, lines, skipped = [], [], [], []
    for r in range(world):
        with np.load(_part_path(output_file, r)) as part:
            texts.append(part["text"]), images.append(part["image"])
            lines.append(part["line_numbers"]), skipped.append(part["skipped"])
    lines = np.concatenate(lines)
    order = np.argsort(lines, kind="stable")
    if len(np.unique(lines)) != len(lines):
        raise RuntimeError("internal error: a line was embedded by two ranks")
    write_embeddings(output_file, np.concatenate(texts)[order], np.concatenate(images)[order],
                     lines[order], sidecar=write_sidecar)
    for r in range(world):
        os.remove(_part_path(output_file, r))
    return len(lines), np.sort(np.concatenate(skipped)).tolist()


def run(cfg):
    rank, world = init_distributed()
    logger, log_path = setup_logging(cfg.log_dir, "infer.log", rank)
    place, amp = select_device(cfg.device, cfg.amp)
    logger.info("config: %s", dict(cfg))
    logger.info("device %s, %d process(es), amp %s, execution %s", place, world, amp, cfg.execution)
    if not os.path.isfile(cfg.test_file):
        raise FileNotFoundError(f"test_file not found: {cfg.test_file}")
    os.makedirs(os.path.dirname(os.path.abspath(cfg.output_file)), exist_ok=True)
    t0 = time.time()
    towers, transform, encode_texts = build_towers(cfg, place, amp)
    loader = BatchLoader(cfg.test_file, cfg.infer_batch_size, image_transform=transform,
                         text_encoder=encode_texts, decode_image=decode_image, rank=rank,
                         world_size=world, num_workers=cfg.num_workers, prefetch=cfg.prefetch,
                         skip_bad_lines=cfg.skip_bad_lines)
    t_ready = time.time()
    emb = embed(towers, loader, progress=rank == 0, desc=f"embed[rank {rank}]")
    t_done = time.time()
    report = emb.skip_report
    with atomic_path(_part_path(cfg.output_file, rank)) as tmp:
        np.savez(tmp, text=emb.text, image=emb.image, line_numbers=emb.line_numbers,
                 skipped=np.asarray(report.line_numbers, np.int64))
    if report:
        logger.warning("rank %d: %s", rank, report.summary())
    barrier()
    if rank == 0:
        n, all_skipped = merge_parts(cfg.output_file, world, cfg.write_sidecar)
        rate = len(emb.line_numbers) * world / max(t_done - t_ready, 1e-9)
        logger.info("wrote %s: %d lines (%d skipped%s); start-up %.1fs, embedding %.1fs "
                    "(~%.2f lines/s over %d process(es))", cfg.output_file, n, len(all_skipped),
                    (": lines " + ", ".join(map(str, all_skipped[:20])) +
                     (" ..." if len(all_skipped) > 20 else "")) if all_skipped else "",
                    t_ready - t0, t_done - t_ready, rate, world)
        if log_path:
            logger.info("log: %s", log_path)
    barrier()


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Embed a TSV (text \\t image_id \\t base64 image) with "
                                "ERNIE-ViL 2.0; the engine behind run_infer.sh.")
    p.add_argument("config", help="YAML config (official keys plus the project's; see README)")
    p.add_argument("overrides", nargs="*", help="key=value pairs overriding config keys")
    args = p.parse_args(argv)
    from ..cli import load_infer_config
    cfg = load_infer_config(args.config, args.overrides)
    run(cfg)

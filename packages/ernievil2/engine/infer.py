"""Embed a TSV with both towers: the engine behind run_infer.sh.

Each process embeds its shard of lines (line i goes to rank (i-1) % world), keeps the 1-based
line numbers, and writes a part file; rank 0 merges the parts in line order and writes the
official three-column output under a temporary name, renamed only when complete.
"""
import contextlib
import logging
import os
import time
from typing import Callable, NamedTuple

import numpy as np
import paddle
from paddle.static import InputSpec
from tqdm import tqdm

from ..checkpoint import load_checkpoint
from ..data.pipeline import BatchLoader
from ..device import select_device
from ..distributed import barrier, init_distributed
from ..export import ensure_export
from ..logging_utils import setup_logging
from ..embeddings import write_embeddings
from ..models.params import count_parameters
from ..models.factory import create_model, image_preprocess_spec
from ..tokenizer import ErnieTokenizer
from ..transforms import decode_image, make_eval_transform

log = logging.getLogger("ernievil2.infer")


def build_tokenizer(cfg):
    return ErnieTokenizer.from_file(
        cfg.vocab_file, max_seq_len=cfg.max_text_seqlen, pad_token=cfg.pad_token,
        cls_token=cfg.cls_token, sep_token=cfg.sep_token, mask_token=cfg.mask_token)


def build_preprocess(cfg):
    """The image transform and the text encoder (texts -> padded ids) of a config."""
    size, mean, std = image_preprocess_spec(cfg.image_model, cfg.image_size)
    transform = make_eval_transform(size, mean=mean, std=std)
    tokenizer = build_tokenizer(cfg)

    def encode_texts(texts):
        return tokenizer.batch_encode(texts, padding=cfg.text_padding).astype(cfg.input_dtype)

    return transform, encode_texts


def build_for_inference(cfg):
    """Model (eval mode, checkpoint loaded), image transform and text encoder from a config."""
    paddle.seed(cfg.seed)
    model = create_model(cfg.image_model, cfg.text_model_config, embed_dim=cfg.embed_dim,
                         image_size=cfg.image_size)
    if cfg.init_from_params:
        info = load_checkpoint(model, cfg.init_from_params)
        log.info("checkpoint %s: %s layout, %d tensors loaded", cfg.init_from_params,
                 info["layout"], info["loaded"])
    else:
        log.warning("init_from_params is empty: the model has RANDOM weights (seed %d)", cfg.seed)
    model.eval()
    log.info("parameters: image tower %s, text tower %s, total %s",
             f"{count_parameters(model.visual):,}", f"{count_parameters(model.text_model):,}",
             f"{count_parameters(model):,}")
    transform, encode_texts = build_preprocess(cfg)
    return model, transform, encode_texts


class Towers(NamedTuple):
    """The two encoders as numpy batch -> float32 [B, embed_dim] normalised embeddings."""
    encode_image: Callable[[np.ndarray], np.ndarray]
    encode_text: Callable[[np.ndarray], np.ndarray]
    embed_dim: int


def model_towers(cfg, model, amp="none"):
    """execution eager, or to_static: one compiled program per tower, dynamic in the batch size
    and the text length (without the input specs every new text length would be traced again)."""
    encode_image, encode_text = model.encode_image, model.encode_text
    if cfg.execution == "to_static":
        size = image_preprocess_spec(cfg.image_model, cfg.image_size)[0]
        encode_image = paddle.jit.to_static(
            encode_image, input_spec=[InputSpec([None, 3, size, size], "float32", "images")],
            full_graph=True)
        encode_text = paddle.jit.to_static(
            encode_text, input_spec=[InputSpec([None, None], cfg.input_dtype, "input_ids")],
            full_graph=True)

    def numpy_in_out(fn):
        def run(x):
            with paddle.no_grad(), _autocast(amp):
                return fn(paddle.to_tensor(x)).astype("float32").numpy()
        return run

    towers = Towers(numpy_in_out(encode_image), numpy_in_out(encode_text), model.embed_dim)
    if cfg.execution == "to_static":  # compile now (start-up), not in the first batch
        towers.encode_image(np.zeros([1, 3, size, size], np.float32))
        towers.encode_text(np.full([1, 2], cfg.cls_token, cfg.input_dtype))
    return towers


def inference_towers(cfg, place, amp, rank, world):
    """execution inference: the exported towers (see export.ensure_export) in Paddle Inference
    predictors; the model is only built when the export has to be made."""
    from ..deploy_encoder import TowerPredictor

    export_dir, meta = ensure_export(cfg, rank, barrier)
    # The processes of one machine share its cores; more math threads than cores is slower.
    local = int(os.environ.get("PADDLE_LOCAL_SIZE", world)) if world > 1 else 1
    threads = max(1, (os.cpu_count() or 1) // local)
    precision = {"none": "fp32", "fp16": "fp16", "bf16": "bf16"}[amp]
    tower = {t: TowerPredictor(os.path.join(export_dir, meta[t]["model"]),
                               os.path.join(export_dir, meta[t]["params"]), device=place,
                               num_threads=threads, precision=precision) for t in ("image", "text")}
    log.info("predictors on %s (%s, %d math thread(s)) from %s", place,
             "oneDNN" if place == "cpu" else precision, threads, export_dir)
    return Towers(tower["image"], tower["text"], int(meta["embed_dim"]))


def _autocast(amp):
    if amp == "none":
        return contextlib.nullcontext()
    return paddle.amp.auto_cast(level="O1", dtype="float16" if amp == "fp16" else "bfloat16")


def _part_path(output_file, rank):
    return f"{output_file}.part{rank}.npz"


def embed_shard(cfg, towers, transform, encode_texts, rank, world):
    loader = BatchLoader(cfg.test_file, cfg.infer_batch_size, image_transform=transform,
                         text_encoder=encode_texts, decode_image=decode_image, rank=rank,
                         world_size=world, num_workers=cfg.num_workers, prefetch=cfg.prefetch,
                         skip_bad_lines=cfg.skip_bad_lines)
    texts, images, lines = [], [], []
    bar = tqdm(total=loader.total_lines_for_rank, unit="lines", desc=f"embed[rank {rank}]",
               disable=rank != 0, dynamic_ncols=True)
    for batch in loader:
        images.append(towers.encode_image(batch.images))
        texts.append(towers.encode_text(batch.input_ids))
        lines.append(batch.line_numbers)
        bar.update(len(batch.line_numbers))
    if loader.skip_report:
        bar.update(loader.skip_report.count)  # skipped lines were read too
    bar.close()
    dim = towers.embed_dim
    cat = lambda xs, d: np.concatenate(xs) if xs else np.zeros((0, d), np.float32)  # noqa: E731
    skipped = loader.skip_report.line_numbers if loader.skip_report else []
    return (cat(texts, dim), cat(images, dim),
            np.concatenate(lines) if lines else np.zeros(0, np.int64), skipped, loader.skip_report)


def merge_parts(output_file, world, write_sidecar):
    """Rank 0: gather every rank's part, order by line number, write the output atomically."""
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
    out_dir = os.path.dirname(os.path.abspath(cfg.output_file))
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    if cfg.execution == "inference":
        transform, encode_texts = build_preprocess(cfg)
        towers = inference_towers(cfg, place, amp, rank, world)
    else:
        model, transform, encode_texts = build_for_inference(cfg)
        towers = model_towers(cfg, model, amp)
    t_ready = time.time()
    text, image, lines, skipped, report = embed_shard(cfg, towers, transform, encode_texts, rank,
                                                      world)
    t_done = time.time()
    part = _part_path(cfg.output_file, rank)
    tmp = part + ".tmp.npz"
    np.savez(tmp, text=text, image=image, line_numbers=lines, skipped=np.asarray(skipped, np.int64))
    os.replace(tmp, part)
    if report and report.count:
        logger.warning("rank %d: %s", rank, report.summary())
    barrier()
    if rank == 0:
        n, all_skipped = merge_parts(cfg.output_file, world, cfg.write_sidecar)
        rate = len(lines) * world / max(t_done - t_ready, 1e-9)
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

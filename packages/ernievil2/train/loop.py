"""run_train.sh's engine, to read top to bottom like open_clip's main: `train(cfg)` makes the
parts with the build_* functions (model with its temperatures, data, loss, run), then
`train_loop` runs `train_one_step` to max_steps with logs, validation and checkpoints at fixed
step intervals; the run around it (output_dir, resume, final model, signals) is train/runs.py."""
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import paddle
from tqdm import tqdm

from ..checkpoint import load_checkpoint
from ..config import ConfigError
from ..data.tsv import DataError
from ..device import select_device
from ..distributed import all_reduce_gradients, barrier, init_distributed
from ..factory import check_vocab_fits, create_model, create_tokenizer, create_transforms
from ..logging_utils import FILE_ONLY, setup_logging
from ..losses import ContrastivePair, MultiViewContrastiveLoss
from ..models.dual_encoder import OFFICIAL_TEMPERATURE_B, level_view, temperature_name
from ..models.params import count_parameters
from ..precision import autocast
from ..tagging import image_tags_for
from ..transforms import set_max_image_pixels
from . import checkpointing as ckpt
from .data import (EpochSampler, MixedSampler, MultiViewBatcher, TrainIndex, TrainSources,
                   label_prompts, sources_of)
from .ema import ModelEMA
from .feature_cache import ImageFeatureCache, LevelTower
from .gradcache import freeze_batchnorm_stats, gradcache_step
from .optim import build_optimizer, freeze, lr_at
from .prepare import embed_after_training, prepare
from .runs import (Interrupted, StopSignals, agree, eval_weights, log_estimate,
                   prepare_output_dir, resume_latest, save_step, write_final)
from .validate import ZeroShotTask, validate, validate_zeroshot, zeroshot_task

log = logging.getLogger("ernievil2.train")
IMAGE_VIEWS = ("image", "image_aug")


@dataclass
class Data:
    views: List[str]  # sorted: the order views are encoded in (GradCache replays it)
    index: TrainSources
    sampler: Any  # EpochSampler, or MixedSampler for several files
    batcher: MultiViewBatcher
    tokenizer: Any
    train_transform: Callable
    eval_transform: Callable
    zeroshot: Optional[ZeroShotTask] = None  # val_zeroshot_file's images, classes, templates
    val_tags: Optional[Callable] = None  # visual concepts: val_file's tags (made at first use)


@dataclass
class Run:
    """Everything a step needs, made once by train()."""
    cfg: Any
    rank: int
    world: int
    model: Any
    loss: MultiViewContrastiveLoss
    optimizer: Any
    params: List[Any]  # trainable parameters (their gradients are averaged over processes)
    views: List[str]
    micro: int  # GradCache micro-batch, 0 = off
    scaler: Optional[Any]
    ema: Optional[ModelEMA]
    freeze_bn: bool
    device: str = "cpu"
    encoders: Dict[str, Callable] = None
    step: int = 0
    best: Dict[str, Any] = None
    last_save: float = 0.0  # time.time() of the last checkpoint (save_every_minutes)


# ------------------------------------------------------------------------------------- build
def configured_pairs(cfg):
    """The configured view pairs, then the image-text pair of each level below the top
    (hierarchical_layers)."""
    pairs = [ContrastivePair(a, b, float(w)) for a, b, w in cfg.views]
    levels = cfg.hierarchical_layers
    if levels > 1:
        top = next(float(w) for a, b, w in cfg.views if {a, b} == {"image", "text"})
        weights = cfg.hierarchical_weights or [top] * (levels - 1)
        pairs += [ContrastivePair(level_view("image", i), level_view("text", i), float(weights[i - 1]))
                  for i in range(1, levels)]
    return pairs


def build_model(cfg):
    """The dual encoder with a temperature for every configured pair, weights from
    init_from_params / init_image_tower, towers frozen as configured. Temperatures live on the
    model (models/dual_encoder.py): image-text under its official name, the other configured
    pairs under `train_heads.`."""
    model = create_model(cfg, load_weights=False)  # seeded: the same weights on every process
    if cfg.hierarchical_layers > 1:
        try:
            model.add_level_heads(cfg.hierarchical_layers)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    pairs = configured_pairs(cfg)
    model.add_temperatures(pairs)
    from_checkpoint = set()
    if cfg.init_from_params and cfg.init_image_tower:
        log.warning("init_from_params and init_image_tower both set: the image tower comes from "
                    "init_image_tower (%s), the rest from init_from_params (%s)",
                    cfg.init_image_tower, cfg.init_from_params)
    if cfg.init_from_params:
        info = load_checkpoint(model, cfg.init_from_params, training=True)
        from_checkpoint = set(model.state_dict()) - set(info["initialised"])
        log.info("initialised from %s (%s layout)", cfg.init_from_params, info["layout"])
    if cfg.init_image_tower:
        info = load_checkpoint(model, cfg.init_image_tower, prefix_filter="visual.")
        log.info("image tower initialised from %s (%d tensors)", cfg.init_image_tower, info["loaded"])
    init_temperatures(model, pairs, cfg.init_logit_scale, from_checkpoint)
    if cfg.freeze_image_tower:
        freeze(model.visual)
    if cfg.freeze_text_tower:
        freeze(model.text_model)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    return model


def init_temperatures(model, pairs, init_logit_scale, from_checkpoint):
    """init_logit_scale (None = not set in the config) for the pairs' temperatures that did not
    come from a checkpoint (no init_from_params, or the checkpoint lacks them); a value the config
    sets applies to all of them. Otherwise the checkpoint's value is kept."""
    value = OFFICIAL_TEMPERATURE_B if init_logit_scale is None else init_logit_scale
    for a, b, _ in pairs:
        name = temperature_name(a, b)
        if init_logit_scale is None and name in from_checkpoint:
            source = "init_from_params"
        else:
            model.temperature(a, b).set_value(paddle.full([1], value, "float32"))
            source = "init_logit_scale"
        log.info("temperature %s = %.5f (%s)", name, model.temperature(a, b).item(), source)


def build_data(cfg, model, rank, world):
    views = sorted({v for p in cfg.views for v in p[:2]})
    # visual concepts read each image's tags (column 4), whether or not the tags view is trained
    read = sorted(set(views) | ({"tags"} if model.uses_tags else set()))
    tokenizer = create_tokenizer(cfg)
    check_vocab_fits(tokenizer, model, cfg.vocab_file)
    train_tf, eval_tf = create_transforms(cfg)
    sources = sources_of(cfg)
    prompts = label_prompts(cfg, sources)
    text_labels = "unicl_key: label" if cfg.targets == "unicl" and cfg.unicl_key == "label" else ""
    index = TrainSources(
        [TrainIndex(s.path, need_tags="tags" in read and s.kind == "text",
                    need_labels="an image-label file" if s.kind == "label" else text_labels)
         for s in sources],
        [s.weight for s in sources], [s.kind for s in sources],
        resolve=prompts.resolve if prompts else None, unicl_key=cfg.unicl_key)
    if cfg.val_file:  # validation first runs after val_every steps: check its file now
        TrainIndex(cfg.val_file, kind="validation")
    zeroshot = zeroshot_task(cfg)
    cap_batch_size(cfg, len(index), world)
    sampler = (EpochSampler(len(index), cfg.batch_size, cfg.seed) if len(sources) == 1 else
               MixedSampler(index.sizes, index.weights, cfg.batch_size, cfg.seed))
    batcher = MultiViewBatcher(index, read, tokenizer, train_tf, eval_tf, cfg.seed, rank, world,
                               cfg.text_aug, cfg.text_mask_prob, cfg.augment, cfg.num_workers,
                               id_source=cfg.unicl_key, prompts=prompts)
    return Data(views, index, sampler, batcher, tokenizer, train_tf, eval_tf, zeroshot)


def cap_batch_size(cfg, lines, world):
    """A batch_size over the number of training lines becomes that number (a multiple of the
    process count), with a warning."""
    if cfg.batch_size <= lines:
        return
    capped = lines - lines % world
    if not capped:
        raise DataError(cfg.train_file, 1, f"{lines} training line(s), fewer than the {world} processes")
    log.warning("batch_size %d is larger than the %d training lines of %s: using batch_size %d",
                cfg.batch_size, lines, ", ".join(s.path for s in sources_of(cfg)), capped)
    cfg["batch_size"] = capped


def build_loss(cfg):
    return MultiViewContrastiveLoss(configured_pairs(cfg), targets=cfg.targets)


def has_batchnorm(layer):
    return any(isinstance(m, (paddle.nn.layer.norm._BatchNormBase, paddle.nn.BatchNorm))
               for m in layer.sublayers())


def build_scaler(amp, micro):
    """fp16 needs loss scaling; GradCache's separate backward passes do not use it (use bf16)."""
    return paddle.amp.GradScaler(init_loss_scaling=2.0 ** 15) if amp == "fp16" and not micro else None


def build_encoders(model, views, amp, cached_images, levels=1):
    """view -> callable(the view's input) -> float32 features; with an image feature cache the
    image views are the cached tower outputs and only the projection heads run. The image input
    is (pixels or features, tag ids) when the model embeds visual concepts. With levels > 1 the
    image and text views return {feature name: features} for every level (image, image_h1, ...)."""
    def wrap(encode, view, n):
        def run(x):
            args = x if isinstance(x, tuple) else (x,)
            with autocast(amp):
                out = encode(*[paddle.to_tensor(a) for a in args], n)
            out = [o.astype("float32") for o in out]  # the loss runs in fp32
            return out[0] if n == 1 else {level_view(view, i): o for i, o in enumerate(out)}
        return run

    def image_fn(x, *rest):
        n = rest[-1]
        tags = rest[0] if len(rest) == 2 else None
        if cached_images:  # the cache holds every level (top first): keep the first n
            return model.project_image_levels(x[..., :sum(widths[:n])], n, tags)
        return model.encode_image_levels(x, n, tags)

    widths = model.visual.level_widths(levels)
    encoders = {}
    for v in views:
        n = levels if v in ("image", "text") else 1
        encoders[v] = wrap(image_fn if v in IMAGE_VIEWS else model.encode_text_levels, v, n)
    return encoders


def step_inputs(run, batch):
    """view -> encoder input: the batch's array, or (array, tag ids) for an image view of a model
    that embeds visual concepts."""
    tags = run.model.uses_tags
    return {v: (batch[v], batch["tags"]) if tags and v in IMAGE_VIEWS else batch[v]
            for v in run.views}


def flat_features(outputs):
    """{view: features or {feature name: features}} -> {feature name: features}."""
    flat = {}
    for view, out in outputs.items():
        flat.update(out if isinstance(out, dict) else {view: out})
    return flat


def build_feature_cache(cfg, model, data, rank, world):
    """The frozen image tower's features on K fixed views of every training image (one cache
    per training file, stacked in the order of TrainSources' global image index)."""
    cache_seed = cfg.seed if cfg.image_feature_cache_seed is None else cfg.image_feature_cache_seed
    if model.uses_tags and model.concepts_at_cls:
        raise ConfigError("visual_concepts: embed with a ViT adds the concepts at the tower's input, "
                          "so its features cannot be cached: set image_feature_cache: 0")
    levels = cfg.hierarchical_layers
    tower = model.visual if levels == 1 else LevelTower(model.visual, levels)
    caches = [ImageFeatureCache.load_or_build(
        cfg.image_feature_cache_dir, tower, index, cfg.image_feature_cache,
        data.train_transform, data.eval_transform, cache_seed, rank, world,
        batch_size=cfg.val_batch_size, pool=data.batcher.pool) for index in data.index.indexes]
    cache = caches[0] if len(caches) == 1 else ImageFeatureCache(
        np.concatenate([c.features for c in caches]))
    data.batcher.cache = cache
    return cache


def build_run(cfg, rank, world, device, amp, model, data):
    """Loss, optimizer, loss scaler, EMA and the step settings around the model."""
    local_batch = cfg.batch_size // world
    micro = cfg.micro_batch_size if 0 < cfg.micro_batch_size < local_batch else 0
    optimizer, decayed = build_optimizer(model, cfg)
    run = Run(cfg=cfg, rank=rank, world=world, model=model, loss=build_loss(cfg),
              optimizer=optimizer, params=[p for p in model.parameters() if not p.stop_gradient],
              views=data.views, micro=micro, scaler=build_scaler(amp, micro),
              ema=ModelEMA(model, cfg.ema_decay) if cfg.ema_decay else None,
              freeze_bn=cfg.freeze_bn_stats is True or (
                  cfg.freeze_bn_stats == "auto" and bool(micro) and has_batchnorm(model.visual)),
              device=device, best={"step": None, "score": -1.0}, last_save=time.time())
    log.info("config: %s", dict(cfg), extra={FILE_ONLY: True})
    log.info("%d process(es); global batch %d (%d per process%s); views %s; pairs %s; targets %s",
             world, cfg.batch_size, local_batch, f", GradCache micro-batch {micro}" if micro else "",
             data.views, [p.key for p in run.loss.pairs], cfg.targets)
    log.info("parameters: image %s, text %s, trainable %s (%d decayed tensors); %d training "
             "lines, %d steps per epoch; BN statistics %s", f"{count_parameters(model.visual):,}",
             f"{count_parameters(model.text_model):,}", f"{sum(p.size for p in run.params):,}",
             len(decayed), len(data.index), data.sampler.steps_per_epoch,
             "frozen" if run.freeze_bn else "batch")
    if len(data.index.indexes) > 1:
        log.info("training files mixed by weight: %s", "; ".join(
            f"{ix.path} ({kind}, {len(ix)} lines, weight {w:g})" for ix, kind, w
            in zip(data.index.indexes, data.index.kinds, data.index.weights)))
    return run


def check_config(cfg, world):
    if cfg.overwrite and cfg.resume:
        raise ConfigError("overwrite=true and resume exclude each other: resume continues the run "
                          "in output_dir, overwrite deletes it")
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by {world} processes")
    if cfg.image_feature_cache and not cfg.freeze_image_tower:
        raise ConfigError("image_feature_cache needs freeze_image_tower: true (a trained tower's "
                          "features change every step, so they cannot be cached)")
    if cfg.visual_concepts == "embed" and cfg.val_zeroshot_file:
        raise ConfigError("val_zeroshot_file with visual_concepts: embed: zero-shot validation "
                          "does not give the image tower its tags yet")
    levels, weights = cfg.hierarchical_layers, cfg.hierarchical_weights
    if levels > 1 and not any({a, b} == {"image", "text"} for a, b, _ in cfg.views):
        raise ConfigError("hierarchical_layers > 1 needs the [image, text] pair in views")
    if weights is not None and len(weights) != levels - 1:
        raise ConfigError(f"hierarchical_weights has {len(weights)} number(s); hierarchical_layers "
                          f"{levels} needs {levels - 1} (one per level below the top)")


# -------------------------------------------------------------------------------------- step
def set_train_modes(run):
    run.model.train()
    if run.cfg.freeze_image_tower:
        run.model.visual.eval()
    if run.cfg.freeze_text_tower:
        run.model.text_model.eval()
    if run.freeze_bn:
        freeze_batchnorm_stats(run.model.visual)


def train_one_step(run, batch):
    """Forward, backward, gradient average, optimizer step, temperature clamp, EMA update.

    Every process encodes its slice of the global batch (all views), whole or in GradCache
    micro-batches; the loss contrasts its rows against every process's features (gathered with
    gradient) at the model's logit scales; gradients are averaged over processes."""
    cfg, model = run.cfg, run.model
    ids = paddle.to_tensor(batch["ids"])

    def loss_fn(features):
        return run.loss(features, model.logit_scales(run.loss.pairs, cfg.max_logit_scale), ids=ids)

    inputs = step_inputs(run, batch)
    if run.micro:
        info = gradcache_step(run.encoders, loss_fn, inputs, run.micro)
    else:
        total, parts = loss_fn(flat_features({v: run.encoders[v](x) for v, x in inputs.items()}))
        (run.scaler.scale(total) if run.scaler else total).backward()
        info = {"loss": float(total), **{k: float(v) for k, v in parts.items()}}
    if run.world > 1:
        all_reduce_gradients(run.params, average=True)  # linear: fine on scaled gradients
    if run.scaler:
        run.scaler.step(run.optimizer)  # unscales, skips the step on inf/nan
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.clear_grad()
    model.clamp_temperatures_(cfg.max_logit_scale)
    if run.ema is not None:
        run.ema.update()
    return info


# ------------------------------------------------------------------------ logs, validation
def append_record(run, record):
    """train.jsonl: one JSON line per log step (an append-only log, read while training runs)."""
    if run.rank == 0:
        with open(os.path.join(run.cfg.output_dir, "train.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def log_step(run, epoch, info, samples_per_s):
    lr = lr_at(run.step - 1, run.cfg)
    append_record(run, {"step": run.step, "epoch": epoch, "lr": lr, "samples_per_s": samples_per_s,
                        **info})
    scales = " ".join(f"{k.split('/', 1)[1]}={v:.2f}" for k, v in info.items()
                      if k.startswith("logit_scale/"))
    losses = " ".join(f"{k.split('/', 1)[1]}={v:.4f}" for k, v in info.items()
                      if k.startswith("loss/"))
    log.info("step %d/%d loss %.4f [%s] lr %.2e scales [%s] %.1f samples/s", run.step,
             run.cfg.max_steps, info["loss"], losses, lr, scales, samples_per_s)


def run_validation(run, data):
    """Rank 0 scores val_file (retrieval) and val_zeroshot_file (zero-shot classification, under
    "zeroshot"); returns the result (None elsewhere or without either)."""
    if not (run.cfg.val_file or data.zeroshot):
        return None
    result = None
    if run.rank == 0:
        result, figures = {}, []

        def encode_texts(texts):
            return data.tokenizer.batch_encode(texts, padding="longest")
        if run.cfg.val_file and run.model.uses_tags and data.val_tags is None:
            data.val_tags = image_tags_for(run.cfg, run.cfg.val_file, data.tokenizer)
        with eval_weights(run):
            if run.cfg.val_file:
                result = validate(run.model, run.cfg.val_file, data.eval_transform, encode_texts,
                                  run.cfg.val_batch_size, run.cfg.num_workers, data.val_tags)
                official, multi = (both_figures(result, p) for p in ("official", "multi_caption"))
                figures.append(f"mean recall {official} (official protocol), {multi} (multi-caption)")
            if data.zeroshot:
                zs = result["zeroshot"] = validate_zeroshot(
                    run.model, data.zeroshot, data.eval_transform, encode_texts,
                    run.cfg.val_batch_size, run.cfg.num_workers)
                figures.append(f"zero-shot top-1 {zs['top1']:.2f} top-5 {zs['top5']:.2f} (chance "
                               f"{zs['chance_top1']:.2f} / {zs['chance_top5']:.2f}, "
                               f"{zs['images']} images)")
        log.info("step %d validation: %s", run.step, "; ".join(figures))
        append_record(run, {"step": run.step, "validation": result})
    barrier()
    set_train_modes(run)
    return result


def both_figures(result, protocol):
    """'61.20', or '61.20 (pessimistic 40.10)' when ties make the two figures differ."""
    opt = result[protocol]["MeanRecall"]["meanRecall"]
    pes = result[protocol + "_pessimistic"]["MeanRecall"]["meanRecall"]
    return f"{opt:.2f}" if round(opt, 2) == round(pes, 2) else f"{opt:.2f} (pessimistic {pes:.2f})"


def update_best(run, val):
    """The best step by the pessimistic multi-caption mean recall: ties count against the model,
    so collapsed embeddings (all equal, optimistic recall 100) never become the best. Without
    val_file, by the zero-shot top-1."""
    if val is not None:
        score = (val["multi_caption_pessimistic"]["MeanRecall"]["meanRecall"]
                 if "multi_caption_pessimistic" in val else val["zeroshot"]["top1"])
        if score > run.best["score"]:
            run.best = {"step": run.step, "score": score}


# ------------------------------------------------------------------------------------- train
def train_loop(run, data, signals):
    """Steps from run.step to max_steps, with logs, validation and checkpoints; raises
    Interrupted after the checkpoint of the step a signal arrived in."""
    cfg = run.cfg
    set_train_modes(run)
    bar = tqdm(total=cfg.max_steps, initial=run.step, unit="step", disable=run.rank != 0,
               desc="train", dynamic_ncols=True)
    t_last, samples, first = time.time(), 0, run.step
    while run.step < cfg.max_steps:
        t_step = time.time()
        epoch, rows = data.sampler.rows(run.step)
        batch = data.batcher.batch(epoch, rows)
        run.optimizer.set_lr(lr_at(run.step, cfg))
        info = train_one_step(run, batch)
        run.step += 1
        if run.step == first + 2:
            log_estimate(run, time.time() - t_step)
        samples += cfg.batch_size
        bar.update()
        last = run.step == cfg.max_steps
        if run.step % cfg.log_every == 0 or last:
            log_step(run, data.sampler.epoch(run.step - 1), info,
                     samples / max(time.time() - t_last, 1e-9))
            bar.set_postfix(loss=f"{info['loss']:.4f}")
            t_last, samples = time.time(), 0
        val = run_validation(run, data) if run.step % cfg.val_every == 0 or last else None
        stop, timed = agree(run, signals.signum)
        if run.step % cfg.save_every == 0 or last or timed or stop:
            update_best(run, val)
            save_step(run)
        if stop and not last:
            bar.close()
            raise Interrupted(stop, run.step, ckpt.step_dir(cfg.output_dir, run.step))
    bar.close()


def train(cfg):
    """Train as `cfg` (a loaded training config) says; rank 0 writes output_dir. A signal ends
    the process after its checkpoint (exit status 128 + the signal: 130 for Ctrl-C)."""
    rank, world = init_distributed()
    set_max_image_pixels(cfg.max_image_pixels)
    check_config(cfg, world)
    deleted = prepare_output_dir(cfg)
    setup_logging(cfg.log_dir or cfg.output_dir, "train.log", rank)
    if deleted:
        log.warning("overwrite: deleted %s from %s", ", ".join(deleted), cfg.output_dir)
    cfg = prepare(cfg)  # computed object tags, vocab_file auto, embed_file
    device, amp = select_device(cfg.device, cfg.amp)
    model = build_model(cfg)
    data = build_data(cfg, model, rank, world)
    try:
        with StopSignals() as signals:
            run = build_run(cfg, rank, world, device, amp, model, data)
            paddle.seed(cfg.seed * 1000 + rank + 1)  # dropout differs across processes
            resume_latest(run, ckpt.resume_candidates(cfg.resume, cfg.output_dir))
            cached = bool(cfg.image_feature_cache) and any(v in IMAGE_VIEWS for v in data.views)
            if cached:  # after any resume: the cache must hold the features of the tower trained
                build_feature_cache(cfg, model, data, rank, world)
            run.encoders = build_encoders(model, data.views, amp, cached, cfg.hierarchical_layers)
            train_loop(run, data, signals)
            write_final(run)
    except Interrupted as e:
        log.warning("%s", e)
        sys.exit(e.exit_code)
    finally:
        data.batcher.close()
    barrier()
    embed_after_training(cfg)

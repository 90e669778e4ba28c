"""run_train.sh's engine: multi-view contrastive training of the dual encoder.

`train(cfg)` reads like open_clip's main: the build_* functions make the parts, then the loop runs
`train_one_step` with logs, validation and checkpoints at fixed step intervals; `resume`
continues a run exactly.

One step: every process builds its slice of the global batch (all views) and encodes it (whole,
or in GradCache micro-batches); the loss contrasts its rows against every process's features
(gathered with gradient) at the model's logit scales; gradients are averaged over processes,
AdamW steps, and the model clamps its temperatures.

Temperatures live on the model (models/dual_encoder.py): image-text under its official name, the
other configured pairs under `train_heads.`. `init_logit_scale` sets a configured pair's
temperature only where it starts at random (no init_from_params, or the checkpoint lacks it), or
everywhere when the config sets it; otherwise the checkpoint's value is kept.

output_dir holds one run: a new run refuses a used one (resume continues it, overwrite=true
empties it first). SIGINT/SIGTERM save a checkpoint at the end of the current step and exit;
`save_every_minutes` adds checkpoints by the clock. Both are decided the same on every process
(any process's signal stops all; rank 0's clock decides the timed saves).
"""
import contextlib
import json
import logging
import os
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import paddle
import yaml
from tqdm import tqdm

from ..checkpoint import (UnreadableCheckpoint, inference_state_dict, load_checkpoint,
                          save_state_dict)
from ..config import ConfigError
from ..data.tsv import DataError
from ..device import select_device
from ..distributed import all_gather_object, all_reduce_gradients, barrier, init_distributed
from ..factory import check_vocab_fits, create_model, create_tokenizer, create_transforms
from ..fileio import atomic_write
from ..keys import INFER_KEYS
from ..logging_utils import FILE_ONLY, setup_logging
from ..losses import ContrastivePair, MultiViewContrastiveLoss
from ..models.dual_encoder import OFFICIAL_TEMPERATURE_B, temperature_name
from ..models.ernie import load_ernie_config
from ..models.params import count_parameters
from ..precision import autocast
from ..transforms import set_max_image_pixels
from . import checkpointing as ckpt
from .data import EpochSampler, MultiViewBatcher, TrainIndex
from .ema import ModelEMA
from .feature_cache import ImageFeatureCache
from .gradcache import freeze_batchnorm_stats, get_rng_states, gradcache_step, set_rng_states
from .optim import build_optimizer, freeze, lr_at
from .prepare import embed_after_training, prepare
from .validate import validate

log = logging.getLogger("ernievil2.train")
IMAGE_VIEWS = ("image", "image_aug")
# Keys of the final infer.yaml that name files: written absolute, so it works from any directory.
PATH_KEYS = ("vocab_file", "text_model_config", "test_file", "output_file", "init_from_params",
             "log_dir", "export_dir")
# The keys a checkpoint's model and optimizer state depend on: a resume must have the same values.
RESUME_KEYS = ("image_model", "image_size", "embed_dim", "text_model_config", "max_text_seqlen",
               "views", "targets", "unicl_key", "batch_size", "freeze_image_tower",
               "freeze_text_tower")
# A model this size trains for days on a CPU (ViT-B/16 + ERNIE base has 204M parameters).
CPU_HINT_PARAMETERS = 50_000_000
CPU_RECIPE = "packages/configs/flickr8k_cn_lite0.yaml"


@dataclass
class Data:
    views: List[str]  # sorted: the order views are encoded in (GradCache replays it)
    index: TrainIndex
    sampler: EpochSampler
    batcher: MultiViewBatcher
    tokenizer: Any
    train_transform: Callable
    eval_transform: Callable


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
    return [ContrastivePair(a, b, float(w)) for a, b, w in cfg.views]


def build_model(cfg):
    """The dual encoder with a temperature for every configured pair, weights from
    init_from_params / init_image_tower, towers frozen as configured."""
    model = create_model(cfg, load_weights=False)  # seeded: the same weights on every process
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
    come from a checkpoint; a value the config sets applies to all of them."""
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
    tokenizer = create_tokenizer(cfg)
    check_vocab_fits(tokenizer, model, cfg.vocab_file)
    train_tf, eval_tf = create_transforms(cfg)
    index = TrainIndex(cfg.train_file, need_tags="tags" in views,
                       need_labels=cfg.targets == "unicl" and cfg.unicl_key == "label")
    if cfg.val_file:  # validation first runs after val_every steps: check its file now
        TrainIndex(cfg.val_file, kind="validation")
    cap_batch_size(cfg, len(index), world)
    sampler = EpochSampler(len(index), cfg.batch_size, cfg.seed)
    batcher = MultiViewBatcher(index, views, tokenizer, train_tf, eval_tf, cfg.seed, rank, world,
                               cfg.text_aug, cfg.text_mask_prob, cfg.augment, cfg.num_workers,
                               id_source=cfg.unicl_key)
    return Data(views, index, sampler, batcher, tokenizer, train_tf, eval_tf)


def cap_batch_size(cfg, lines, world):
    """A batch_size over the number of training lines becomes that number (a multiple of the
    process count), with a warning."""
    if cfg.batch_size <= lines:
        return
    capped = lines - lines % world
    if not capped:
        raise DataError(cfg.train_file, 1, f"{lines} training line(s), fewer than the {world} processes")
    log.warning("batch_size %d is larger than the %d training lines of %s: using batch_size %d",
                cfg.batch_size, lines, cfg.train_file, capped)
    cfg["batch_size"] = capped


def build_loss(cfg):
    return MultiViewContrastiveLoss(configured_pairs(cfg), targets=cfg.targets)


def has_batchnorm(layer):
    return any(isinstance(m, (paddle.nn.layer.norm._BatchNormBase, paddle.nn.BatchNorm))
               for m in layer.sublayers())


def build_scaler(amp, micro):
    """fp16 needs loss scaling; GradCache's separate backward passes do not use it (use bf16)."""
    return paddle.amp.GradScaler(init_loss_scaling=2.0 ** 15) if amp == "fp16" and not micro else None


def build_encoders(model, views, amp, cached_images):
    """view -> callable(numpy batch) -> float32 features; with an image feature cache the image
    views are the cached tower outputs and only the projection head runs."""
    def wrap(encode):
        def run(x):
            with autocast(amp):
                out = encode(paddle.to_tensor(x))
            return out.astype("float32")  # the loss runs in fp32
        return run
    encode_image = wrap(model.project_image if cached_images else model.encode_image)
    encode_text = wrap(model.encode_text)
    return {v: encode_image if v in IMAGE_VIEWS else encode_text for v in views}


def build_feature_cache(cfg, model, data, rank, world):
    """The frozen image tower's features on K fixed views of every training image."""
    cache_seed = cfg.seed if cfg.image_feature_cache_seed is None else cfg.image_feature_cache_seed
    cache = ImageFeatureCache.load_or_build(
        cfg.image_feature_cache_dir, model.visual, data.index, cfg.image_feature_cache,
        data.train_transform, data.eval_transform, cache_seed, rank, world,
        batch_size=cfg.val_batch_size, pool=data.batcher.pool)
    data.batcher.cache = cache
    return cache


def check_config(cfg, world):
    if cfg.overwrite and cfg.resume:
        raise ConfigError("overwrite=true and resume exclude each other: resume continues the run "
                          "in output_dir, overwrite deletes it")
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by {world} processes")
    if cfg.image_feature_cache and not cfg.freeze_image_tower:
        raise ConfigError("image_feature_cache needs freeze_image_tower: true (a trained tower's "
                          "features change every step, so they cannot be cached)")


def run_entries(cfg, with_logs=False):
    """What output_dir holds besides the launcher's folder of this run (when log_dir is
    output_dir) and, unless with_logs, the train.log files: a previous run's files."""
    if not os.path.isdir(cfg.output_dir):
        return []
    launcher = os.path.abspath(os.environ.get("LAUNCH_LOG_DIR") or os.path.join(cfg.log_dir, "launch"))
    same_logs = os.path.abspath(cfg.log_dir or cfg.output_dir) == os.path.abspath(cfg.output_dir)
    return sorted(name for name in os.listdir(cfg.output_dir)
                  if os.path.abspath(os.path.join(cfg.output_dir, name)) != launcher
                  and (with_logs or not (same_logs and name.startswith("train.")
                                         and name.endswith(".log"))))


def prepare_output_dir(cfg, rank):
    """A new run needs an unused output_dir: two runs in one folder would mix their checkpoints,
    final model and train.jsonl (and resume=auto would pick the other run's step). resume
    continues the run there; overwrite=true empties it first. Returns what was deleted."""
    used = run_entries(cfg)
    if used and not cfg.resume and not cfg.overwrite:
        shown = ", ".join(used[:4]) + (", ..." if len(used) > 4 else "")
        raise ConfigError(f"output_dir {cfg.output_dir} is not empty ({shown}): continue its run "
                          f"with resume=auto, replace it with overwrite=true, or choose another "
                          f"output_dir")
    barrier()  # every process looked before rank 0 deletes anything
    if cfg.overwrite and rank == 0:
        used = run_entries(cfg, with_logs=True)  # train.log is not open yet
        for name in used:
            path = os.path.join(cfg.output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    os.makedirs(cfg.output_dir, exist_ok=True)
    barrier()
    return used if cfg.overwrite else []


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
    """Forward, backward, gradient average, optimizer step, temperature clamp, EMA update."""
    cfg, model = run.cfg, run.model
    ids = paddle.to_tensor(batch["ids"])

    def loss_fn(features):
        return run.loss(features, model.logit_scales(run.loss.pairs, cfg.max_logit_scale), ids=ids)

    if run.micro:
        info = gradcache_step(run.encoders, loss_fn, {v: batch[v] for v in run.views}, run.micro)
    else:
        total, parts = loss_fn({v: run.encoders[v](batch[v]) for v in run.views})
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


# --------------------------------------------------------------- logs, validation, checkpoints
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


def eval_weights(run):
    """The EMA weights when ema_decay is on (validation, final model), else the model's own."""
    return run.ema.applied() if run.ema is not None else contextlib.nullcontext()


def run_validation(run, data):
    """Rank 0 scores val_file; returns the result (None elsewhere or without val_file)."""
    if not run.cfg.val_file:
        return None
    result = None
    if run.rank == 0:
        with eval_weights(run):
            result = validate(run.model, run.cfg.val_file, data.eval_transform,
                              lambda t: data.tokenizer.batch_encode(t, padding="longest"),
                              run.cfg.val_batch_size, run.cfg.num_workers)
        log.info("step %d validation: mean recall %s (official protocol), %s (multi-caption)",
                 run.step, *(both_figures(result, p) for p in ("official", "multi_caption")))
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
    so collapsed embeddings (all equal, optimistic recall 100) never become the best."""
    if val is not None:
        score = val["multi_caption_pessimistic"]["MeanRecall"]["meanRecall"]
        if score > run.best["score"]:
            run.best = {"step": run.step, "score": score}


def resume_signature(cfg):
    """The RESUME_KEYS of cfg, the text tower as its json's content (not where the file is)."""
    return {**{k: cfg[k] for k in RESUME_KEYS},
            "text_model_config": load_ernie_config(cfg.text_model_config)}


def save_step(run, val):
    update_best(run, val)
    state = {"step": run.step, "best": run.best, "rng": get_rng_states(),
             "config": resume_signature(run.cfg)}
    extras = {"ema": run.ema.state_dict()} if run.ema is not None else None
    ckpt.save_checkpoint(run.cfg.output_dir, run.step, run.model, run.optimizer, state, run.rank,
                         run.world, extras)
    if run.rank == 0:
        ckpt.prune_checkpoints(run.cfg.output_dir, run.cfg.keep_last, run.best["step"])
    run.last_save = time.time()


def resume(run, path):
    state = ckpt.load_checkpoint_dir(path, run.model, run.optimizer, run.rank, run.world,
                                     resume_signature(run.cfg))
    run.step, run.best = state["step"], state["best"]
    set_rng_states(state["rng"])
    if run.ema is not None:
        if "ema" not in state["extras"]:
            raise ConfigError(f"{path} has no EMA weights: it was written with ema_decay 0")
        run.ema.set_state_dict(state["extras"]["ema"])
    log.info("resumed from %s at step %d", path, run.step)


def resume_latest(run, candidates):
    """Resume from the first loadable step directory; an unreadable one (e.g. a truncated file
    under its COMPLETE marker) falls back to the one before, with a warning."""
    for i, path in enumerate(candidates):
        try:
            return resume(run, path)
        except UnreadableCheckpoint as e:
            if i + 1 == len(candidates):
                raise
            log.warning("cannot resume from %s (%s); falling back to %s", path, e, candidates[i + 1])


def infer_config(cfg, model_path):
    """The inference keys of the run, every path absolute, init_from_params = model_path."""
    out = {k: cfg[k] for k in INFER_KEYS}
    out["init_from_params"] = model_path
    for k in PATH_KEYS:
        if out[k]:
            out[k] = os.path.abspath(out[k])
    return out


def write_final(run):
    """output_dir/final/{model.pdparams, infer.yaml}: what run_infer.sh needs. The model file
    holds the inference names only (no training-only temperatures)."""
    if run.rank != 0:
        return
    final = os.path.join(run.cfg.output_dir, "final")
    os.makedirs(final, exist_ok=True)
    model_path = os.path.abspath(os.path.join(final, "model.pdparams"))
    with eval_weights(run):
        save_state_dict({k: v.numpy() for k, v in inference_state_dict(run.model).items()},
                        model_path)
    infer_path = os.path.join(final, "infer.yaml")
    with atomic_write(infer_path) as f:
        f.write("# written by run_train.sh: bash run_infer.sh 0 THIS_FILE test_file=...\n")
        yaml.safe_dump(infer_config(run.cfg, model_path), f, allow_unicode=True, sort_keys=False)
    log.info("final model: %s (config for run_infer.sh: %s)", model_path, infer_path)


# ------------------------------------------------------------------------------------- train
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
    return run


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the checkpoint of the step it ended is saved."""

    def __init__(self, signum, step, path):
        super().__init__(f"interrupted ({signal.Signals(signum).name}) at step {step}: checkpoint "
                         f"{path}; continue with resume=auto")
        self.exit_code = 128 + signum


class StopSignals:
    """While active, SIGINT/SIGTERM only set `signum` (the first one's): the loop stops at the end
    of the step. A second signal of the same kind gets the previous handler (stop at once); the
    multi-process launcher follows a Ctrl-C with SIGTERM, which is not a second Ctrl-C."""

    def __init__(self):
        self.signum, self.previous = 0, {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self.previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        signal.signal(signum, self.previous[signum])
        if not self.signum:
            self.signum = signum
            log.warning("%s: saving a checkpoint at the end of this step, then stopping (once "
                        "more to stop at once, without it)", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def agree(run, signum):
    """(signal to stop on or 0, timed save due) the same on every process: any process's signal
    stops all, rank 0's clock decides the save_every_minutes checkpoints."""
    minutes = run.cfg.save_every_minutes
    timed = run.rank == 0 and minutes > 0 and time.time() - run.last_save >= minutes * 60
    if run.world == 1:
        return signum, timed
    votes = all_gather_object((signum, timed))
    return max(v[0] for v in votes), votes[0][1]


def peak_memory_gb(device):
    if device == "gpu":
        return paddle.device.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def log_estimate(run, seconds):
    """Once, after the second step of a session (the first warms up): what max_steps will cost."""
    left = run.cfg.max_steps - run.step
    minutes = round(seconds * left / 60)
    total = f"about {minutes // 60} h {minutes % 60} min" if minutes else "under a minute"
    line = (f"step time {seconds:.2f} s, peak memory {peak_memory_gb(run.device):.1f} GB: max_steps "
            f"{run.cfg.max_steps} will take {total} ({left} steps left)")
    if run.device == "cpu" and count_parameters(run.model) > CPU_HINT_PARAMETERS:
        line += f"; on a CPU try the CPU recipe: {CPU_RECIPE}"
    log.info(line)


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
            log_step(run, epoch, info, samples / max(time.time() - t_last, 1e-9))
            bar.set_postfix(loss=f"{info['loss']:.4f}")
            t_last, samples = time.time(), 0
        val = run_validation(run, data) if run.step % cfg.val_every == 0 or last else None
        stop, timed = agree(run, signals.signum)
        if run.step % cfg.save_every == 0 or last or timed or stop:
            save_step(run, val)
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
    deleted = prepare_output_dir(cfg, rank)
    setup_logging(cfg.log_dir or cfg.output_dir, "train.log", rank)
    if deleted:
        log.warning("overwrite: deleted %s from %s", ", ".join(deleted), cfg.output_dir)
    cfg = prepare(cfg, rank)  # computed object tags, vocab_file auto, embed_file
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
            run.encoders = build_encoders(model, data.views, amp, cached)
            train_loop(run, data, signals)
            write_final(run)
    except Interrupted as e:
        log.warning("%s", e)
        sys.exit(e.exit_code)
    finally:
        data.batcher.close()
    barrier()
    embed_after_training(cfg)

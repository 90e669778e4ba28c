"""run_train.sh's engine: multi-view contrastive training of the dual encoder.

One step: every process builds its slice of the global batch (all views), encodes it (whole, or
in GradCache micro-batches), the loss contrasts its rows against every process's features
(gathered with gradient), gradients are averaged over processes, AdamW steps, temperatures are
clamped. Checkpoints, validation and logs at fixed step intervals; `resume` continues exactly.
"""
import contextlib
import json
import logging
import os
import time

import numpy as np
import paddle
import yaml
from tqdm import tqdm

from ..checkpoint import load_checkpoint
from ..device import select_device
from ..distributed import all_reduce_gradients, barrier, init_distributed
from ..logging_utils import setup_logging
from ..losses import ContrastivePair, MultiViewContrastiveLoss
from ..models.params import count_parameters
from ..factory import build_dual_encoder, image_preprocess_spec
from ..tokenizer import ErnieTokenizer
from ..transforms import make_eval_transform, make_train_transform
from . import checkpointing as ckpt
from .data import EpochSampler, MultiViewBatcher, TrainIndex
from .ema import ModelEMA
from .feature_cache import ImageFeatureCache
from .gradcache import freeze_batchnorm_stats, get_rng_states, gradcache_step, set_rng_states
from .optim import build_optimizer, freeze, lr_at
from .validate import validate

log = logging.getLogger("ernievil2.train")
IMAGE_VIEWS, TEXT_VIEWS = ("image", "image_aug"), ("text", "text_aug", "tags")


def build_model(cfg):
    paddle.seed(cfg.seed)  # identical initial weights on every process
    model = build_dual_encoder(cfg.image_model, cfg.text_model_config, embed_dim=cfg.embed_dim,
                         image_size=cfg.image_size)
    if cfg.init_from_params:
        info = load_checkpoint(model, cfg.init_from_params)
        log.info("initialised from %s (%s layout)", cfg.init_from_params, info["layout"])
    if cfg.init_image_tower:
        info = load_checkpoint(model, cfg.init_image_tower, prefix_filter="visual.")
        log.info("image tower initialised from %s (%d tensors)", cfg.init_image_tower, info["loaded"])
    return model


def build_loss(cfg, model):
    pairs = [ContrastivePair(a, b, float(w)) for a, b, w in cfg.views]
    # The image-text temperature is the model's own `contrastive_loss_mm.temperature_b`, so the
    # trained value lands in the checkpoint under its official name.
    shared = {p.key: model.contrastive_loss_mm.temperature_b for p in pairs
              if {p.view_a, p.view_b} == {"image", "text"}}
    if shared:
        model.contrastive_loss_mm.temperature_b.set_value(
            paddle.full([1], cfg.init_logit_scale, "float32"))
    return MultiViewContrastiveLoss(pairs, init_logit_scale=cfg.init_logit_scale,
                                    max_logit_scale=cfg.max_logit_scale, targets=cfg.targets,
                                    shared_temperatures=shared)


def has_batchnorm(layer):
    return any(isinstance(m, (paddle.nn.layer.norm._BatchNormBase, paddle.nn.BatchNorm))
               for m in layer.sublayers())


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.rank, self.world = init_distributed()
        os.makedirs(cfg.output_dir, exist_ok=True)
        self.logger, self.log_path = setup_logging(cfg.log_dir or cfg.output_dir, "train.log", self.rank)
        self.place, self.amp = select_device(cfg.device, cfg.amp)
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {self.world} processes")
        self.local_batch = cfg.batch_size // self.world
        views = sorted({v for p in cfg.views for v in p[:2]})
        self.views = views
        self.model = build_model(cfg)
        self.loss_head = build_loss(cfg, self.model)
        if cfg.freeze_image_tower:
            freeze(self.model.visual)
        if cfg.freeze_text_tower:
            freeze(self.model.text_model)
        self.model.set_grad_checkpointing(cfg.grad_checkpointing)
        self.optimizer, decay = build_optimizer(self.model, self.loss_head, cfg)
        self.params = [p for p in list(self.model.parameters()) + list(self.loss_head.parameters())
                       if not p.stop_gradient]
        micro = cfg.micro_batch_size
        self.micro = micro if 0 < micro < self.local_batch else 0
        # fp16 needs loss scaling; GradCache's separate backward passes do not use it (use bf16).
        self.scaler = (paddle.amp.GradScaler(init_loss_scaling=2.0 ** 15)
                       if self.amp == "fp16" and not self.micro else None)
        self.freeze_bn = (cfg.freeze_bn_stats is True or
                          (cfg.freeze_bn_stats == "auto" and self.micro and has_batchnorm(self.model.visual)))
        size, mean, std = image_preprocess_spec(cfg.image_model, cfg.image_size)
        self.eval_tf = make_eval_transform(size, mean=mean, std=std)
        self.train_tf = make_train_transform(size, mean=mean, std=std)
        self.tok = ErnieTokenizer.from_file(cfg.vocab_file, max_seq_len=cfg.max_text_seqlen,
                                            pad_token=cfg.pad_token, cls_token=cfg.cls_token,
                                            sep_token=cfg.sep_token, mask_token=cfg.mask_token)
        if self.tok.vocab_size > self.model.text_model.word_emb.weight.shape[0]:
            raise ValueError(f"vocab {cfg.vocab_file} has {self.tok.vocab_size} ids but the text tower "
                             f"has {self.model.text_model.word_emb.weight.shape[0]} embeddings")
        self.index = TrainIndex(cfg.train_file, need_tags="tags" in views,
                                need_labels=cfg.targets == "unicl" and cfg.unicl_key == "label")
        self.sampler = EpochSampler(len(self.index), cfg.batch_size, cfg.seed)
        if cfg.image_feature_cache and not cfg.freeze_image_tower:
            raise ValueError("image_feature_cache needs freeze_image_tower: true (a trained tower's "
                             "features change every step, so they cannot be cached)")
        self.batcher = MultiViewBatcher(
            self.index, views, self.tok, self.train_tf, self.eval_tf, cfg.seed, self.rank,
            self.world, cfg.text_aug, cfg.text_mask_prob, cfg.augment, cfg.num_workers,
            id_source=cfg.unicl_key)
        self.feature_cache = None
        self.logger.info("config: %s", dict(cfg))
        self.logger.info("%d process(es) on %s; global batch %d (%d per process%s); views %s; "
                         "pairs %s; targets %s", self.world, self.place, cfg.batch_size,
                         self.local_batch, f", GradCache micro-batch {self.micro}" if self.micro else "",
                         views, [p.key for p in self.loss_head.pairs], cfg.targets)
        self.logger.info("parameters: image %s, text %s, trainable %s (%d decayed tensors); "
                         "%d training lines, %d steps per epoch; BN statistics %s",
                         f"{count_parameters(self.model.visual):,}",
                         f"{count_parameters(self.model.text_model):,}",
                         f"{sum(p.size for p in self.params):,}", len(decay), len(self.index),
                         self.sampler.steps_per_epoch, "frozen" if self.freeze_bn else "batch")
        self.ema = ModelEMA(self.model, cfg.ema_decay) if cfg.ema_decay else None
        self.step, self.best = 0, {"step": None, "score": -1.0}
        paddle.seed(cfg.seed * 1000 + self.rank + 1)  # dropout differs across processes
        resume = ckpt.resolve_resume(cfg.resume, cfg.output_dir)
        if resume:
            state = ckpt.load_checkpoint_dir(resume, self.model, self.loss_head, self.optimizer,
                                             self.rank, self.world)
            self.step, self.best = state["step"], state["best"]
            set_rng_states(state["rng"])
            if self.ema is not None:
                if "ema" not in state["extras"]:
                    raise RuntimeError(f"{resume} has no EMA weights: it was written with ema_decay 0")
                self.ema.set_state_dict(state["extras"]["ema"])
            self.logger.info("resumed from %s at step %d", resume, self.step)
        if cfg.image_feature_cache and any(v in IMAGE_VIEWS for v in views):
            # after any resume: the cache must hold the features of the tower actually trained
            cache_seed = cfg.seed if cfg.image_feature_cache_seed is None else cfg.image_feature_cache_seed
            self.feature_cache = ImageFeatureCache.load_or_build(
                cfg.image_feature_cache_dir, self.model.visual, self.index, cfg.image_feature_cache,
                self.train_tf, self.eval_tf, cache_seed, self.rank, self.world,
                batch_size=cfg.val_batch_size, pool=self.batcher.pool)
            self.batcher.cache = self.feature_cache

    # -- one step ---------------------------------------------------------------------------
    def _set_modes(self):
        self.model.train()
        if self.cfg.freeze_image_tower:
            self.model.visual.eval()
        if self.cfg.freeze_text_tower:
            self.model.text_model.eval()
        if self.freeze_bn:
            freeze_batchnorm_stats(self.model.visual)

    def _encoders(self):
        def wrap(encode):
            def run(x):
                if self.amp == "none":
                    return encode(paddle.to_tensor(x))
                # Mixed precision on GPUs: towers in fp16/bf16, the loss in fp32 (untested on the
                # CPU-only CI machines).
                with paddle.amp.auto_cast(level="O1", dtype="float16" if self.amp == "fp16" else "bfloat16"):
                    out = encode(paddle.to_tensor(x))
                return out.astype("float32")
            return run
        enc_img = wrap(self.model.project_image if self.feature_cache else self.model.encode_image)
        enc_txt = wrap(self.model.encode_text)
        return {v: enc_img if v in IMAGE_VIEWS else enc_txt for v in self.views}

    def train_step(self, batch):
        ids = paddle.to_tensor(batch["ids"])
        encoders = self._encoders()
        if self.micro:
            info = gradcache_step(encoders, self.loss_head, {v: batch[v] for v in self.views},
                                  self.micro, loss_kwargs={"ids": ids})
        else:
            feats = {v: encoders[v](batch[v]) for v in self.views}
            total, raw = self.loss_head(feats, ids=ids)
            (self.scaler.scale(total) if self.scaler else total).backward()
            info = {"loss": float(total), **{k: float(v) for k, v in raw.items()}}
        if self.world > 1:
            all_reduce_gradients(self.params, average=True)  # linear: fine on scaled gradients
        if self.scaler:
            self.scaler.step(self.optimizer)  # unscales, skips the step on inf/nan
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.clear_grad()
        self.loss_head.clamp_()
        if self.ema is not None:
            self.ema.update()
        return info

    # -- the loop ---------------------------------------------------------------------------
    def _log(self, record):
        if self.rank == 0:
            with open(os.path.join(self.cfg.output_dir, "train.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def _weights_for_eval(self):
        """The EMA weights when ema_decay is on (validation, final model), else the model's own."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def _validate(self):
        if not self.cfg.val_file:
            return None
        result = None
        if self.rank == 0:
            with self._weights_for_eval():
                result = validate(self.model, self.cfg.val_file, self.eval_tf,
                                  lambda t: self.tok.batch_encode(t, padding="longest"),
                                  self.cfg.val_batch_size, self.cfg.num_workers)
            mc = result["multi_caption"]["MeanRecall"]["meanRecall"]
            off = result["official"]["MeanRecall"]["meanRecall"]
            self.logger.info("step %d validation: mean recall %.2f (official protocol), %.2f "
                             "(multi-caption)", self.step, off, mc)
            self._log({"step": self.step, "validation": result})
        barrier()
        return result

    def _save(self, val):
        score = None
        if val is not None:
            score = val["multi_caption"]["MeanRecall"]["meanRecall"]
            if score > self.best["score"]:
                self.best = {"step": self.step, "score": score}
        state = {"step": self.step, "best": self.best, "rng": get_rng_states()}
        extras = {"ema": self.ema.state_dict()} if self.ema is not None else None
        path = ckpt.save_checkpoint(self.cfg.output_dir, self.step, self.model, self.loss_head,
                                    self.optimizer, state, self.rank, self.world, extras)
        if self.rank == 0:
            ckpt.prune_checkpoints(self.cfg.output_dir, self.cfg.keep_last, self.best["step"])
        return path

    def write_final(self):
        """output_dir/final/{model.pdparams, infer.yaml}: what run_infer.sh needs."""
        if self.rank != 0:
            return
        final = os.path.join(self.cfg.output_dir, "final")
        os.makedirs(final, exist_ok=True)
        from ..checkpoint import save_state_dict
        with self._weights_for_eval():
            save_state_dict({k: v.numpy() for k, v in self.model.state_dict().items()},
                            os.path.join(final, "model.pdparams"))
        from ..keys import INFER_KEYS
        infer_cfg = {k: self.cfg[k] for k in INFER_KEYS}
        infer_cfg["init_from_params"] = os.path.join(final, "model.pdparams")
        tmp = os.path.join(final, "infer.yaml.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("# written by run_train.sh: bash run_infer.sh 0 THIS_FILE test_file=...\n")
            yaml.safe_dump(infer_cfg, f, allow_unicode=True, sort_keys=False)
        os.replace(tmp, os.path.join(final, "infer.yaml"))
        self.logger.info("final model: %s (config for run_infer.sh: %s)",
                         infer_cfg["init_from_params"], os.path.join(final, "infer.yaml"))

    def fit(self):
        cfg = self.cfg
        self._set_modes()
        bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", disable=self.rank != 0,
                   desc="train", dynamic_ncols=True)
        t_last, n_last = time.time(), 0
        while self.step < cfg.max_steps:
            epoch, rows = self.sampler.rows(self.step)
            batch = self.batcher.batch(epoch, rows)
            self.optimizer.set_lr(lr_at(self.step, cfg))
            info = self.train_step(batch)
            self.step += 1
            n_last += cfg.batch_size
            bar.update()
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                dt = time.time() - t_last
                rec = {"step": self.step, "epoch": epoch, "lr": lr_at(self.step - 1, cfg),
                       "samples_per_s": n_last / max(dt, 1e-9), **info}
                self._log(rec)
                bar.set_postfix(loss=f"{info['loss']:.4f}", lr=f"{rec['lr']:.2e}")
                scales = " ".join(f"{k.split('/', 1)[1]}={v:.2f}" for k, v in info.items()
                                  if k.startswith("logit_scale/"))
                losses = " ".join(f"{k.split('/', 1)[1]}={v:.4f}" for k, v in info.items()
                                  if k.startswith("loss/"))
                self.logger.info("step %d/%d loss %.4f [%s] lr %.2e scales [%s] %.1f samples/s",
                                 self.step, cfg.max_steps, info["loss"], losses, rec["lr"], scales,
                                 rec["samples_per_s"])
                t_last, n_last = time.time(), 0
            val = None
            if self.step % cfg.val_every == 0 or self.step == cfg.max_steps:
                val = self._validate()
                self._set_modes()
            if self.step % cfg.save_every == 0 or self.step == cfg.max_steps:
                self._save(val)
        bar.close()
        self.write_final()
        self.batcher.close()
        barrier()


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Multi-view contrastive training of ERNIE-ViL 2.0 "
                                "(the engine behind run_train.sh).")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value pairs overriding config keys")
    args = p.parse_args(argv)
    from ..cli import load_train_config
    Trainer(load_train_config(args.config, args.overrides)).fit()

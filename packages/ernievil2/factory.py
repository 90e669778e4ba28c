"""The one factory: model, image transforms and tokenizer from a run config.

`create_model_and_transforms(config, **overrides)` is what inference, training, validation,
export, the tools and the benchmarks call. `config` is a shipped config name (`demo_tiny`,
`ernie_vil_base`), a YAML path, a mapping of config keys, or a loaded `Config`; keyword overrides
win. The model shapes are data: `image_model` is a tower name below or a mapping with
`type: vit|efficientnet` and its arguments; `text_model_config` is an ERNIE json of any depth.
"""
import copy
import logging
import os
from typing import Callable, NamedTuple

import numpy as np
import paddle

from .checkpoint import load_checkpoint
from .config import Config, ConfigError, load_config
from .keys import INFER_KEYS, TRAIN_COMMAND, TRAIN_KEYS
from .models.dual_encoder import ErnieViL2
from .models.ernie import ErnieTextModel, load_ernie_config
from .models.params import count_parameters
from .resources import run_config_path
from .tokenizer import ErnieTokenizer
from .transforms import (HALF_MEAN, HALF_STD, OFFICIAL_MEAN, OFFICIAL_STD, make_eval_transform,
                         make_train_transform)

log = logging.getLogger(__name__)

IMAGE_TOWERS = {
    # ViT-B/16 (Dosovitskiy et al. 2021, Table 1); the official ERNIE-ViL 2.0 base image tower.
    "vit_b16": dict(type="vit", image_size=224, patch_size=16, width=768, layers=12, heads=12),
    # ViT-L/14 (CLIP, Radford et al. 2021); defined (unused) in the official release.
    "vit_l14": dict(type="vit", image_size=224, patch_size=14, width=1024, layers=24, heads=16),
    # EfficientNet-B5 (Tan & Le 2019: width 1.6, depth 2.2, resolution 456).
    "efficientnet_b5": dict(type="efficientnet", name="b5"),
    # EfficientNet-L2 (Noisy Student, Xie et al. 2020: width 4.3, depth 5.3, resolution 800).
    "efficientnet_l2": dict(type="efficientnet", name="l2"),
    # EfficientNet-Lite0 (TF EfficientNet-Lite), the CPU recipe's tower.
    "efficientnet_lite0": dict(type="efficientnet", name="lite0"),
}


# ------------------------------------------------------------------------------------ config
def as_config(config=None, **overrides) -> Config:
    """A validated Config from a name, path, mapping or Config (+ overrides)."""
    if isinstance(config, Config):
        if not overrides:
            return config
        return Config({**config, **_validated(overrides, config)})
    path, items = None, []
    if isinstance(config, (str, os.PathLike)):
        path = run_config_path(config)
    elif isinstance(config, dict):
        items = list(config.items())
    elif config is not None:
        raise ConfigError(f"config must be a name, a path, a mapping or a Config, got {config!r}")
    # a run config may also drive training: its training keys are that command's to check
    return load_config(path, items + list(overrides.items()), schema=INFER_KEYS,
                       elsewhere={TRAIN_COMMAND: TRAIN_KEYS})


def _validated(overrides, cfg):
    unknown = sorted(set(overrides) - set(cfg))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown}")
    checked = load_config(None, [(k, v) for k, v in overrides.items() if k in INFER_KEYS],
                          schema=INFER_KEYS)
    return {k: checked[k] if k in INFER_KEYS else v for k, v in overrides.items()}


# ------------------------------------------------------------------------------------ towers
def resolve_image_spec(image_model):
    if isinstance(image_model, str):
        if image_model not in IMAGE_TOWERS:
            raise ConfigError(f"unknown image_model {image_model!r}; known: {sorted(IMAGE_TOWERS)} "
                              "or a mapping with type: vit|efficientnet")
        spec = copy.deepcopy(IMAGE_TOWERS[image_model])
    elif isinstance(image_model, dict):
        spec = copy.deepcopy(image_model)
        base = spec.pop("base", None)
        if base is not None:  # a registry tower with overrides, e.g. {base: vit_b16, layers: 2}
            spec = {**resolve_image_spec(base), **spec}
    else:
        raise ConfigError(f"image_model must be a name or a mapping, got {image_model!r}")
    if spec.get("type") not in ("vit", "efficientnet"):
        raise ConfigError(f"image_model type must be vit or efficientnet, got {spec.get('type')!r}")
    # EfficientNet-Lite is trained on (x/255 - 0.5) / 0.5; everything else on ImageNet statistics.
    lite = spec["type"] == "efficientnet" and str(spec.get("name", "")).lstrip("efficientnet-_").startswith("lite")
    spec.setdefault("mean", HALF_MEAN if lite else OFFICIAL_MEAN)
    spec.setdefault("std", HALF_STD if lite else OFFICIAL_STD)
    return spec


def build_image_tower(image_model, image_size=None):
    spec = resolve_image_spec(image_model)
    kind = spec.pop("type")
    spec.pop("mean"), spec.pop("std")
    if image_size:
        spec["image_size"] = image_size
    if kind == "vit":
        from .models.vit import VisionTransformer
        return VisionTransformer(**spec)
    from .models.efficientnet import build_efficientnet
    name = spec.pop("name")
    return build_efficientnet(name, with_classifier=False, **spec)


def build_text_tower(text_model_config, **overrides):
    cfg = (load_ernie_config(text_model_config) if isinstance(text_model_config, str)
           else dict(text_model_config))
    cfg.update(overrides)
    return ErnieTextModel(**cfg)


def build_dual_encoder(image_model="vit_b16", text_model_config=None, embed_dim=None,
                       image_size=None, visual_concepts="none", **text_overrides):
    """The towers from their specs (random weights); create_model does this from a config."""
    if text_model_config is None:
        raise ConfigError("text_model_config (an ERNIE json config) is required")
    visual = build_image_tower(image_model, image_size)
    text = build_text_tower(text_model_config, **text_overrides)
    return ErnieViL2(visual, text, embed_dim=embed_dim, visual_concepts=visual_concepts)


def image_preprocess_spec(image_model, image_size=None):
    """(image_size, mean, std) the tower expects; preprocessing follows the config."""
    spec = resolve_image_spec(image_model)
    if image_size:
        size = image_size
    elif spec["type"] == "vit":
        size = spec.get("image_size", 224)
    else:
        from .models.efficientnet import default_image_size
        size = spec.get("image_size") or default_image_size(spec["name"])
    return size, tuple(spec["mean"]), tuple(spec["std"])


# ------------------------------------------------------------------------ from a run config
def create_model(config=None, *, load_weights=True, **overrides):
    """The dual encoder of a config, in eval mode: `init_from_params` loaded (official or
    PaddleNLP layout), or random weights drawn from `seed` (with a warning)."""
    cfg = as_config(config, **overrides)
    paddle.seed(cfg.seed)  # the same random weights on every process and every run
    model = build_dual_encoder(cfg.image_model, cfg.text_model_config, embed_dim=cfg.embed_dim,
                               image_size=cfg.image_size, visual_concepts=cfg.visual_concepts)
    if load_weights and cfg.init_from_params:
        info = load_checkpoint(model, cfg.init_from_params)
        log.info("checkpoint %s: %s layout, %d tensors loaded", cfg.init_from_params,
                 info["layout"], info["loaded"])
    elif load_weights:
        log.warning("init_from_params is empty: the model has RANDOM weights (seed %d)", cfg.seed)
    model.eval()
    log.info("parameters: image tower %s, text tower %s, total %s",
             f"{count_parameters(model.visual):,}", f"{count_parameters(model.text_model):,}",
             f"{count_parameters(model):,}")
    return model


def create_transforms(config=None, **overrides):
    """(train_transform, eval_transform) for the config's image tower."""
    cfg = as_config(config, **overrides)
    size, mean, std = image_preprocess_spec(cfg.image_model, cfg.image_size)
    return (make_train_transform(size, mean=mean, std=std),
            make_eval_transform(size, mean=mean, std=std))


def create_tokenizer(config=None, **overrides) -> ErnieTokenizer:
    cfg = as_config(config, **overrides)
    if cfg.vocab_file == "auto":  # training's: the trainer replaces it with the vocab it builds
        raise ConfigError("vocab_file: auto is built by run_train.sh (into output_dir/vocab.txt); "
                          "embed with the vocab of a trained model (its final/infer.yaml names it)")
    return ErnieTokenizer.from_file(
        cfg.vocab_file, max_seq_len=cfg.max_text_seqlen, pad_token=cfg.pad_token,
        cls_token=cfg.cls_token, sep_token=cfg.sep_token, mask_token=cfg.mask_token)


def text_encoder(cfg, tokenizer) -> Callable:
    """texts -> padded id array as the config asks (text_padding, input_dtype)."""
    def encode_texts(texts):
        return tokenizer.batch_encode(texts, padding=cfg.text_padding).astype(cfg.input_dtype)
    return encode_texts


def check_vocab_fits(tokenizer, model, vocab_file=None):
    """A vocab whose ids exceed the text tower's embedding rows is a one-line VocabError (Paddle
    would fail deep inside the lookup, or read past the table)."""
    tokenizer.check_embedding_rows(model.text_model.word_emb.weight.shape[0])


class ModelAndTransforms(NamedTuple):
    model: ErnieViL2
    train_transform: Callable[[np.ndarray], np.ndarray]
    eval_transform: Callable[[np.ndarray], np.ndarray]
    tokenizer: ErnieTokenizer


def create_model_and_transforms(config=None, *, load_weights=True, **overrides) -> ModelAndTransforms:
    """Model (eval mode, weights loaded), train/eval image transforms and tokenizer of a config."""
    cfg = as_config(config, **overrides)
    tokenizer = create_tokenizer(cfg)
    model = create_model(cfg, load_weights=load_weights)
    check_vocab_fits(tokenizer, model, cfg.vocab_file)
    train_tf, eval_tf = create_transforms(cfg)
    return ModelAndTransforms(model, train_tf, eval_tf, tokenizer)


def encoder_settings(cfg, embed_dim):
    """What a standalone encoder needs besides the programs (export's encoder.json): input size and
    statistics, tokenizer settings, embedding width."""
    size, mean, std = image_preprocess_spec(cfg.image_model, cfg.image_size)
    return {
        "embed_dim": int(embed_dim), "normalized": True,
        "image": {"image_size": int(size), "mean": list(mean), "std": list(std)},
        "text": {"input_dtype": cfg.input_dtype, "max_seq_len": int(cfg.max_text_seqlen),
                 "pad_token": cfg.pad_token, "cls_token": cfg.cls_token,
                 "sep_token": cfg.sep_token, "mask_token": cfg.mask_token},
    }

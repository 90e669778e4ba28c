"""One factory: build the dual encoder from the run config's model keys.

`image_model` is a registry name below or a mapping with `type: vit|efficientnet` and the tower's
arguments (small stand-ins in tests). `text_model_config` is an ERNIE json of any depth/width.
"""
import copy

from .dual_encoder import ErnieViL2
from .ernie import ErnieTextModel, load_ernie_config

from ..transforms import HALF_MEAN, HALF_STD, OFFICIAL_MEAN, OFFICIAL_STD

IMAGE_TOWERS = {
    # ViT-B/16 (Dosovitskiy et al. 2021, Table 1); the official ERNIE-ViL 2.0 base image tower.
    "vit_b16": dict(type="vit", image_size=224, patch_size=16, width=768, layers=12, heads=12),
    # ViT-L/14 (CLIP, Radford et al. 2021); defined (unused) in the official release.
    "vit_l14": dict(type="vit", image_size=224, patch_size=14, width=1024, layers=24, heads=16),
    # EfficientNet-B5 (Tan & Le 2019: width 1.6, depth 2.2, resolution 456).
    "efficientnet_b5": dict(type="efficientnet", name="b5"),
    # EfficientNet-L2 (Noisy Student, Xie et al. 2020: width 4.3, depth 5.3, resolution 800).
    "efficientnet_l2": dict(type="efficientnet", name="l2"),
    # EfficientNet-Lite0 (TF EfficientNet-Lite): the real ImageNet weights in ../shared start here.
    "efficientnet_lite0": dict(type="efficientnet", name="lite0"),
}


def resolve_image_spec(image_model):
    if isinstance(image_model, str):
        if image_model not in IMAGE_TOWERS:
            raise ValueError(f"unknown image_model {image_model!r}; known: {sorted(IMAGE_TOWERS)} "
                             "or a mapping with type: vit|efficientnet")
        spec = copy.deepcopy(IMAGE_TOWERS[image_model])
    elif isinstance(image_model, dict):
        spec = copy.deepcopy(image_model)
        base = spec.pop("base", None)
        if base is not None:  # a registry tower with overrides, e.g. {base: vit_b16, layers: 2}
            spec = {**resolve_image_spec(base), **spec}
    else:
        raise ValueError(f"image_model must be a name or a mapping, got {image_model!r}")
    if spec.get("type") not in ("vit", "efficientnet"):
        raise ValueError(f"image_model type must be vit or efficientnet, got {spec.get('type')!r}")
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
        from .vit import VisionTransformer
        return VisionTransformer(**spec)
    from .efficientnet import build_efficientnet
    name = spec.pop("name")
    return build_efficientnet(name, with_classifier=False, **spec)


def build_text_tower(text_model_config, **overrides):
    cfg = (load_ernie_config(text_model_config) if isinstance(text_model_config, str)
           else dict(text_model_config))
    cfg.update(overrides)
    return ErnieTextModel(**cfg)


def create_model(image_model="vit_b16", text_model_config=None, embed_dim=None, image_size=None,
                 **text_overrides):
    if text_model_config is None:
        raise ValueError("text_model_config (an ERNIE json config) is required")
    visual = build_image_tower(image_model, image_size)
    text = build_text_tower(text_model_config, **text_overrides)
    return ErnieViL2(visual, text, embed_dim=embed_dim)


def image_preprocess_spec(image_model, image_size=None):
    """(image_size, mean, std) the tower expects; preprocessing follows the config."""
    spec = resolve_image_spec(image_model)
    if image_size:
        size = image_size
    elif spec["type"] == "vit":
        size = spec.get("image_size", 224)
    else:
        from .efficientnet import default_image_size
        size = spec.get("image_size") or default_image_size(spec["name"])
    return size, tuple(spec["mean"]), tuple(spec["std"])

"""Parameter counts of a config's towers, built without allocating weights (paddle.LazyGuard)."""
import paddle

from .params import count_parameters
from ..factory import build_dual_encoder, build_image_tower, image_preprocess_spec, resolve_image_spec


def model_summary(image_model, text_model_config, embed_dim=None, image_size=None):
    with paddle.LazyGuard():
        model = build_dual_encoder(image_model, text_model_config, embed_dim=embed_dim,
                             image_size=image_size)
        spec = resolve_image_spec(image_model)
        with_classifier = None
        if spec["type"] == "efficientnet":
            from .efficientnet import build_efficientnet
            with_classifier = count_parameters(build_efficientnet(spec["name"], with_classifier=True))
    proj = sum(count_parameters(p) for p in (model.visual_proj, model.text_proj) if p is not None)
    return {
        "image_size": image_preprocess_spec(image_model, image_size)[0],
        "image_tower": count_parameters(model.visual),
        "image_tower_with_classifier": with_classifier,
        "text_tower": count_parameters(model.text_model),
        "projections": proj,
        "embed_dim": model.embed_dim,
        "total": count_parameters(model),
        "tensors": len(model.state_dict()),
    }


__all__ = ["model_summary", "count_parameters", "build_image_tower"]

"""Print the towers' parameter counts of one or more run configs (nothing is allocated).

  python tools/model_info.py packages/configs/ernie_vil_*.yaml

The counts are models.params.count_parameters, as in the run logs: learned weights, BatchNorm
running statistics excluded.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "packages"))

import paddle  # noqa: E402
from tabulate import tabulate  # noqa: E402

from ernievil2.cli import load_infer_config, run_main  # noqa: E402
from ernievil2.factory import create_model, image_preprocess_spec, resolve_image_spec  # noqa: E402
from ernievil2.models.params import count_parameters  # noqa: E402


def model_summary(cfg):
    """Parameter counts of the config's model, built under paddle.LazyGuard (no weights)."""
    spec = resolve_image_spec(cfg.image_model)
    with paddle.LazyGuard():
        model = create_model(cfg, load_weights=False)
        with_classifier = None
        if spec["type"] == "efficientnet":  # the published counts include the ImageNet head
            from ernievil2.models.efficientnet import build_efficientnet
            with_classifier = count_parameters(build_efficientnet(spec["name"], with_classifier=True))
    projections = [p for p in (model.visual_proj, model.text_proj) if p is not None]
    return {
        "image_size": image_preprocess_spec(cfg.image_model, cfg.image_size)[0],
        "image_tower": count_parameters(model.visual),
        "image_tower_with_classifier": with_classifier,
        "text_tower": count_parameters(model.text_model),
        "projections": sum(count_parameters(p) for p in projections),
        "embed_dim": model.embed_dim,
        "total": count_parameters(model),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+")
    args = p.parse_args(argv)
    rows = []
    for path in args.configs:
        cfg = load_infer_config(path)
        s = model_summary(cfg)
        count = lambda n: "-" if n is None else f"{n:,}"  # noqa: E731  (as the run logs print it)
        rows.append([os.path.basename(path), cfg.image_model if isinstance(cfg.image_model, str) else "custom",
                     s["image_size"], count(s["image_tower"]), count(s["image_tower_with_classifier"]),
                     count(s["text_tower"]), count(s["projections"]), s["embed_dim"], count(s["total"])])
    print(tabulate(rows, headers=["config", "image tower", "res", "image params", "+classifier",
                                  "text params", "projections", "embed", "total"],
                   tablefmt="github", disable_numparse=True, colalign=("left", "left") + ("right",) * 7))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))

"""Print the towers' parameter counts of one or more run configs (nothing is allocated).

  python tools/model_info.py packages/configs/ernie_vil_*.yaml
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "packages"))

from tabulate import tabulate  # noqa: E402

from ernievil2.cli import load_infer_config as load_config  # noqa: E402
from ernievil2.models.summary import model_summary  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+")
    args = p.parse_args(argv)
    rows = []
    for path in args.configs:
        cfg = load_config(path)
        s = model_summary(cfg.image_model, cfg.text_model_config, cfg.embed_dim, cfg.image_size)
        fmt = lambda n: "-" if n is None else f"{n / 1e6:.1f}M"  # noqa: E731
        rows.append([os.path.basename(path), cfg.image_model if isinstance(cfg.image_model, str) else "custom",
                     s["image_size"], fmt(s["image_tower"]), fmt(s["image_tower_with_classifier"]),
                     fmt(s["text_tower"]), fmt(s["projections"]), s["embed_dim"], fmt(s["total"])])
    print(tabulate(rows, headers=["config", "image tower", "res", "image params", "+classifier",
                                  "text params", "projections", "embed", "total"], tablefmt="github"))


if __name__ == "__main__":
    main()

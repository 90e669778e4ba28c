"""Convert the lukemelas-style EfficientNet-Lite0 npz into a Paddle image-tower checkpoint.

    python tools/convert_lite0_weights.py NPZ OUT.pdparams [--with-classifier]

Keys are prefixed `visual.` (the dual encoder's image tower attribute), so the file loads as the
image tower of an `image_model: efficientnet_lite0` dual encoder. The ImageNet classifier is
dropped unless --with-classifier (useful for object tags, not for the dual encoder). The output
is written to a temporary name first and moved into place, so a failed run leaves no half file.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages"))

import paddle  # noqa: E402

from ernievil2.fileio import atomic_path  # noqa: E402
from ernievil2.models.efficientnet import build_efficientnet  # noqa: E402
from ernievil2.models.lite0_port import load_lite0_npz  # noqa: E402

PREFIX = "visual."


def convert(npz_path, out_path, with_classifier=False):
    """Write the checkpoint; returns the number of tensors written."""
    npz_path, out_path = Path(npz_path), Path(out_path)
    if not npz_path.is_file():
        raise FileNotFoundError(f"{npz_path}: no such npz file")
    model = build_efficientnet("lite0", with_classifier=with_classifier)
    load_lite0_npz(model, npz_path)
    state = {PREFIX + k: v for k, v in model.state_dict().items()}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        paddle.save(state, tmp)
    return len(state)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("npz", help="efficientnet_lite0_imagenet.npz (lukemelas-style names)")
    ap.add_argument("out", help="output .pdparams")
    ap.add_argument("--with-classifier", action="store_true",
                    help="keep the 1000-class ImageNet classifier (visual.classifier.*)")
    args = ap.parse_args(argv)
    try:
        n = convert(args.npz, args.out, args.with_classifier)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {n} tensors to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

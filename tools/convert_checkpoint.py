"""Convert an ERNIE-ViL 2.0 checkpoint between the official and PaddleNLP layouts.

  python tools/convert_checkpoint.py IN.pdparams OUT.pdparams --to paddlenlp|official

The input layout is detected from the tensor names. PaddleNLP's ViT keeps q/k/v apart where the
official fuses them into `qkv` (q|k|v on the output axis); Linear weights are [in, out] in both.
Training-only tensors (`train_heads.*`, from a training checkpoint) are left out: the output holds
the inference model's names only.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "packages"))

from ernievil2.checkpoint import OFFICIAL, PADDLENLP, CheckpointError, convert_checkpoint  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", required=True, choices=[OFFICIAL, PADDLENLP])
    args = p.parse_args(argv)
    try:
        layout, n = convert_checkpoint(args.src, args.dst, args.to)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    print(f"{args.src} ({layout} layout) -> {args.dst} ({args.to} layout, {n} tensors)")


if __name__ == "__main__":
    main()

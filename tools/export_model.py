"""Export a model for deployment: Paddle Inference models (json + pdiparams) of both towers, the
vocab, encoder.json and a standalone encoder (deploy_encoder.py), optionally ONNX as well.

  python tools/export_model.py CONFIG.yaml [key=value ...] --out DIR [--onnx] [--no-verify]

The config's model keys and `init_from_params` pick the model (factory.create_model), as for
run_infer.sh. Then:
  python DIR/deploy_encoder.py DIR --text "一只狗" --image dog.jpg     (no repository needed)
or `execution: inference` with `export_dir: DIR` in a run_infer.sh config. --onnx needs the
optional paddle2onnx (pip install paddle2onnx onnxruntime). The exported towers (and the ONNX
ones) are compared with the eager model on random inputs and the differences recorded in
encoder.json; a failed export is removed (a failed ONNX conversion: its files only), with an error.
--no-verify skips the check.
"""
import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "packages"))

from ernievil2.cli import load_infer_config, run_main  # noqa: E402
from ernievil2.device import select_device  # noqa: E402
from ernievil2.export import ONNX_OPSET, export_from_config  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="run config (YAML)")
    p.add_argument("overrides", nargs="*", help="key=value pairs overriding config keys")
    p.add_argument("--out", required=True, help="export folder (created; an old export is replaced)")
    p.add_argument("--onnx", action="store_true", help="also write image.onnx and text.onnx (paddle2onnx)")
    p.add_argument("--opset", type=int, default=ONNX_OPSET, help="ONNX opset (default %(default)s)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the check of exported vs eager outputs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_infer_config(args.config, args.overrides)
    select_device(cfg.device)  # trace on the device the config names (export where you deploy)
    meta = export_from_config(cfg, args.out, onnx=args.onnx, opset=args.opset, verify=args.verify)
    files = sorted(os.listdir(args.out))
    print(f"exported to {args.out}: {', '.join(files)}")
    if args.verify:
        print("max |exported - eager|: " + json.dumps(meta["verified_max_abs_diff"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))

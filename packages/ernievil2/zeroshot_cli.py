"""eval_zeroshot.py / ernievil2-zeroshot: zero-shot classification accuracy of a model (a run
config + its checkpoint, any `execution`), on labelled images; see packages/ernievil2/zeroshot.py.

  python eval_zeroshot.py CONFIG [key=value ...] --classes FILE --images TSV_OR_FOLDER
                          [--lang zh|en] [--templates FILE] [--json OUT]

Several processes: `bash run_zeroshot.sh DEVICES CONFIG [key=value ...] --classes ... --images ...`
(DEVICES as in run_infer.sh: "0,1,2,3" is 4 processes; NNODES/MASTER/NODE_RANK for several
machines); each classifies its share of the images (TSV line i goes to rank (i-1) % N) and rank 0 prints the result of all of them.
"""
import argparse
import json
import os
import sys

import numpy as np
from tabulate import tabulate

from .cli import load_infer_config, run_main
from .data.tsv import DataError

DESCRIPTION = """Zero-shot classification: each class name is put into prompt templates, the class
embedding is the mean of its normalised prompt embeddings (renormalised), and each image gets the
classes nearest to its embedding. Prints top-1 / top-5 accuracy and chance."""
EPILOG = """--images: a TSV in the training format (text \\t image_id \\t base64 [\\t tags \\t label])
whose 5th column is the truth: a class index (0-based, the class file's order) or a class name
(compared after dropping parentheticals and "a / b" alternatives); or a folder with one
sub-folder per class, named by class name or index.
--classes: imagenet_classes.tsv (header class_index wnid label_en label_zh; --lang picks the
column) or a plain file, one class name a line (line order = class index).
--templates: one template a line with one {} for the class name (default: the built-in set
of --lang)."""


def add_arguments(p):
    """CONFIG, the overrides and the options (also run_zeroshot.sh's, after its DEVICES)."""
    p.add_argument("config", help="YAML run config (model, vocab, init_from_params, execution), "
                   "or a shipped config's name")
    p.add_argument("overrides", nargs="*", help="key=value pairs overriding config keys")
    p.add_argument("--classes", required=True, help="class-name file")
    p.add_argument("--images", required=True, help="labelled TSV, or a folder of class sub-folders")
    p.add_argument("--lang", choices=("zh", "en"), default="zh",
                   help="class-name column and built-in templates (default zh)")
    p.add_argument("--templates", help="prompt template file (default: the built-in --lang set)")
    p.add_argument("--json", help="also write the metrics, per-class accuracy and confusions here")


def option_args(args):
    """The options of parsed `args` as a command line again (for the launcher's processes)."""
    out = ["--classes", args.classes, "--images", args.images, "--lang", args.lang]
    for name in ("templates", "json"):
        if getattr(args, name):
            out += [f"--{name}", getattr(args, name)]
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(prog="eval_zeroshot.py", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p.parse_intermixed_args(argv)  # key=value overrides may follow the options


def run(argv=None):
    args = parse_args(argv)
    cfg = load_infer_config(args.config, args.overrides)
    from . import zeroshot as zs
    for path, what in ((args.classes, "--classes"), (args.images, "--images"),
                       (args.templates, "--templates")):
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"{what} not found: {path}")
    names = zs.load_classes(args.classes, args.lang)
    templates = zs.load_templates(args.templates) if args.templates else zs.TEMPLATES[args.lang]
    resolve = zs.LabelResolver(names)

    from .device import select_device
    from .distributed import all_gather_object, init_distributed
    from .embed import build_towers
    from .logging_utils import setup_logging
    from .transforms import decode_image, set_max_image_pixels
    rank, world = init_distributed()
    set_max_image_pixels(cfg.max_image_pixels)
    logger, _ = setup_logging(None, "zeroshot.log", rank)
    place, amp = select_device(cfg.device, cfg.amp)
    towers, transform, encode_texts = build_towers(cfg, place, amp)
    logger.info("%d classes x %d templates, execution %s", len(names), len(templates), cfg.execution)
    class_emb = zs.class_embeddings(lambda texts: towers.encode_text(encode_texts(texts)), names,
                                    templates, cfg.infer_batch_size)
    batches = zs.labelled_batches(args.images, resolve, cfg.infer_batch_size, transform,
                                  decode_image, rank, world, num_workers=cfg.num_workers,
                                  prefetch=cfg.prefetch)
    result = zs.classify(towers.encode_image, class_emb, batches)  # this process's share
    shares = all_gather_object((result.predictions, result.labels))
    if rank != 0:
        return 0
    predictions, labels = (np.concatenate(part) for part in zip(*shares))
    if not len(labels):
        raise DataError(args.images, None, "no images")
    summary = zs.summarize(predictions, labels, names)
    summary.update(lang=args.lang, templates=list(templates))
    print(tabulate([["top-1", f"{100 * summary['top1']:.2f}", f"{100 * summary['chance_top1']:.2f}"],
                    ["top-5", f"{100 * summary['top5']:.2f}", f"{100 * summary['chance_top5']:.2f}"]],
                   headers=[f"{summary['images']} images, {summary['classes']} classes",
                            "accuracy %", "chance %"]))
    if args.json:
        from .fileio import write_text
        write_text(args.json, json.dumps(summary, ensure_ascii=False, indent=1) + "\n")
    return 0


def main(argv=None):
    """Console script ernievil2-zeroshot."""
    sys.exit(run_main(run, argv) or 0)


if __name__ == "__main__":  # one process of run_zeroshot.sh
    main()

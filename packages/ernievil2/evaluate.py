"""Evaluate cross-modal retrieval from an embeddings file (drop-in for the official eval_retri.py).

  python eval_retri.py OUT_FILE [--protocol official|multi-caption] [--tsv TEST.tsv]
                       [--image-ids IDS.txt] [--chunk-size N] [--json results.json]

OUT_FILE is what inference writes: per line, D text floats, a tab, D image floats, a tab, an int
(the official run_infer.py writes 1; ours writes the 1-based TSV line number). Prints the
official table (and nothing else) on stdout.

Protocols:
  official       Line i's text matches line i's image and nothing else, exactly as the official
                 script (same numbers to the last printed digit; no multiple-of-10 rule). With
                 several captions per image, an image's other captions count as misses.
  multi-caption  Lines with the same image id share one image (AIC-ICC, Flickr, COCO with 5
                 captions). Images = distinct ids, each with its first line's image embedding.
                 Text2Image: a text hits R@K when its image is in the top K images. Image2Text:
                 an image hits R@K when ANY of its captions is in the top K texts. Image ids come
                 from --tsv (column 2 of the TSV, found through the line numbers in column 3; if
                 column 3 is the official constant 1, line i is TSV line i) or from --image-ids
                 (one id per line, line i for embedding line i).

Ties: the printed table counts a tied wrong candidate in the query's favour, as the official does
("optimistic"). The same pass also counts ties against the query ("pessimistic"); when the two R@1
differ by more than 1 point (collapsed embeddings score 100 optimistically) a one-line warning goes
to stderr, and --json holds both tables ("recall" / "table_percent" are the printed, optimistic
ones; "pessimistic" has "recall" and "table_percent" with ties counted against the query).

Scores are computed a block of rows at a time (never the N x N matrix). A binary sidecar
OUT_FILE.npz, when present and matching OUT_FILE's bytes, is loaded instead of parsing the text.
This module is the command's entry point (eval_retri.py calls main); the library never imports it.
"""
import argparse
import importlib
import json
import os
import sys
import threading
import warnings

from .data.tsv import DataError, image_ids_from_tsv, read_id_list
from .embeddings import read_embeddings
from .fileio import write_text
from .metrics.retrieval import (format_table, multi_caption_recall_both, official_recall_both,
                                percent_table, tie_warning)

PROG = "eval_retri.py"
# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> None:
    """Let glibc keep freed heap memory for reuse. The parse frees and allocates MB-sized arrays
    on every block; by default glibc returns them to the OS and each new one faults its pages in
    again (~20% of the parse's CPU time in a fresh process). Elsewhere: nothing to do."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(M_MMAP_THRESHOLD, 16 << 20)
    mallopt(M_TOP_PAD, 64 << 20)
    mallopt(M_TRIM_THRESHOLD, 128 << 20)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_file", help="embeddings file written by inference")
    p.add_argument("--protocol", choices=["official", "multi-caption"], default="official",
                   help="official (default): line i <-> line i; multi-caption: group lines by "
                        "image id (needs --tsv or --image-ids)")
    ids = p.add_mutually_exclusive_group()
    ids.add_argument("--tsv", help="multi-caption: the test TSV (text, image_id, base64 image)")
    ids.add_argument("--image-ids", help="multi-caption: a file with one image id per line")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="query rows scored per block (default: the official's 10 blocks when "
                        "they fit in ~64 MB of scores, else up to 1024 rows)")
    p.add_argument("--json", help="also write the results (fractions and printed percentages)")
    p.add_argument("--no-sidecar", action="store_true",
                   help="parse OUT_FILE even if OUT_FILE.npz exists")
    p.add_argument("--write-sidecar", action="store_true",
                   help="after parsing the text, write OUT_FILE.npz for faster re-evaluation")
    p.add_argument("--workers", type=int, default=None, help="threads for parsing the text")
    return p


def evaluate(args) -> tuple[dict, dict]:
    """Returns ({"optimistic": rows, "pessimistic": rows}, info)."""
    # format_table's tabulate import (~20 ms) runs while the parse leaves a core idle
    threading.Thread(target=importlib.import_module, args=("tabulate",), daemon=True).start()
    emb = read_embeddings(args.out_file, use_sidecar=not args.no_sidecar, workers=args.workers)
    if args.write_sidecar and emb.source == "text":
        from .embeddings import write_sidecar

        write_sidecar(args.out_file, emb)
    info = {"embeddings": os.path.abspath(args.out_file), "protocol": args.protocol,
            "num_lines": emb.num_lines, "dim": emb.dim, "loaded_from": emb.source}
    if args.protocol == "official":
        both = official_recall_both(emb.text, emb.image, chunk_size=args.chunk_size)
        info.update(num_texts=emb.num_lines, num_images=emb.num_lines)
        return both, info
    if args.tsv:
        line_numbers = None if emb.has_official_ids else emb.line_numbers
        if line_numbers is not None:
            emb.check_line_numbers(args.out_file)
        ids = image_ids_from_tsv(args.tsv, line_numbers, emb.num_lines)
        info["tsv"] = os.path.abspath(args.tsv)
    else:
        ids = read_id_list(args.image_ids)
        if len(ids) != emb.num_lines:
            raise DataError(args.image_ids, None, f"has {len(ids)} ids but the embeddings file has "
                            f"{emb.num_lines} lines")
        info["image_ids"] = os.path.abspath(args.image_ids)
    both = multi_caption_recall_both(emb.text, emb.image, ids, chunk_size=args.chunk_size)
    info.update(num_texts=emb.num_lines, num_images=len(set(ids)))
    return both, info


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.protocol == "multi-caption" and not (args.tsv or args.image_ids):
        parser.error("--protocol multi-caption needs --tsv TEST.tsv or --image-ids FILE")
    if args.protocol == "official" and (args.tsv or args.image_ids):
        parser.error("--tsv / --image-ids only apply to --protocol multi-caption")
    keep_freed_memory()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            both, info = evaluate(args)
        for w in caught:
            print(f"{PROG}: warning: {w.message}", file=sys.stderr)
        tied = tie_warning(both)
        if tied:
            print(f"{PROG}: warning: {tied}", file=sys.stderr)
        rows, worst = both["optimistic"], both["pessimistic"]
        print(format_table(rows))
        if args.json:  # a full disk leaves no file and one error line naming it
            write_text(args.json, json.dumps({**info, "recall": rows,
                                              "table_percent": percent_table(rows),
                                              "pessimistic": {"recall": worst,
                                                              "table_percent": percent_table(worst)}},
                                             indent=2, ensure_ascii=False) + "\n")
    except (OSError, ValueError) as e:  # DataError and EmbeddingFormatError are ValueErrors
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0

"""Build a vocab (`token<TAB>id` lines) from the captions and object tags of training TSVs.

    python tools/build_vocab.py TRAIN.tsv [MORE.tsv ...] --out vocab.txt [--max-size N]

Specials [PAD] [CLS] [SEP] [MASK] [UNK] get ids 0-4, then every CJK character, then the other
words and characters (ernievil2/tokenizer.py build_vocab): the vocab of a text tower trained
from scratch on these files. --max-size (e.g. the text config's vocab_size) leaves out the rarest
words until it fits. The trainer does the same by itself with `vocab_file: auto`.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages"))

from ernievil2.cli import run_main  # noqa: E402
from ernievil2.corpus_vocab import tsv_vocab  # noqa: E402
from ernievil2.tokenizer import write_vocab  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("tsv", nargs="+", metavar="TSV", help="text \\t image_id \\t base64 [\\t tags ...]")
    ap.add_argument("--out", required=True, metavar="VOCAB.txt")
    ap.add_argument("--max-size", type=int, default=None, metavar="N",
                    help="at most N tokens (rare words are left out to fit)")
    args = ap.parse_args(argv)
    if args.max_size is not None and args.max_size < 1:
        ap.error("--max-size must be positive")
    tokens, min_freq = tsv_vocab(args.tsv, args.max_size)
    write_vocab(tokens, args.out)
    note = f" (words seen at least {min_freq} times)" if min_freq > 1 else ""
    print(f"{len(tokens)} tokens in {args.out}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

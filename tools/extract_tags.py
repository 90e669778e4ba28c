"""Write object tags (column 4) into a training TSV: the top-k ImageNet classes of each image.

    python tools/extract_tags.py IN.tsv OUT.tsv [--lang zh|en] [--topk 3]
        [--weights ../shared/data/efficientnet_lite0/efficientnet_lite0_imagenet.npz]
        [--classes ../shared/data/imagenet_classes.tsv] [--batch 32]

Each image is classified once by the ImageNet EfficientNet-Lite0, and the names of its top-k
distinct classes, joined by spaces, become column 4 (ernievil2/tagging.py: columns 1-3 copied, a
label in column 5 kept; tags.py: the preprocessing and the name cleaning). Tags come from the
pixels only, never from the caption. OUT.tsv is written to a temporary name and moved into place,
so a failed run leaves no partial file (and IN.tsv may be OUT.tsv).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages"))

from ernievil2.data.tsv import DataError  # noqa: E402
from ernievil2.tags import ObjectTagger  # noqa: E402
from ernievil2.tagging import extract_tags  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_WEIGHTS = SHARED / "efficientnet_lite0" / "efficientnet_lite0_imagenet.npz"
DEFAULT_CLASSES = SHARED / "imagenet_classes.tsv"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("input", metavar="IN.tsv")
    ap.add_argument("output", metavar="OUT.tsv")
    ap.add_argument("--lang", choices=["zh", "en"], default="zh", help="class-name language (default zh)")
    ap.add_argument("--topk", type=int, default=3, help="tags per image (default 3)")
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS),
                    help="EfficientNet-Lite0 ImageNet npz (lukemelas-style names)")
    ap.add_argument("--classes", default=str(DEFAULT_CLASSES),
                    help="imagenet_classes.tsv (class_index, wnid, label_en, label_zh)")
    ap.add_argument("--batch", type=int, default=32, help="images per classifier call")
    ap.add_argument("--workers", type=int, default=2, help="decode/preprocess threads")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.topk < 1 or args.batch < 1:
        ap.error("--topk and --batch must be positive")
    for what, p in (("input", args.input), ("--weights", args.weights), ("--classes", args.classes)):
        if not Path(p).is_file():
            print(f"extract_tags: error: {what} {p}: no such file", file=sys.stderr)
            return 1
    try:
        tagger = ObjectTagger.lite0(args.weights, args.classes, args.lang, args.topk, args.batch)
        n, images = extract_tags(args.input, args.output, tagger, args.batch, args.workers,
                                 progress=not args.no_progress)
    except (DataError, ValueError) as e:
        print(f"extract_tags: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {n} lines ({images} images, top-{args.topk} {args.lang} tags) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

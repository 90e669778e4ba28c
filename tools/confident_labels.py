"""Image-label data from a classifier: the ImageNet EfficientNet-Lite0's top-1 class of each image
of a folder, kept where its softmax probability reaches --min-prob, as a labels list.

    python tools/confident_labels.py IMAGES_DIR OUT_LIST [--only NAMES] [--min-prob 0.5]
        [--weights ../shared/data/efficientnet_lite0/efficientnet_lite0_imagenet.npz]
        [--classes ../shared/data/imagenet_classes.tsv]

OUT_LIST has the lines `file_name \\t class_index` (after a header `path \\t label`), the
input of `tools/build_tsv.py labels OUT_LIST OUT.tsv --images-dir IMAGES_DIR --classes CLASSES`. --only: a file of image file names (one a line) to
classify instead of every image of the folder. Preprocessing is the classifier's own
(tags.classifier_transform); the written file is complete or absent (fileio.write_text).
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages"))

from ernievil2.data.tsv import DataError, read_id_list  # noqa: E402
from ernievil2.fileio import write_text  # noqa: E402
from ernievil2.tags import ObjectTagger, classifier_transform  # noqa: E402
from ernievil2.transforms import decode_image  # noqa: E402
from ernievil2.zeroshot import IMAGE_SUFFIXES  # noqa: E402
from extract_tags import DEFAULT_CLASSES, DEFAULT_WEIGHTS  # noqa: E402  (tools/, beside this one)



def softmax(logits):
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("images_dir", metavar="IMAGES_DIR")
    ap.add_argument("out", metavar="OUT_LIST")
    ap.add_argument("--only", metavar="NAMES", help="image file names to classify, one a line")
    ap.add_argument("--min-prob", type=float, default=0.5, help="keep a top-1 class from this probability")
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="EfficientNet-Lite0 ImageNet npz")
    ap.add_argument("--classes", default=str(DEFAULT_CLASSES), help="imagenet_classes.tsv")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)
    try:
        names = (read_id_list(args.only) if args.only else
                 sorted(n for n in os.listdir(args.images_dir) if n.lower().endswith(IMAGE_SUFFIXES)))
        tagger = ObjectTagger.lite0(args.weights, args.classes, "en", 1, args.batch)
        kept = []
        for start in range(0, len(names), args.batch):
            chunk = names[start:start + args.batch]
            pixels = []
            for name in chunk:
                with open(os.path.join(args.images_dir, name), "rb") as f:
                    pixels.append(classifier_transform(decode_image(f.read())))
            prob = softmax(tagger.logits(np.stack(pixels)))
            for name, p in zip(chunk, prob):
                if p.max() >= args.min_prob:
                    kept.append(f"{name}\t{int(p.argmax())}")
    except (DataError, ValueError, OSError) as e:
        print(f"confident_labels: error: {e}", file=sys.stderr)
        return 1
    write_text(args.out, "path\tlabel\n" + "".join(k + "\n" for k in kept))
    print(f"{len(kept)} of {len(names)} images with a top-1 probability >= {args.min_prob} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build ERNIE-ViL 2.0 TSV files (``caption \\t image_id \\t base64 image``) from the public sets.

  python tools/build_tsv.py folder IMAGES_DIR CAPTIONS OUT.tsv
  python tools/build_tsv.py coco-cn COCO_CN_DIR COCO_IMAGES OUT.tsv --split test
  python tools/build_tsv.py flickr30k-cn CAPTIONS IMAGES_DIR OUT.tsv [--image-list LIST]
  python tools/build_tsv.py aic-icc ANNOTATIONS.json IMAGES_DIR OUT.tsv
  python tools/build_tsv.py muge IMGS_TSV TEXTS_JSONL OUT.tsv
  python tools/build_tsv.py flickr8k-cn DATA_DIR OUT_DIR --lang zh
  python tools/build_tsv.py labels CLASS_FOLDERS_OR_LIST OUT.tsv [--classes FILE --lang zh]

Run a sub-command with --help for its input format. The formats and their sources are
documented in packages/ernievil2/datasets/__init__.py.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "packages"))

from ernievil2 import datasets as cv  # noqa: E402
from ernievil2.data.tsv import DataError  # noqa: E402

COMMON_HELP = """
output: one line per caption (default) or per image (--one-per-image); images embedded as their
original bytes unless --max-side. A missing/unreadable image stops the run (no output file is
left) unless --skip-missing. Files for the official run_infer.py must have exactly 3 columns:
do not use --tags-from for them.
"""


def common_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output options")
    g.add_argument("--one-per-image", action="store_true",
                   help="one line per image (its first caption) instead of one per caption")
    g.add_argument("--tags-from", metavar="FILE",
                   help="TSV 'image_id<TAB>tags' (space-separated words) for a 4th column (training only)")
    g.add_argument("--skip-missing", action="store_true",
                   help="skip captions whose image is missing or unreadable (counted and reported)")
    g.add_argument("--max-side", type=int, metavar="N",
                   help="shrink images whose long side exceeds N (cv2 INTER_AREA, JPEG quality 95)")
    g.add_argument("--verify-images", action="store_true",
                   help="fully decode every image with cv2 (catches truncated files; slower)")
    g.add_argument("--max-images", type=int, metavar="N", help="keep only the first N images")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = [common_options()]
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("folder", parents=common, formatter_class=fmt, help="image folder + caption TSV or COCO JSON",
                       description="""An image folder and a caption file, either
  TSV   image_file<TAB>caption   or   image_file<TAB>image_id<TAB>caption
        (image_file relative to IMAGES_DIR; without an id column the id is the file name minus
        its extension; a header line such as 'image_file<TAB>caption' is detected), or
  COCO captions JSON  {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}
        (e.g. captions_val2014.json; the id written is images[].id).""" + COMMON_HELP)
    p.add_argument("images_dir", metavar="IMAGES_DIR")
    p.add_argument("captions", metavar="CAPTIONS")
    p.add_argument("out", metavar="OUT.tsv")
    p.add_argument("--columns", choices=["auto", "2", "3"], default="auto",
                   help="TSV layout (auto: from the first data line)")
    p.add_argument("--header", choices=["auto", "yes", "no"], default="auto", help="TSV header line")

    p = sub.add_parser("coco-cn", parents=common, formatter_class=fmt, help="COCO-CN (li-xirong/coco-cn)",
                       description="""COCO-CN (github.com/li-xirong/coco-cn, coco-cn-version1805v1.1):
  COCO_CN_DIR holds coco-cn_{train,val,test}.txt (one id a line, e.g. COCO_val2014_000000123456)
  and imageid.human-written-caption.txt ('COCO_val2014_000000123456#0<TAB>sentence' lines) /
  imageid.manually-translated-caption.txt ('COCO_val2014_000000123456#zhm#0 sentence').
  COCO_IMAGES is the MS-COCO root with train2014/ and val2014/ (COCO_*.jpg); train2017/ and
  val2017/ (000000123456.jpg) are found too.
The ERNIE-ViL 2.0 COCO-CN test set is --split test with the human-written sentences: 1,000
images, 1,053 sentences. Object tags: --tags-from COCO_CN_DIR/imageid.human-written-tags.txt.""" + COMMON_HELP)
    p.add_argument("coco_cn_dir", metavar="COCO_CN_DIR")
    p.add_argument("coco_images", metavar="COCO_IMAGES")
    p.add_argument("out", metavar="OUT.tsv")
    p.add_argument("--split", choices=["train", "val", "test", "all"], default="test",
                   help="which coco-cn_<split>.txt list (all: every image with a sentence)")
    p.add_argument("--split-list", metavar="FILE", help="an image-id list instead of coco-cn_<split>.txt")
    p.add_argument("--captions", default="human-written", metavar="KIND|FILE",
                   help="human-written (default), manually-translated, or a sentence file path")
    p.add_argument("--image-root", action="append", default=[], metavar="DIR",
                   help="another folder to look for images in (repeatable)")

    p = sub.add_parser("flickr30k-cn", parents=common, formatter_class=fmt,
                       help="Flickr30k-CN / Flickr8k-CN (Lan et al. 2017)",
                       description="""Flickr30k-CN / Flickr8k-CN (Lan, Li, Dong, ACM MM 2017; read by github.com/weiyuk/fluent-cap).
  CAPTIONS is a collection folder (e.g. flickr30kzhmbosontest/ with ImageSets/<name>.txt and
  TextData/seg.<name>.caption.txt) or a caption file with lines
      1000092795#zhm#0 word:pos word:pos ...      (id, first space, segmented sentence)
      1000092795.jpg#zhb#0<TAB>sentence
  IMAGES_DIR is flickr30k-images/ (<id>.jpg).
Segmented text (file name seg.*) is joined back (--detok): ':pos' suffixes dropped, no spaces
between Chinese words, '，' where a run of spaces marks removed punctuation.
Test set: flickr30kzhmbosontest (human translations, 1,000 images x 5).""" + COMMON_HELP)
    p.add_argument("captions", metavar="CAPTIONS")
    p.add_argument("images_dir", metavar="IMAGES_DIR")
    p.add_argument("out", metavar="OUT.tsv")
    p.add_argument("--image-list", metavar="FILE",
                   help="the split's image ids, one a line (default: the collection's ImageSets list; "
                        "without a list every captioned image)")
    p.add_argument("--detok", choices=["auto", "on", "off"], default="auto",
                   help="undo word segmentation (auto: when the caption file name starts with 'seg.')")

    p = sub.add_parser("aic-icc", parents=common, formatter_class=fmt, help="AI Challenger image captioning",
                       description="""AI Challenger 2017 image captioning (github.com/AIChallenger/AI_Challenger_2017):
  ANNOTATIONS.json is caption_{train,validation}_annotations_2017xxxx.json, a JSON list of
      {"url": ..., "image_id": "<sha1>.jpg", "caption": [5 sentences]}
  IMAGES_DIR is caption_{train,validation}_images_2017xxxx/. The id written is the file stem.
Newlines inside a sentence are deleted (as the official baseline does), other tabs/line breaks
become spaces, empty sentences are skipped (all counted). With 5 captions per
image the official eval_retri.py counts an image's other captions as misses in Image2Text
(ERNIE #898); --one-per-image gives a 1:1 file.""" + COMMON_HELP)
    p.add_argument("annotations", metavar="ANNOTATIONS.json")
    p.add_argument("images_dir", metavar="IMAGES_DIR")
    p.add_argument("out", metavar="OUT.tsv")
    p.add_argument("--image-list", metavar="FILE", help="only these image ids (one a line), in this order")

    p = sub.add_parser("muge", parents=common, formatter_class=fmt, help="MUGE / Chinese-CLIP tsv+jsonl",
                       description="""MUGE retrieval in the Chinese-CLIP layout (github.com/OFA-Sys/Chinese-CLIP):
  IMGS_TSV     {split}_imgs.tsv, lines 'image_id<TAB>base64 image'
  TEXTS_JSONL  {split}_texts.jsonl, lines {"text_id": 8428, "text": "...", "image_ids": [1076345, 517602]}
One line per (text, image id); the base64 is validated and copied as is (URL-safe -_ mapped to
+/). MUGE test texts have no image_ids, so only train/valid give lines.""" + COMMON_HELP)
    p.add_argument("imgs_tsv", metavar="IMGS_TSV")
    p.add_argument("texts_jsonl", metavar="TEXTS_JSONL")
    p.add_argument("out", metavar="OUT.tsv")

    p = sub.add_parser("flickr8k-cn", parents=common, formatter_class=fmt,
                       help="the project's Flickr8k-CN reference folder (../shared/data/flickr8k_cn)",
                       description="""The project's reference folder ../shared/data/flickr8k_cn:
  DATA_DIR/captions_{train,val}.tsv with the header 'image_file<TAB>image_id<TAB>lang<TAB>caption'
  (lang zh or en, 5 each per image) and DATA_DIR/images/.
Writes OUT_DIR/flickr8k_cn_<split>_<lang>.tsv for each split (val zh: 113 images x 5 = 565 lines).""" + COMMON_HELP)
    p.add_argument("data_dir", metavar="DATA_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--lang", choices=["zh", "en", "both"], default="zh")
    p.add_argument("--splits", default="train,val", help="comma-separated (default train,val)")

    p = sub.add_parser("labels", parents=common, formatter_class=fmt,
                       help="labelled images: class sub-folders or a 'path<TAB>label' list (UniCL)",
                       description="""Labelled images (UniCL's image-label data), either
  a folder of class sub-folders   DIR/<label>/*.jpg   (the sub-folder name is the label), or
  a list file   image_path<TAB>label   (paths relative to --images-dir, default the list's
        folder; an optional header line 'path<TAB>label').
A label is a class index or a class name. With --classes (imagenet_classes.tsv: class_index,
wnid, label_en, label_zh; or one name a line) each label is checked and written as its class
index, with the class name (--lang) in column 1; without it the label is written as given.
Output: class name, image id, base64 image, tags (empty unless --tags-from), label. Train on it
with train_files: [[OUT.tsv, WEIGHT, label]] and label_classes.""" + COMMON_HELP)
    p.add_argument("labels", metavar="CLASS_FOLDERS_OR_LIST")
    p.add_argument("out", metavar="OUT.tsv")
    p.add_argument("--images-dir", metavar="DIR", help="root of a list file's image paths")
    p.add_argument("--classes", metavar="FILE", help="class-name file to check labels against")
    p.add_argument("--lang", choices=["zh", "en"], default="zh",
                   help="class-name language of column 1 with --classes (default zh)")
    return ap


def coco_cn_inputs(args) -> tuple[str, str | None]:
    kinds = {"human-written": "imageid.human-written-caption.txt",
             "manually-translated": "imageid.manually-translated-caption.txt"}
    captions = os.path.join(args.coco_cn_dir, kinds[args.captions]) if args.captions in kinds else args.captions
    split_list = args.split_list
    if split_list is None and args.split != "all":
        split_list = os.path.join(args.coco_cn_dir, f"coco-cn_{args.split}.txt")
    return captions, split_list


def parse(args) -> list[tuple[cv.ParseResult, str]]:
    """(parsed records, output path) for each file the command writes."""
    c = args.command
    if c == "folder":
        return [(cv.parse_folder(args.captions, args.images_dir, args.columns, args.header), args.out)]
    if c == "coco-cn":
        captions, split_list = coco_cn_inputs(args)
        roots = [args.coco_images] + args.image_root
        return [(cv.parse_coco_cn(captions, roots, split_list), args.out)]
    if c == "flickr30k-cn":
        return [(cv.parse_flickr_cn(args.captions, args.images_dir, args.image_list, args.detok), args.out)]
    if c == "aic-icc":
        return [(cv.parse_aic_icc(args.annotations, args.images_dir, args.image_list), args.out)]
    if c == "muge":
        return [(cv.parse_muge(args.imgs_tsv, args.texts_jsonl), args.out)]
    if c == "flickr8k-cn":
        splits = [s.strip() for s in args.splits.split(",") if s.strip()]
        return [(cv.parse_flickr8k_cn_reference(args.data_dir, s, args.lang),
                 os.path.join(args.out_dir, f"flickr8k_cn_{s}_{args.lang}.tsv")) for s in splits]
    if c == "labels":
        return [(cv.parse_labels(args.labels, args.images_dir, args.classes, args.lang), args.out)]
    raise AssertionError(c)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tags = cv.load_tags(args.tags_from) if args.tags_from else None
        jobs = parse(args)
        for result, out in jobs:
            for note in result.notes:
                print(f"note: {note}", file=sys.stderr)
            stats = cv.write_pairs_tsv(
                result.records, out, one_per_image=args.one_per_image, tags=tags,
                skip_missing=args.skip_missing, max_side=args.max_side, verify=args.verify_images,
                max_images=args.max_images, progress=not args.no_progress)
            print(stats.summary())
    except (cv.ConversionError, DataError) as e:
        print(f"build_tsv {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Draw the demo dataset: coloured shapes on plain backgrounds, with zh and en captions that
describe them, written in the official TSV format, plus a vocab built from those captions.

Nothing comes from ../shared or the network, so `make demo` runs anywhere.

  python tools/make_demo_data.py --out demo_out [--train 1200 --val 200 --test 200 --seed 0]
"""
import argparse
import base64
import os
import sys

import cv2
import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "packages"))

from ernievil2.fileio import atomic_write  # noqa: E402
from ernievil2.tokenizer import build_vocab, write_vocab  # noqa: E402

# colour name (zh, en) -> RGB
COLOURS = {("红色", "red"): (220, 30, 30), ("绿色", "green"): (30, 170, 40),
           ("蓝色", "blue"): (30, 60, 220), ("黄色", "yellow"): (235, 210, 20),
           ("紫色", "purple"): (140, 40, 170), ("橙色", "orange"): (245, 130, 20)}
SHAPES = [("圆形", "circle"), ("方块", "square"), ("三角形", "triangle")]
PLACES = [("左边", "left"), ("右边", "right"), ("上面", "top"), ("下面", "bottom")]
COUNTS = [("一个", "one", 1), ("两个", "two", 2)]


def draw(rng, colour, shape, place, count, size=96):
    bg = rng.integers(200, 256, 3)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = bg
    cx, cy = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28),
              "bottom": (0.5, 0.72)}[place]
    r = int(size * rng.uniform(0.09, 0.13))
    for k in range(count):
        off = (k - (count - 1) / 2) * 2.3 * r
        x = int(cx * size + (off if place in ("top", "bottom") else 0) + rng.integers(-3, 4))
        y = int(cy * size + (off if place in ("left", "right") else 0) + rng.integers(-3, 4))
        c = tuple(int(v) for v in np.clip(np.array(colour) + rng.integers(-20, 21, 3), 0, 255))
        if shape == "circle":
            cv2.circle(img, (x, y), r, c, -1)
        elif shape == "square":
            cv2.rectangle(img, (x - r, y - r), (x + r, y + r), c, -1)
        else:
            pts = np.array([[x, y - r], [x - r, y + r], [x + r, y + r]], np.int32)
            cv2.fillPoly(img, [pts], c)
    return img


def caption(lang, colour, shape, place, count):
    (czh, cen), (szh, sen), (pzh, pen), (nzh, nen, n) = colour, shape, place, count
    if lang == "zh":
        return f"{pzh}有{nzh}{czh}的{szh}"
    plural = {"circle": "circles", "square": "squares", "triangle": "triangles"}[sen] if n > 1 else sen
    article = ("an" if cen[0] in "aeiou" else "a") if n == 1 else nen
    return f"{article} {cen} {plural} on the {pen}"


def make_split(rng, n, start_id):
    """n images, each with a zh and an en caption (two lines per image, same image id)."""
    rows = []
    colours = list(COLOURS)
    for k in range(n):
        colour = colours[rng.integers(len(colours))]
        shape, place, count = (SHAPES[rng.integers(len(SHAPES))], PLACES[rng.integers(len(PLACES))],
                               COUNTS[rng.integers(len(COUNTS))])
        img = draw(rng, COLOURS[colour], shape[1], place[1], count[2])
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        b64 = base64.b64encode(buf.tobytes()).decode()
        tags = f"{colour[1]} {shape[1]}"
        image_id = f"demo{start_id + k:05d}"
        for lang in ("zh", "en"):
            rows.append((caption(lang, colour, shape, place, count), image_id, b64, tags))
    return rows


def write_tsv(path, rows, with_tags):
    with atomic_write(path, "w", encoding="utf-8", newline="\n") as f:
        for text, image_id, b64, tags in rows:
            f.write("\t".join([text, image_id, b64] + ([tags] if with_tags else [])) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--train", type=int, default=1200, help="training images (2 captions each)")
    p.add_argument("--val", type=int, default=100)
    p.add_argument("--test", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    splits = {}
    with tqdm(total=3, desc="drawing demo images", unit="split") as bar:
        for name, n, start in (("train", args.train, 0), ("val", args.val, 100000),
                               ("test", args.test, 200000)):
            splits[name] = make_split(rng, n, start)
            bar.update()
    write_tsv(os.path.join(args.out, "train.tsv"), splits["train"], with_tags=True)
    write_tsv(os.path.join(args.out, "val.tsv"), splits["val"], with_tags=False)
    write_tsv(os.path.join(args.out, "test.tsv"), splits["test"], with_tags=False)
    texts = [r[0] for rows in splits.values() for r in rows] + [r[3] for r in splits["train"]]
    write_vocab(build_vocab(texts), os.path.join(args.out, "vocab.txt"))
    print(f"wrote {args.out}/{{train,val,test}}.tsv ({len(splits['train'])}/{len(splits['val'])}/"
          f"{len(splits['test'])} lines) and vocab.txt")


if __name__ == "__main__":
    main()

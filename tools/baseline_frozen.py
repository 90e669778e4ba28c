"""Frozen-feature retrieval baseline for a train/val TSV pair (e.g. Flickr8k-CN).

    python tools/baseline_frozen.py TRAIN.tsv VAL.tsv [--weights NPZ] [--image-size 224]
        [--dim 256] [--epochs 4] [--batch 64] [--lr 5e-3] [--weight-decay 0.05] [--seed 0]
        [--cache DIR] [--out RESULT.json]

Image side: the ImageNet EfficientNet-Lite0's pooled 1280-d features (frozen; computed once per
distinct image with the trainer's own eval transform, optionally cached in DIR), standardised
with train statistics, then a linear map. Text side: a bag of character n-grams (unigrams and
bigrams with begin/end markers, the vocabulary from the training captions; TF weights, L2
normalised), then a linear map (an embedding bag). Both maps are trained with the symmetric
InfoNCE loss (learnable temperature, CLIP targets) by AdamW on Paddle, and scored on VAL with the
project's metric code (ernievil2.metrics.retrieval) in the official one-to-one protocol and the
multi-caption protocol (in percent). This is what the recipe's towers must beat.

The defaults (4 epochs, batch 64, lr 5e-3) were chosen on 113 images held out of the Flickr8k-CN
TRAINING split, never on val: longer training overfits (30 epochs: -3 points there).
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages"))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ernievil2.data.tsv import DataError, iter_records, record_image_bytes  # noqa: E402
from ernievil2.fileio import atomic_path, write_text  # noqa: E402
from ernievil2.metrics.retrieval import (  # noqa: E402
    multi_caption_recall,
    official_recall,
    percent_table,
)
from ernievil2.transforms import HALF_MEAN, HALF_STD, decode_image, make_eval_transform  # noqa: E402

DEFAULT_WEIGHTS = (Path(__file__).resolve().parents[2] / "shared" / "data" / "efficientnet_lite0"
                   / "efficientnet_lite0_imagenet.npz")
BOS, EOS = "\x02", "\x03"  # caption boundary markers of the bigrams


# ------------------------------------------------------------------------------------ data
def read_pairs(path):
    """(captions, image ids, {image id: base64 of its first line}) of a TSV."""
    texts, ids, images = [], [], {}
    for r in iter_records(path):
        key = r.image_id or f"line{r.line_no}"
        texts.append(r.text)
        ids.append(key)
        images.setdefault(key, (r.line_no, r))
    return texts, ids, images


def _cache_file(cache_dir, path, image_size, weights):
    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{image_size}|{os.path.abspath(weights)}"
    return Path(cache_dir) / f"lite0_feats_{Path(path).stem}_{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"


def image_features(path, images, image_size, weights, batch=32, cache_dir=None, progress=True):
    """{image id: pooled Lite0 feature [1280]} for the distinct images of one file."""
    cache = _cache_file(cache_dir, path, image_size, weights) if cache_dir else None
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            feats = dict(zip(z["ids"].tolist(), z["feats"]))
        if set(feats) == set(images):
            return feats
    import paddle
    from ernievil2.models.efficientnet import build_efficientnet
    from ernievil2.models.lite0_port import load_lite0_npz

    model = build_efficientnet("lite0", with_classifier=False)
    load_lite0_npz(model, weights)
    model.eval()
    tf = make_eval_transform(image_size, mean=HALF_MEAN, std=HALF_STD)
    keys = list(images)
    feats = {}
    with paddle.no_grad():
        for a in tqdm(range(0, len(keys), batch), desc=f"Lite0 features {Path(path).name}",
                      unit="batch", disable=not progress):
            chunk = keys[a:a + batch]
            pix = []
            for k in chunk:
                line_no, rec = images[k]
                try:
                    pix.append(tf(decode_image(record_image_bytes(path, rec))))
                except DataError:
                    raise
                except ValueError as e:
                    raise DataError(path, line_no, f"image: {e}") from None
            out = model.forward_features(paddle.to_tensor(np.stack(pix))).numpy()
            feats.update(zip(chunk, out))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache) as tmp:  # the temporary keeps .npz, so savez adds nothing
            np.savez(tmp, ids=np.asarray(keys), feats=np.stack([feats[k] for k in keys]))
    return feats


# ------------------------------------------------------------------------------------ text
def char_ngrams(text, n_max=2):
    """Character unigrams and bigrams (with begin/end markers) of a caption, whitespace removed."""
    chars = [c for c in text.lower() if not c.isspace()]
    grams = list(chars)
    if n_max >= 2:
        seq = [BOS, *chars, EOS]
        grams += [a + b for a, b in zip(seq, seq[1:])]
    return grams


class NgramBag:
    """Vocabulary of the training captions' n-grams; texts -> padded (ids, TF-L2 weights)."""

    def __init__(self, texts, min_count=1):
        counts = Counter(g for t in texts for g in char_ngrams(t))
        self.vocab = {g: i + 1 for i, g in enumerate(sorted(g for g, c in counts.items()
                                                             if c >= min_count))}  # 0 = padding

    def __len__(self):
        return len(self.vocab) + 1

    def encode(self, texts):
        rows = []
        for t in texts:
            c = Counter(self.vocab[g] for g in char_ngrams(t) if g in self.vocab)
            rows.append(c)
        width = max(1, max(len(c) for c in rows))
        ids = np.zeros((len(texts), width), np.int64)
        w = np.zeros((len(texts), width), np.float32)
        for i, c in enumerate(rows):
            if not c:
                continue
            k, v = zip(*sorted(c.items()))
            v = np.asarray(v, np.float32)
            ids[i, :len(k)] = k
            w[i, :len(k)] = v / np.linalg.norm(v)
        return ids, w


# ----------------------------------------------------------------------------------- model
def build_model(feat_dim, vocab_size, dim, seed):
    import paddle
    import paddle.nn as nn

    paddle.seed(seed)

    class Baseline(nn.Layer):
        def __init__(self):
            super().__init__()
            self.image_map = nn.Linear(feat_dim, dim)
            self.text_map = nn.Embedding(vocab_size, dim, padding_idx=0)  # = a linear map of the bag
            self.logit_scale = self.create_parameter(
                [1], default_initializer=nn.initializer.Constant(math.log(1 / 0.07)))

        def encode_image(self, x):
            return nn.functional.normalize(self.image_map(x), axis=-1)

        def encode_text(self, ids, w):
            return nn.functional.normalize((self.text_map(ids) * w.unsqueeze(-1)).sum(1), axis=-1)

    return Baseline()


def info_nce(img, txt, logit_scale):
    import paddle
    import paddle.nn.functional as F

    logits = paddle.exp(logit_scale) * img @ txt.T
    labels = paddle.arange(img.shape[0], dtype="int64")
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def train_and_eval(train_x, train_ids, train_w, val_x, val_ids_t, val_w, val_image_ids, args,
                   progress=True):
    import paddle

    model = build_model(train_x.shape[1], args.vocab_size, args.dim, args.seed)
    steps_per_epoch = len(train_x) // args.batch
    total = steps_per_epoch * args.epochs
    sched = paddle.optimizer.lr.CosineAnnealingDecay(args.lr, T_max=max(1, total))
    decay = {model.image_map.weight.name, model.text_map.weight.name}
    opt = paddle.optimizer.AdamW(learning_rate=sched, parameters=model.parameters(),
                                 weight_decay=args.weight_decay,
                                 apply_decay_param_fun=lambda n: n in decay)
    rng = np.random.default_rng(args.seed)
    X, T, W = (paddle.to_tensor(a) for a in (train_x, train_ids, train_w))
    bar = tqdm(total=total, desc="baseline", unit="step", disable=not progress)
    loss = None
    for _ in range(args.epochs):
        perm = rng.permutation(len(train_x))
        for s in range(steps_per_epoch):
            idx = paddle.to_tensor(perm[s * args.batch:(s + 1) * args.batch])
            loss = info_nce(model.encode_image(X[idx]), model.encode_text(T[idx], W[idx]),
                            model.logit_scale)
            loss.backward()
            opt.step()
            opt.clear_grad()
            sched.step()
            with paddle.no_grad():
                model.logit_scale.set_value(paddle.clip(model.logit_scale, max=math.log(100)))
            bar.update()
    bar.close()
    with paddle.no_grad():
        img = model.encode_image(paddle.to_tensor(val_x)).numpy()
        txt = model.encode_text(paddle.to_tensor(val_ids_t), paddle.to_tensor(val_w)).numpy()
    # in percent, as the trainer's validation records and eval_retri.py
    return {"official": percent_table(official_recall(txt, img)),
            "multi_caption": percent_table(multi_caption_recall(txt, img, val_image_ids)),
            "final_loss": float(loss) if loss is not None else None}


def run(args, progress=True):
    t0 = time.time()
    tr_texts, tr_ids, tr_images = read_pairs(args.train)
    va_texts, va_ids, va_images = read_pairs(args.val)
    tr_feats = image_features(args.train, tr_images, args.image_size, args.weights, args.feature_batch,
                              args.cache, progress)
    va_feats = image_features(args.val, va_images, args.image_size, args.weights, args.feature_batch,
                              args.cache, progress)
    t_feats = time.time() - t0
    tr_x = np.stack([tr_feats[k] for k in tr_ids]).astype(np.float32)
    va_x = np.stack([va_feats[k] for k in va_ids]).astype(np.float32)
    uniq = np.stack(list(tr_feats.values()))  # statistics over distinct images, not captions
    mean, std = uniq.mean(0), uniq.std(0) + 1e-6
    tr_x, va_x = (tr_x - mean) / std, (va_x - mean) / std
    bag = NgramBag(tr_texts, args.min_count)
    args.vocab_size = len(bag)
    tr_t, tr_w = bag.encode(tr_texts)
    va_t, va_w = bag.encode(va_texts)
    result = train_and_eval(tr_x, tr_t, tr_w, va_x, va_t, va_w, va_ids, args, progress)
    result.update({
        "train": args.train, "val": args.val, "train_lines": len(tr_texts),
        "train_images": len(tr_images), "val_lines": len(va_texts), "val_images": len(va_images),
        "ngram_vocab": len(bag) - 1, "image_size": args.image_size, "dim": args.dim,
        "epochs": args.epochs, "batch": args.batch, "lr": args.lr,
        "weight_decay": args.weight_decay, "seed": args.seed,
        "feature_seconds": round(t_feats, 1), "total_seconds": round(time.time() - t0, 1)})
    return result


def summary(result):
    def pct(row):
        return " ".join(f"{k} {v:.2f}" for k, v in row.items())
    lines = []
    for proto in ("official", "multi_caption"):
        for name, row in result[proto].items():
            lines.append(f"{proto:13s} {name:10s} {pct(row)}")
    return "\n".join(lines)


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("train", metavar="TRAIN.tsv")
    ap.add_argument("val", metavar="VAL.tsv")
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="EfficientNet-Lite0 ImageNet npz")
    ap.add_argument("--image-size", type=int, default=224, help="eval-transform size (default 224)")
    ap.add_argument("--dim", type=int, default=256, help="joint space width")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--min-count", type=int, default=1, help="n-grams seen fewer times are dropped")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--feature-batch", type=int, default=32)
    ap.add_argument("--cache", metavar="DIR", help="keep the image features here (npz per file)")
    ap.add_argument("--out", metavar="RESULT.json", help="write the result as JSON")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    for p in (args.train, args.val, args.weights):
        if not Path(p).is_file():
            print(f"baseline_frozen: error: {p}: no such file", file=sys.stderr)
            return 1
    try:
        result = run(args, progress=not args.no_progress)
    except (DataError, ValueError) as e:
        print(f"baseline_frozen: error: {e}", file=sys.stderr)
        return 1
    print(summary(result))
    print(f"({result['total_seconds']} s, of which {result['feature_seconds']} s image features)")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text(out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

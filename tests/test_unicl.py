"""UniCL's image-label branch: label rows with drawn prompts mixed with image-text rows, their
target matrix and loss against a hand computation, weighted sampling, 2 processes = 1, errors."""
import json
import math
import subprocess
import sys

import numpy as np
import paddle
import pytest
import yaml

from _unicl_data import CLASSES, TEMPLATES, mixed_files, write_classes, write_label_file, write_templates
from conftest import ROOT
from ernievil2.cli import load_train_config
from ernievil2.config import ConfigError
from ernievil2.data.tsv import DataError
from ernievil2.losses import MultiViewContrastiveLoss, id_targets
from ernievil2.tokenizer import ErnieTokenizer
from ernievil2.train.data import (LabelPrompts, MixedSampler, MultiViewBatcher, TrainIndex,
                                  TrainSources, label_prompts, sources_of)
from ernievil2.transforms import make_eval_transform, make_train_transform
from helpers import launch_worker, tiny_config


def sources(tmp_path, unicl_key="image_id"):
    text, labels, _ = mixed_files(tmp_path)
    prompts = LabelPrompts(CLASSES, TEMPLATES)
    index = TrainSources([TrainIndex(text), TrainIndex(labels, need_labels="a label file")],
                         [1.0, 0.5], ["text", "label"], resolve=prompts.resolve, unicl_key=unicl_key)
    return index, prompts


def batcher(tmp_path, views=("image", "text"), rank=0, world=1, **kw):
    index, prompts = sources(tmp_path)
    tok = ErnieTokenizer.from_file(str(tmp_path / "vocab.txt"), max_seq_len=16)
    return MultiViewBatcher(index, list(views), tok, make_train_transform(32), make_eval_transform(32),
                            seed=5, rank=rank, world_size=world, num_workers=0, prompts=prompts, **kw)


def decoded(b, key):
    """The token ids of each row of a padded text view, without padding."""
    return [[t for t in row if t != b.tok.pad_id] for row in key]


# ------------------------------------------------------------------ targets and loss by hand
def test_two_label_rows_of_one_class_and_two_text_rows_targets_and_loss_by_hand(tmp_path):
    # global rows 0-5: the text file (images "0", "0", "1", "1", "2", "2"); 6-13: the label file.
    # Label rows 6 and 7: class 1 ("circle", given once as index "1", once as name), image ids
    # "0" and "1" (the text file's ids, another file). Text rows 0 and 2: images 0 and 1, whose
    # image indices (0, 1) equal class indices: a naive id would make rows 7 and 2 positives.
    b = batcher(tmp_path)
    rows = np.array([6, 0, 7, 2])
    batch = b.batch(0, rows)
    hand = np.array([[.5, 0, .5, 0],   # label row: both label rows of class 1
                     [0, 1, 0, 0],     # text row: only itself (one caption of image 0 here)
                     [.5, 0, .5, 0],
                     [0, 0, 0, 1]])
    np.testing.assert_array_equal(id_targets(paddle.to_tensor(batch["ids"]),
                                             paddle.to_tensor(batch["ids"])).numpy(), hand)

    rng = np.random.default_rng(0)
    img, txt = (rng.standard_normal((4, 8)) for _ in range(2))
    img, txt = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (img, txt))
    scale = 7.0
    logits = scale * img @ txt.T

    def soft_ce(z, t):  # -sum_j t_ij log softmax(z)_ij, averaged over rows, written out
        out = 0.0
        for i in range(len(z)):
            log_norm = math.log(sum(math.exp(v) for v in z[i]))
            out -= sum(t[i, j] * (z[i, j] - log_norm) for j in range(len(z)))
        return out / len(z)

    expected = 0.5 * (soft_ce(logits, hand) + soft_ce(logits.T, hand))
    loss = MultiViewContrastiveLoss([("image", "text")], targets="unicl")
    total, _ = loss({"image": paddle.to_tensor(img.astype("float32")),
                     "text": paddle.to_tensor(txt.astype("float32"))},
                    {"image-text": paddle.to_tensor([scale])}, ids=paddle.to_tensor(batch["ids"]))
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    assert abs(expected - 0.5 * (soft_ce(logits, np.eye(4)) + soft_ce(logits.T, np.eye(4)))) > 1e-3


def test_text_rows_share_ids_by_image_within_their_file_only(tmp_path):
    index, _ = sources(tmp_path)
    ids = index.unicl_ids
    assert ids[0] == ids[1] and ids[2] == ids[3] and ids[0] != ids[2]  # captions of one image
    label_rows = range(6, 14)
    classes = [1, 1, 0, 0, 2, 2, 1, 0]
    assert index.class_index[6:].tolist() == classes and (index.class_index[:6] == -1).all()
    for r, c in zip(label_rows, classes):
        assert [ids[q] for q in label_rows if classes[q - 6] == c] == [ids[r]] * classes.count(c)
    assert not set(ids[:6].tolist()) & set(ids[6:].tolist())  # label and image ids never collide
    # the label file's images are its own (its ids "0", "1", "2" are other pictures)
    assert not set(index.image_index[:6].tolist()) & set(index.image_index[6:].tolist())


def test_unicl_key_label_groups_text_rows_by_their_label_column(tmp_path):
    rows = [("red", "0", 0, "x"), ("blue", "1", 1, "x"), ("green", "2", 2, "y")]
    path = tmp_path / "t.tsv"
    write_label_file(path, [(i, s, lab) for _, i, s, lab in rows])
    index = TrainSources([TrainIndex(str(path), need_labels="unicl_key: label")], unicl_key="label")
    assert index.unicl_ids.tolist() == [0, 0, 1]


# ---------------------------------------------------------------------- label rows' views
def test_label_rows_get_a_drawn_prompt_the_same_on_every_process(tmp_path):
    b = batcher(tmp_path, views=("image", "text", "text_aug", "tags"), text_aug="other_caption")
    tok = b.tok
    prompts = {t.format(c): tok.encode(t.format(c)) for t in TEMPLATES for c in CLASSES}
    rows = np.array([6, 7, 8, 9, 0, 1])
    batch = b.batch(0, rows)
    texts, augs, tags = (decoded(b, batch[v]) for v in ("text", "text_aug", "tags"))
    for k, row in enumerate(rows[:4]):
        name = CLASSES[b.index.class_index[row]]
        mine = [prompts[t.format(name)] for t in TEMPLATES]
        assert texts[k] in mine and augs[k] in mine and texts[k] != augs[k]  # two templates
        assert tags[k] == tok.encode(name)  # no tags column: the class name
    assert texts[4] == tok.encode("红色的圆形") and texts[5] == tok.encode("a red circle")
    # drawn at random: over epochs both templates come up; reproducible; same on 2 processes
    seen = {tuple(decoded(b, b.batch(e, np.array([6]))["text"])[0]) for e in range(12)}
    assert len(seen) == 2
    again = batcher(tmp_path, views=("image", "text", "text_aug", "tags"), text_aug="other_caption")
    np.testing.assert_array_equal(again.batch(0, rows)["text"], batch["text"])
    halves = [batcher(tmp_path, views=("image", "text", "text_aug", "tags"), rank=r, world=2,
                      text_aug="other_caption").batch(0, rows) for r in range(2)]
    assert sum((decoded(b, h["text"]) for h in halves), []) == texts
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), batch["image"])
    np.testing.assert_array_equal(np.concatenate([h["ids"] for h in halves]), batch["ids"])


def test_a_label_row_keeps_its_own_tags_column(tmp_path):
    path = tmp_path / "l.tsv"
    path.write_text(open(write_label_file(tmp_path / "x.tsv", [("a", 1, "2")]), encoding="utf-8")
                    .read().replace("\t\t2", "\tred circle\t2"), encoding="utf-8")
    prompts = LabelPrompts(CLASSES, TEMPLATES)
    index = TrainSources([TrainIndex(str(path), need_labels="a label file")], kinds=["label"],
                         resolve=prompts.resolve)
    mixed_files(tmp_path)
    tok = ErnieTokenizer.from_file(str(tmp_path / "vocab.txt"), max_seq_len=16)
    b = MultiViewBatcher(index, ["image", "tags"], tok, make_train_transform(32),
                         make_eval_transform(32), seed=0, num_workers=0, prompts=prompts)
    assert decoded(b, b.batch(0, np.array([0]))["tags"])[0] == tok.encode("red circle")


# --------------------------------------------------------------------------------- sampling
def test_sampling_weights_are_honoured_and_each_file_is_used_once_per_pass():
    sizes, weights, batch = [50, 10, 30], [1.0, 0.5, 2.5], 8
    sampler = MixedSampler(sizes, weights, batch, seed=3)
    offsets = np.cumsum([0] + sizes)
    drawn = [sampler.rows(step) for step in range(2000)]
    rows = np.concatenate([r for _, r in drawn])
    source = np.searchsorted(offsets, rows, side="right") - 1
    share = np.bincount(source, minlength=3) / len(rows)
    np.testing.assert_allclose(share, np.array(weights) / sum(weights), atol=0.015)
    # each file's rows, pass after pass (the epoch of a row is its pass): every row once a pass
    epochs = np.concatenate([e for e, _ in drawn])
    for s, n in enumerate(sizes):
        for p in range(3):
            assert sorted(rows[(source == s) & (epochs == p)] - offsets[s]) == list(range(n))
    # a resumed run (a new sampler asked for a later step first) draws the same rows
    late = MixedSampler(sizes, weights, batch, seed=3)
    for step in (1500, 7, 1999):
        np.testing.assert_array_equal(late.rows(step)[1], drawn[step][1])
    assert not np.array_equal(MixedSampler(sizes, weights, batch, seed=4).rows(0)[1], drawn[0][1])


def test_sampler_rejects_bad_weights():
    with pytest.raises(ValueError, match="positive weight"):
        MixedSampler([5, 5], [1.0, 0.0], 4, 0)


# ------------------------------------------------------------------------ config and errors
def config(tmp_path, **over):
    text, labels, _ = mixed_files(tmp_path)
    cfg = tiny_config(tmp_path, train_file=text, train_files=[[labels, 0.5, "label"]],
                      label_classes=write_classes(tmp_path / "classes.txt"),
                      label_templates=write_templates(tmp_path / "templates.txt"),
                      output_dir=str(tmp_path / "out"), targets="unicl")
    cfg.update(over)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return str(path)


def test_config_sources_and_prompts(tmp_path):
    cfg = load_train_config(config(tmp_path))
    srcs = sources_of(cfg)
    assert [(s.weight, s.kind) for s in srcs] == [(1.0, "text"), (0.5, "label")]
    assert label_prompts(cfg, srcs).templates == TEMPLATES
    plain = load_train_config(config(tmp_path, train_files=[]))
    assert label_prompts(plain, sources_of(plain)) is None
    assert [s.path for s in sources_of(plain)] == [plain.train_file]


@pytest.mark.parametrize("value", ["[[a.tsv]]", "[[a.tsv, 0, label]]", "[[a.tsv, 1, image]]",
                                   "[a.tsv, 1]"])
def test_bad_train_files_name_the_key(tmp_path, value):
    with pytest.raises(ConfigError, match="train_files"):
        load_train_config(config(tmp_path), [f"train_files={value}"])


def test_label_rows_without_label_classes_is_a_config_error(tmp_path):
    cfg = load_train_config(config(tmp_path, label_classes=""))
    with pytest.raises(ConfigError, match="set label_classes"):
        label_prompts(cfg, sources_of(cfg))


def test_bad_label_files_name_file_and_line(tmp_path):
    prompts = LabelPrompts(CLASSES, TEMPLATES)
    bad = write_label_file(tmp_path / "bad.tsv", [("a", 1, "1"), ("b", 2, "hexagon")])
    with pytest.raises(DataError, match=r"bad\.tsv:2: label 'hexagon' is not a class"):
        TrainSources([TrainIndex(bad, need_labels="a label file")], kinds=["label"],
                     resolve=prompts.resolve)
    out_of_range = write_label_file(tmp_path / "range.tsv", [("a", 1, "7")])
    with pytest.raises(DataError, match=r"range\.tsv:1: class index 7 out of range 0\.\.2"):
        TrainSources([TrainIndex(out_of_range, need_labels="a label file")], kinds=["label"],
                     resolve=prompts.resolve)
    text, _, _ = mixed_files(tmp_path)
    with pytest.raises(DataError, match=r"text\.tsv:1: an image-label file needs a label in column 5"):
        TrainIndex(text, need_labels="an image-label file")


def test_training_with_a_label_file_without_labels_is_one_line(tmp_path):
    text, _, _ = mixed_files(tmp_path)
    path = config(tmp_path, train_files=[[text, 1.0, "label"]], max_steps=1)
    r = subprocess.run(["bash", str(ROOT / "run_train.sh"), "0", path], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(errors) == 1 and "text.tsv:1: an image-label file needs a label in column 5" in errors[0]


# ---------------------------------------------------------------------- end to end, 2 = 1
@pytest.mark.slow
def test_a_mixed_run_trains_and_two_processes_give_the_gradients_of_one(tmp_path):
    import _dist_unicl_worker as W
    mixed_files(tmp_path)
    out = tmp_path / "grads.npz"
    got = launch_worker(tmp_path, "_dist_unicl_worker.py", tmp_path, out=out)
    batch, ref = W.reference(tmp_path)
    # the batch is a real mix: label rows sharing a class, captions sharing an image
    ids = batch["ids"].tolist()
    assert len(set(ids)) < len(ids) and (batch["kinds"] == 1).any() and (batch["kinds"] == 0).any()
    np.testing.assert_array_equal(got["ids"], batch["ids"])  # the ranks' shares = the batch
    worst = max(float(np.abs(got[k] - ref[k]).max()) for k in ref)
    assert worst < 1e-5, worst
    _, clip = W.reference(tmp_path, targets="clip")  # the shared ids do change the gradients
    assert max(float(np.abs(clip[k] - ref[k]).max()) for k in ref) > 1e-3


def test_a_mixed_run_end_to_end_with_cached_features_and_an_auto_vocab(tmp_path):
    from ernievil2.train.loop import train
    (tmp_path / "zh_templates.txt").write_text("这是{}\n", encoding="utf-8")
    cfg = load_train_config(config(
        tmp_path, vocab_file="auto", label_templates=str(tmp_path / "zh_templates.txt"),
        views=[["image", "text", 1.0], ["image", "tags", 0.5]], batch_size=4, max_steps=3,
        freeze_image_tower=True, image_feature_cache=2, save_every=3, val_every=3, log_every=1,
        log_dir=str(tmp_path / "out")))
    train(cfg)
    vocab = (tmp_path / "out" / "vocab.txt").read_text(encoding="utf-8").split()
    assert "这" in vocab and "是" in vocab  # the prompts' words, found in no caption
    assert (tmp_path / "out" / "final" / "model.pdparams").is_file()
    log = (tmp_path / "out" / "train.log").read_text(encoding="utf-8")
    assert "training files mixed by weight" in log and "(label, 8 lines, weight 0.5)" in log


def test_the_trainer_reads_labels_by_index_or_by_name_in_either_language(tmp_path):
    classes = tmp_path / "imagenet.tsv"
    classes.write_text("class_index\twnid\tlabel_en\tlabel_zh\n0\tn0\ttench\t丁鲷\n"
                       "1\tn1\tgoldfish (fish)\t金鱼\n", encoding="utf-8")
    labels = write_label_file(tmp_path / "l.tsv", [("a", 1, "金鱼"), ("b", 2, "goldfish"),
                                                   ("c", 3, "1"), ("d", 4, "tench")])
    cfg = load_train_config(config(tmp_path, train_file="", train_files=[[labels, 1.0, "label"]],
                                   label_classes=str(classes), label_lang="en", label_templates=""))
    srcs = sources_of(cfg)
    prompts = label_prompts(cfg, srcs)
    assert prompts.class_names == ["tench", "goldfish"] and "a photo of a {}." in prompts.templates
    index = TrainSources([TrainIndex(labels)], kinds=["label"], resolve=prompts.resolve)
    assert index.class_index.tolist() == [1, 1, 1, 0]


def test_the_zeroshot_summary_averages_each_rows_seeds(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import unicl_zeroshot

    def validation(mc, off):
        return {"multi_caption": {"MeanRecall": {"meanRecall": mc}, "Text2Image": {"R@1": 1.0},
                                  "Image2Text": {"R@1": 2.0}},
                "official": {"MeanRecall": {"meanRecall": off}}}
    runs = [{"row": "recipe", "seed": s, "seconds": 1.0, "validation": validation(50 + s, 20.0)}
            for s in (0, 2)]
    (tmp_path / "ablation.json").write_text(json.dumps({"meta": {"rows": ["recipe"]}, "runs": runs}))
    for s, (zh, en) in zip((0, 2), ((0.04, 0.0), (0.08, 0.02))):
        folder = tmp_path / "runs" / f"recipe_seed{s}"
        folder.mkdir(parents=True)
        for lang, top1 in (("zh", zh), ("en", en)):
            (folder / f"zeroshot_{lang}.json").write_text(json.dumps({"top1": top1, "top5": 0.5}))
    assert unicl_zeroshot.main([str(tmp_path)]) == 0
    row = (tmp_path / "unicl.md").read_text(encoding="utf-8").splitlines()[2].split(" | ")
    # multi-caption 50 and 52: mean 51, sample std sqrt(2); zh top-1 4 % and 8 %: 6 ± 2.83
    assert row[0] == "| recipe" and row[1] == "2" and row[2] == "51.00 ± 1.41"
    assert row[6] == "6.00 ± 2.83" and row[7] == "50.00 ± 0.00" and row[8] == "1.00 ± 1.41"

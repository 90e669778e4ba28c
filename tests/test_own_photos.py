"""Own photos in two commands (README, "Train on your own data"): an image folder + a captions
file -> tools/build_tsv.py folder -> run_train.sh own_photos_lite0, which builds the vocab
(vocab_file: auto), computes the object tags the tags view needs, lowers batch_size to the
number of lines, trains from the Lite0 tower in the download cache and embeds the training file
with the final model. The pieces (train/prepare.py, corpus_vocab.py, tools/build_vocab.py) are
also tested alone."""
import base64
import importlib.util
import os
import subprocess
import sys

import cv2
import numpy as np
import paddle
import pytest
import yaml
from conftest import ROOT
from helpers import make_image, tsv_line

from ernievil2.config import ConfigError
from ernievil2.corpus_vocab import fitted_vocab, tsv_texts
from ernievil2.data.tsv import read_column
from ernievil2.embeddings import read_embeddings, sidecar_path
from ernievil2.models.efficientnet import build_efficientnet
from ernievil2.models.lite0_timm import classifier_from_checkpoint, tower_checkpoint
from ernievil2.tags import classifier_transform, top_k_names
from ernievil2.tokenizer import VocabError, build_vocab, load_vocab
from ernievil2.train import prepare as prep
from ernievil2.transforms import decode_image

N_IMAGES = 40
LITE0 = "efficientnet-lite0-imagenet"


def _demo_module():
    spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "tools" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_photo_folder(folder, n):
    """n drawn photos (JPEG files) and captions.tsv `image_file<TAB>caption`, one caption each,
    Chinese and English in turn."""
    demo = _demo_module()
    rng = np.random.default_rng(0)
    colours, lines = list(demo.COLOURS), ["image_file\tcaption"]
    (folder / "photos").mkdir(parents=True)
    for k in range(n):
        colour = colours[k % len(colours)]
        shape, place = demo.SHAPES[k % 3], demo.PLACES[k % 4]
        count = demo.COUNTS[k % 2]
        img = demo.draw(rng, demo.COLOURS[colour], shape[1], place[1], count[2], size=112)
        name = f"p{k:02d}.jpg"
        assert cv2.imwrite(str(folder / "photos" / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        lines.append(f"{name}\t{demo.caption(('zh', 'en')[k % 2], colour, shape, place, count)}")
    (folder / "captions.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def fake_lite0_download(home):
    """The cache file `ernievil2-download efficientnet-lite0-imagenet` writes (tower under
    visual.*, ImageNet head under visual.classfy.*), with seeded random weights."""
    paddle.seed(3)
    model = build_efficientnet("lite0", with_classifier=True)
    path = home / "pretrained" / f"{LITE0}.pdparams"
    path.parent.mkdir(parents=True)
    paddle.save(tower_checkpoint({k: v.numpy() for k, v in model.state_dict().items()}), str(path))
    return path


def run(cmd, cwd, env):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture
def user_env(tmp_path):
    env = dict(os.environ, ERNIEVIL2_HOME=str(tmp_path / "home"), PYTHON=sys.executable)
    return env


@pytest.mark.slow
def test_own_photos_in_two_commands(tmp_path, user_env):
    write_photo_folder(tmp_path, N_IMAGES)
    classifier = fake_lite0_download(tmp_path / "home")
    r = run([sys.executable, str(ROOT / "tools" / "build_tsv.py"), "folder", "photos",
             "captions.tsv", "own/train.tsv", "--no-progress"], tmp_path, user_env)
    assert r.returncode == 0, r.stderr
    r = run(["bash", str(ROOT / "run_train.sh"), "0", "own_photos_lite0", "train_file=own/train.tsv",
             "max_steps=4", "image_feature_cache=2", "log_every=2"], tmp_path, user_env)
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / "own_out"
    log = (out / "train.log").read_text(encoding="utf-8")
    assert "vocab_file auto" in log
    # the recipe's batch_size 64 is more than the 40 lines: the run used them all
    assert f"global batch {N_IMAGES} " in log

    # tags: each image's top-3 classes by the downloaded classifier, computed here independently
    tagged = [line.split("\t") for line in (out / "train_tags.tsv").read_text(encoding="utf-8").splitlines()]
    source = [line.split("\t") for line in (tmp_path / "own" / "train.tsv").read_text(encoding="utf-8").splitlines()]
    assert len(tagged) == len(source) == N_IMAGES and all(len(row) == 4 for row in tagged)
    assert [row[:3] for row in tagged] == source
    model = classifier_from_checkpoint(classifier)
    names = [f"c{i}" for i in range(1000)]
    for row in tagged[:3]:
        px = classifier_transform(decode_image(base64.b64decode(row[2])))[None]
        with paddle.no_grad():
            logits = model(paddle.to_tensor(px)).numpy()
        assert row[3] == " ".join(top_k_names(logits, names, 3)[0])

    # vocab_file auto: every caption character and every tag word, and final/infer.yaml names it
    vocab = load_vocab(out / "vocab.txt")
    assert all(ch in vocab for row in source for ch in row[0] if "\u4e00" <= ch <= "\u9fff")
    assert all(word in vocab for row in source for word in row[0].split() if word.isascii())
    assert all(tag in vocab for row in tagged for tag in row[3].split())
    infer = yaml.safe_load((out / "final" / "infer.yaml").read_text(encoding="utf-8"))
    assert infer["vocab_file"] == str(out / "vocab.txt")

    # the embeddings of the training file equal what run_infer.sh gives with the final config
    emb = read_embeddings(str(out / "final" / "embeddings.out"))
    assert os.path.isfile(sidecar_path(str(out / "final" / "embeddings.out")))
    r = run(["bash", str(ROOT / "run_infer.sh"), "0", "own_out/final/infer.yaml",
             "test_file=own/train.tsv", "output_file=again.out"], tmp_path, user_env)
    assert r.returncode == 0, r.stdout + r.stderr
    again = read_embeddings(str(tmp_path / "again.out"))
    assert emb.text.shape == (N_IMAGES, 256) and emb.image.shape == (N_IMAGES, 256)
    np.testing.assert_allclose(emb.text, again.text, atol=1e-5)
    np.testing.assert_allclose(emb.image, again.image, atol=1e-5)


# --- the pieces ---------------------------------------------------------------------------------

def _tsv(path, rows):
    """rows: (text, image_id, seed[, tags]) -> a training TSV."""
    lines = []
    for text, image_id, seed, *tags in rows:
        lines.append("\t".join([tsv_line(text, image_id, make_image(seed)), *tags]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _train_cfg(tmp_path, **overrides):
    from ernievil2.cli import load_train_config
    items = {"device": "cpu", "output_dir": str(tmp_path / "out"), "text_model_config": "ernie-demo-tiny",
             "image_model": "efficientnet_lite0", **overrides}
    return load_train_config(None, list(items.items()))


def test_the_tags_view_without_tags_or_a_classifier_names_the_download(tmp_path, monkeypatch):
    monkeypatch.setenv("ERNIEVIL2_HOME", str(tmp_path / "empty_home"))
    train = _tsv(tmp_path / "t.tsv", [("一只猫", "a", 1), ("a dog", "b", 2)])
    cfg = _train_cfg(tmp_path, train_file=train, vocab_file="auto",
                     views=[["image", "text", 1.0], ["image", "tags", 0.5]])
    with pytest.raises(ConfigError, match=f"t.tsv: the tags view needs object tags .* run "
                                          f"`ernievil2-download {LITE0}`"):
        prep.prepare(cfg)
    # an image tower that names a download not there says how to fetch it, when the config is read
    with pytest.raises(FileNotFoundError, match=f"run `ernievil2-download {LITE0}`"):
        _train_cfg(tmp_path, train_file=train, init_image_tower=LITE0)


def test_tags_present_are_kept_and_feed_the_auto_vocab(tmp_path, monkeypatch):
    monkeypatch.setenv("ERNIEVIL2_HOME", str(tmp_path / "empty_home"))  # no classifier needed
    train = _tsv(tmp_path / "t.tsv", [("一只猫", "a", 1, "tabby cat"), ("a dog", "b", 2, "beagle")])
    cfg = _train_cfg(tmp_path, train_file=train, vocab_file="auto", embed_file="train",
                     views=[["image", "text", 1.0], ["image", "tags", 0.5]])
    out = prep.prepare(cfg)
    assert out.train_file == out.embed_file == train
    assert out.vocab_file == str(tmp_path / "out" / "vocab.txt")
    vocab = load_vocab(out.vocab_file)
    assert list(vocab) == build_vocab(["一只猫", "a dog", "tabby cat", "beagle"])
    assert {"猫", "tabby", "beagle", "dog"} <= set(vocab)


def test_tags_are_computed_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("ERNIEVIL2_HOME", str(tmp_path / "home"))
    fake_lite0_download(tmp_path / "home")
    classes = tmp_path / "classes.tsv"
    classes.write_text("class_index\twnid\tlabel_en\tlabel_zh\n" + "".join(
        f"{i}\tn{i}\tthing {i}\t物{i}\n" for i in range(1000)), encoding="utf-8")
    train = _tsv(tmp_path / "t.tsv", [("一只猫", "a", 1), ("另一只猫", "a", 1), ("a dog", "b", 2)])
    cfg = _train_cfg(tmp_path, train_file=train, tag_classes=str(classes), tag_lang="en",
                     views=[["image", "text", 1.0], ["image", "tags", 0.5]])
    out = prep.prepare(cfg)
    assert out.train_file == str(tmp_path / "out" / "train_tags.tsv")
    tags = list(read_column(out.train_file, 3))
    assert tags[0] == tags[1] and all(t.startswith("thing ") and len(t.split()) == 6 for t in tags)
    calls = []
    monkeypatch.setattr("ernievil2.tagging.extract_tags", lambda *a, **k: calls.append(a) or (0, 0))
    prep.prepare(cfg)
    assert calls == []  # same source, classifier and names: the tagged copy is reused
    prep.prepare(_train_cfg(tmp_path, train_file=train, tag_classes=str(classes), tag_lang="zh",
                            views=[["image", "text", 1.0], ["image", "tags", 0.5]]))
    assert len(calls) == 1  # other names: computed again


def test_a_missing_embed_file_is_reported_before_training(tmp_path):
    train = _tsv(tmp_path / "t.tsv", [("一只猫", "a", 1)])
    with pytest.raises(FileNotFoundError, match="embed_file not found: .*photos.tsv"):
        prep.prepare(_train_cfg(tmp_path, train_file=train, embed_file=str(tmp_path / "photos.tsv")))


def test_a_resumed_run_must_find_the_same_auto_vocab(tmp_path, monkeypatch):
    train = _tsv(tmp_path / "t.tsv", [("一只猫", "a", 1), ("a dog", "b", 2)])
    cfg = _train_cfg(tmp_path, train_file=train, vocab_file="auto")
    prep.prepare(cfg)
    cfg["resume"] = "auto"
    prep.prepare(cfg)  # the same captions: the same vocab
    _tsv(tmp_path / "t.tsv", [("一只狗", "a", 1), ("a dog", "b", 2)])
    with pytest.raises(ConfigError, match="give another vocab than .*vocab.txt, which the checkpoint"):
        prep.prepare(cfg)


def test_fitted_vocab_leaves_out_rare_words_but_every_character():
    texts = ["alpha beta gamma", "alpha beta", "alpha", "猫 狗"]
    full, k = fitted_vocab(texts)
    assert k == 1 and full == build_vocab(texts)
    limit = len(build_vocab(texts, 2))
    tokens, k = fitted_vocab(texts, max_size=limit)
    assert (tokens, k) == (build_vocab(texts, 2), 2) and "gamma" not in tokens and "alpha" in tokens
    assert set("gamma") <= set(tokens) and {"猫", "狗"} <= set(tokens)
    with pytest.raises(VocabError, match="more than the 8"):
        fitted_vocab(texts, max_size=8)


def test_build_vocab_tool_reads_captions_and_tags(tmp_path):
    train = _tsv(tmp_path / "t.tsv", [("一只猫", "a", 1, "tabby cat"), ("a dog", "b", 2, "beagle"),
                                      ("狗", "b", 2, "beagle")])
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "build_vocab.py"), train,
                        "--out", str(tmp_path / "v.txt")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    expected = build_vocab(list(read_column(train, 0)) + list(read_column(train, 3)))
    assert list(load_vocab(tmp_path / "v.txt")) == expected == build_vocab(tsv_texts([train]))
    assert r.stdout.strip() == f"{len(expected)} tokens in {tmp_path / 'v.txt'}"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "build_vocab.py"), str(tmp_path / "no.tsv"),
                        "--out", str(tmp_path / "v2.txt")], capture_output=True, text=True)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "no.tsv" in r.stderr


def test_inference_with_vocab_file_auto_says_it_is_training_s():
    from ernievil2.factory import create_tokenizer
    with pytest.raises(ConfigError, match="vocab_file: auto is built by run_train.sh"):
        create_tokenizer("own_photos_lite0")

"""Zero-shot classification: prompt ensembling against a hand computation, a briefly trained demo
model classifying drawn shapes well above chance, and the command end to end on real photos."""
import base64
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import yaml

from conftest import ROOT
from ernievil2.data.tsv import DataError
from ernievil2.embed import model_towers
from ernievil2.factory import as_config, create_model_and_transforms, text_encoder
from ernievil2.tokenizer import build_vocab, write_vocab
from ernievil2.zeroshot import (TEMPLATES, LabelResolver, LabelledBatch, class_embeddings, classify,
                                load_classes, load_templates, summarize)
from ernievil2.zeroshot_cli import run as zeroshot_run
from helpers import TINY_VIT, tiny_config, write_json

sys.path.insert(0, str(ROOT / "tools"))
from make_demo_data import COLOURS, SHAPES, draw  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def tiny_towers(tmp_path):
    cfg = as_config(tiny_config(tmp_path))
    model, _, transform, tokenizer = create_model_and_transforms(cfg)
    return model_towers(model), text_encoder(cfg, tokenizer), transform


# ------------------------------------------------------------------------ prompt ensembling
def test_class_embedding_is_the_renormalised_mean_of_normalised_prompts(tmp_path):
    towers, encode_texts, _ = tiny_towers(tmp_path)
    names, templates = ["红色的圆形", "蓝色方块"], ["{}", "一个{}", "{}在上"]
    # batch_size 4: the 6 prompts go in two batches of different lengths
    got = class_embeddings(lambda t: towers.encode_text(encode_texts(t)), names, templates, 4)
    for c, name in enumerate(names):
        prompts = [towers.encode_text(encode_texts([t.format(name)]))[0].astype(np.float64)
                   for t in templates]
        mean = sum(p / np.sqrt((p * p).sum()) for p in prompts) / len(prompts)
        np.testing.assert_allclose(got[c], mean / np.sqrt((mean * mean).sum()), atol=1e-5)

    rng = np.random.default_rng(0)
    images = rng.normal(size=(7, 3, 32, 32)).astype(np.float32)
    labels = np.array([0, 1, 0, 1, 1, 0, 0])
    batches = [LabelledBatch(images[:4], labels[:4], list("abcd")),
               LabelledBatch(images[4:], labels[4:], list("efg"))]
    result = classify(towers.encode_image, got, iter(batches))
    img = towers.encode_image(images)
    by_hand = np.argmax(img @ got.T, axis=1)
    assert result.predictions.shape == (7, 2)  # top-k of 2 classes is 2 wide
    np.testing.assert_array_equal(result.predictions[:, 0], by_hand)
    np.testing.assert_array_equal(result.labels, labels)
    s = summarize(result.predictions, result.labels, names)
    assert s["top1"] == pytest.approx(np.mean(by_hand == labels))
    assert s["top5"] == 1.0 and s["chance_top1"] == 0.5 and s["chance_top5"] == 1.0
    assert sum(c["count"] for c in s["confusions"]) == int((by_hand != labels).sum())


def test_class_files_templates_and_labels(tmp_path):
    plain = tmp_path / "classes.txt"
    plain.write_text("red circle\n blue  square \n\n", encoding="utf-8")
    assert load_classes(plain) == ["red circle", "blue square"]
    imagenet = tmp_path / "classes.tsv"
    imagenet.write_text("class_index\twnid\tlabel_en\tlabel_zh\n0\tn1\tkite (bird of prey)\t鸢\n"
                        "1\tn2\tcardboard box / carton\t纸箱\n", encoding="utf-8")
    assert load_classes(imagenet, "en") == ["kite", "cardboard box"]
    assert load_classes(imagenet, "zh") == ["鸢", "纸箱"]
    imagenet.write_text("class_index\twnid\tlabel_en\tlabel_zh\n1\tn1\tkite\t鸢\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"classes.tsv:2: class_index"):
        load_classes(imagenet)

    resolve = LabelResolver(["kite", "cardboard box"])
    assert resolve("1", "f.tsv", 3) == 1
    assert resolve("cardboard box / carton", "f.tsv", 3) == 1
    with pytest.raises(DataError, match=r"f.tsv:3: class index 2 out of range"):
        resolve("2", "f.tsv", 3)
    with pytest.raises(DataError, match=r"f.tsv:4: label 'dog' is not a class"):
        resolve("dog", "f.tsv", 4)

    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\n\n{} again\n", encoding="utf-8")
    assert load_templates(templates) == ["a photo of a {}.", "{} again"]
    templates.write_text("a photo\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"templates.txt:1: a template needs exactly one"):
        load_templates(templates)
    assert all(t.count("{}") == 1 for lang in TEMPLATES for t in TEMPLATES[lang])


# -------------------------------------------------------------------------- drawn shapes
CLASSES = [(c, s) for c in list(COLOURS)[:3] for s in SHAPES]  # red/green/blue x 3 shapes


def drawn_tsv(path, rng, n, with_label):
    lines = []
    for k in range(n):
        colour, shape = CLASSES[rng.integers(len(CLASSES))]
        img = draw(rng, COLOURS[colour], shape[1], ("left", "right", "top", "bottom")[k % 4], 1, 64)
        ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        name = f"{colour[0]}的{shape[0]}"
        lines.append("\t".join([name, f"d{k}", base64.b64encode(buf.tobytes()).decode()]
                               + (["", name] if with_label else [])))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.slow
def test_a_briefly_trained_demo_model_classifies_drawn_shapes_above_chance(tmp_path, capsys):
    from ernievil2.cli import load_train_config
    from ernievil2.train.loop import train
    rng = np.random.default_rng(0)
    names = [f"{c[0]}的{s[0]}" for c, s in CLASSES]
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    (tmp_path / "templates.txt").write_text("{}\n一个{}\n", encoding="utf-8")
    vocab = str(tmp_path / "vocab.txt")
    write_vocab(build_vocab(names + ["一个"]), vocab)
    held_out = drawn_tsv(tmp_path / "test.tsv", np.random.default_rng(1), 90, True)
    demo = yaml.safe_load((ROOT / "packages" / "configs" / "demo_tiny.yaml").read_text(encoding="utf-8"))
    cfg = {"device": "cpu", "max_text_seqlen": 16, "vocab_file": vocab,
           "text_model_config": demo["text_model_config"], "image_model": demo["image_model"],
           "embed_dim": demo["embed_dim"], "train_file": drawn_tsv(tmp_path / "train.tsv", rng, 300, True),
           "output_dir": str(tmp_path / "out"), "log_dir": str(tmp_path / "out"),
           "batch_size": 32, "max_steps": 150, "lr": 1e-3, "warmup_steps": 15, "augment": False, "save_every": 1000,
           "log_every": 20, "val_every": 1000, "num_workers": 0, "views": [["image", "text", 1.0]],
           # a batch holds each class several times: rows of one label are positives of each other
           "targets": "unicl", "unicl_key": "label",
           # zero-shot validation only (no val_file), at the last step
           "val_zeroshot_file": held_out, "val_zeroshot_classes": str(tmp_path / "classes.txt"),
           "val_zeroshot_templates": str(tmp_path / "templates.txt")}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    train(load_train_config(str(tmp_path / "train.yaml")))
    out = tmp_path / "zs.json"
    zeroshot_run([str(tmp_path / "out" / "final" / "infer.yaml"), "--images", held_out,
                  "--classes", str(tmp_path / "classes.txt"), "--templates",
                  str(tmp_path / "templates.txt"), "--json", str(out)])
    table = capsys.readouterr().out
    result = json.loads(out.read_text(encoding="utf-8"))
    print(f"drawn shapes zero-shot top-1 {result['top1']:.3f} (chance {result['chance_top1']:.3f})")
    assert "top-1" in table and "chance %" in table
    assert result["images"] == 90 and result["classes"] == 9
    assert result["top1"] >= 2 * result["chance_top1"], result
    # the validation during training classified the same images with the same final weights
    records = [json.loads(line) for line in open(tmp_path / "out" / "train.jsonl", encoding="utf-8")]
    during = [r["validation"] for r in records if "validation" in r]
    assert len(during) == 1 and set(during[0]) == {"zeroshot"}  # no val_file: no recalls
    assert during[0]["zeroshot"]["images"] == 90 and during[0]["zeroshot"]["classes"] == 9
    assert during[0]["zeroshot"]["top1"] == pytest.approx(100 * result["top1"], abs=100 / 90)
    assert during[0]["zeroshot"]["top5"] == pytest.approx(100 * result["top5"], abs=100 / 90)
    assert during[0]["zeroshot"]["chance_top1"] == pytest.approx(100 / 9)
    log = (tmp_path / "out" / "train.log").read_text(encoding="utf-8")
    assert f"validation: zero-shot top-1 {during[0]['zeroshot']['top1']:.2f} top-5" in log

    # the compiled towers and the exported ones in predictors classify the same way
    for mode in ("to_static", "inference"):
        zeroshot_run([str(tmp_path / "out" / "final" / "infer.yaml"), f"execution={mode}",
                      f"export_dir={tmp_path / 'export'}", "--images", held_out, "--classes",
                      str(tmp_path / "classes.txt"), "--templates", str(tmp_path / "templates.txt"),
                      "--json", str(tmp_path / f"{mode}.json")])
        other = json.loads((tmp_path / f"{mode}.json").read_text(encoding="utf-8"))
        assert other["top1"] == pytest.approx(result["top1"], abs=1 / 90), mode

    # run_zeroshot.sh: two processes, each with its share of the lines, give the result of one
    by_devices = {}
    for devices in ("0", "0,1"):
        out = tmp_path / f"devices{devices.replace(',', '')}.json"
        r = subprocess.run(["bash", str(ROOT / "run_zeroshot.sh"), devices,
                            str(tmp_path / "out" / "final" / "infer.yaml"), "--images", held_out,
                            "--classes", str(tmp_path / "classes.txt"), "infer_batch_size=7",
                            "--templates", str(tmp_path / "templates.txt"), "--json", str(out)],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path,
                           env={**os.environ, "LAUNCH_LOG_DIR": str(tmp_path / "launch")})
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "90 images, 9 classes" in r.stdout and "LAUNCH" not in r.stdout + r.stderr
        by_devices[devices] = json.loads(out.read_text(encoding="utf-8"))
    one, two = by_devices["0"], by_devices["0,1"]
    assert (two["top1"], two["top5"], two["per_class"], two["confusions"]) == \
        (one["top1"], one["top5"], one["per_class"], one["confusions"])
    assert one["top1"] == pytest.approx(result["top1"], abs=1 / 90)  # another batch size


# ------------------------------------------------------------------- real photos, end to end
@pytest.mark.shared
def test_the_command_runs_on_the_lite0_photos_as_tsv_and_as_class_folders(tmp_path):
    photos, classes = SHARED / "efficientnet_lite0" / "imagenet50", SHARED / "imagenet_classes.tsv"
    if not photos.is_dir() or not classes.is_file():
        pytest.skip(f"needs ../shared reference data ({photos}, {classes})")
    rows = [line.split("\t") for line in (photos / "labels.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    lines, folder = [], tmp_path / "folders"
    for k, (file, index, _, _, label_en, *_) in enumerate(rows):
        data = (photos / file).read_bytes()
        # the label column as a class index, or (every other line) as the class name
        lines.append(f"photo\t{file}\t{base64.b64encode(data).decode()}\t\t{index if k % 2 else label_en}")
        (folder / index).mkdir(parents=True, exist_ok=True)
        (folder / index / file).write_bytes(data)
    (tmp_path / "photos.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = tiny_config(tmp_path, image_model=dict(TINY_VIT, image_size=64), infer_batch_size=16)
    config = write_json(tmp_path / "infer.json", cfg)  # YAML is a superset of JSON

    def command(images, out, *extra):
        return subprocess.run([sys.executable, str(ROOT / "eval_zeroshot.py"), config, "--images", images,
                               "--classes", str(classes), "--lang", "en", "--json", str(out), *extra],
                              capture_output=True, text=True, timeout=600)
    r = command(str(tmp_path / "photos.tsv"), tmp_path / "tsv.json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "top-1" in r.stdout and "50 images, 1000 classes" in r.stdout
    by_tsv = json.loads((tmp_path / "tsv.json").read_text(encoding="utf-8"))
    assert by_tsv["images"] == len(rows) == 50 and by_tsv["classes"] == 1000
    assert sorted(c["class_index"] for c in by_tsv["per_class"]) == sorted(int(r[1]) for r in rows)
    assert by_tsv["chance_top5"] == pytest.approx(0.005)

    r = command(str(folder), tmp_path / "folder.json")
    assert r.returncode == 0, r.stderr[-3000:]
    by_folder = json.loads((tmp_path / "folder.json").read_text(encoding="utf-8"))
    assert by_folder["per_class"] == by_tsv["per_class"]  # same photos, same predictions
    assert by_folder["top5"] == by_tsv["top5"]

    bad = tmp_path / "bad.tsv"
    bad.write_text(lines[0] + "\n" + lines[1].rsplit("\t", 1)[0] + "\tnot a class\n", encoding="utf-8")
    r = command(str(bad), tmp_path / "bad.json")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"error: {bad}:2: label 'not a class' is not a class " \
                                                "of the class-name file"
    assert not (tmp_path / "bad.json").exists()


def test_zero_shot_validation_keys_are_read_before_training(tmp_path):
    from ernievil2.cli import load_train_config
    from ernievil2.config import ConfigError
    from ernievil2.train.validate import zeroshot_task
    images = drawn_tsv(tmp_path / "val.tsv", np.random.default_rng(2), 4, True)
    classes = tmp_path / "classes.txt"
    classes.write_text("red circle\nblue square\n", encoding="utf-8")
    assert zeroshot_task(load_train_config(None, [])) is None
    with pytest.raises(ConfigError, match="val_zeroshot_file needs val_zeroshot_classes"):
        zeroshot_task(load_train_config(None, [("val_zeroshot_file", images)]))
    with pytest.raises(FileNotFoundError, match="val_zeroshot_templates not found: nowhere.txt"):
        zeroshot_task(load_train_config(None, [("val_zeroshot_file", images),
                                               ("val_zeroshot_classes", str(classes)),
                                               ("val_zeroshot_templates", "nowhere.txt")]))
    task = zeroshot_task(load_train_config(None, [("val_zeroshot_file", images), ("val_zeroshot_lang", "en"),
                                                  ("val_zeroshot_classes", str(classes))]))
    assert task.names == ["red circle", "blue square"] and task.templates == TEMPLATES["en"]
    assert task.resolve("blue square", "f", 1) == 1

"""`build_tsv.py labels`: class folders or a `path \\t label` list to a training TSV with a label
column; bad inputs stop with one line naming file and line."""
import base64
import subprocess
import sys

import pytest

from conftest import ROOT, need_shared
from ernievil2.datasets import ConversionError, DataError, parse_labels
from ernievil2.train.data import TrainIndex
from helpers import make_image

BUILD = [sys.executable, str(ROOT / "tools" / "build_tsv.py"), "labels"]
IMAGENET = ("class_index\twnid\tlabel_en\tlabel_zh\n0\tn0\ttench\t丁鲷\n"
            "1\tn1\tgoldfish (fish)\t金鱼\n2\tn2\tgreat white shark\t大白鲨\n")


def images(folder, names):
    for k, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(make_image(k))


def classes(tmp_path):
    path = tmp_path / "classes.tsv"
    path.write_text(IMAGENET, encoding="utf-8")
    return str(path)


def lines(path):
    return [ln.split("\t") for ln in path.read_text(encoding="utf-8").splitlines()]


def run(*args):
    return subprocess.run([*BUILD, *map(str, args), "--no-progress"], capture_output=True,
                          text=True, timeout=120)


def test_class_folders_with_class_names(tmp_path):
    images(tmp_path / "photos", ["goldfish/a.jpg", "goldfish/b.png", "0/c.jpg", "notes.txt"])
    (tmp_path / "photos" / "goldfish" / "readme.md").write_text("not an image")
    out = tmp_path / "out.tsv"
    r = run(tmp_path / "photos", out, "--classes", classes(tmp_path), "--lang", "zh")
    assert r.returncode == 0, r.stderr
    got = lines(out)
    # sorted by folder, then file; folder "0" is class index 0, "goldfish" the name of class 1
    assert [(g[0], g[1], g[3], g[4]) for g in got] == [
        ("丁鲷", "0/c", "", "0"), ("金鱼", "goldfish/a", "", "1"), ("金鱼", "goldfish/b", "", "1")]
    assert base64.b64decode(got[1][2]) == (tmp_path / "photos" / "goldfish" / "a.jpg").read_bytes()
    idx = TrainIndex(str(out), need_labels="an image-label file")
    assert idx.labels == ["0", "1", "1"]


def test_a_list_file_with_a_header_and_without_a_class_file(tmp_path):
    images(tmp_path / "img", ["x.jpg", "sub/y.jpg"])
    listing = tmp_path / "list.tsv"
    listing.write_text("path\tlabel\nx.jpg\tgreat white shark\nsub/y.jpg\t2\n", encoding="utf-8")
    out = tmp_path / "out.tsv"
    r = run(listing, out, "--images-dir", tmp_path / "img")
    assert r.returncode == 0, r.stderr
    assert [(g[0], g[1], g[4]) for g in lines(out)] == [
        ("great white shark", "x", "great white shark"), ("2", "sub/y", "2")]
    r = run(listing, out, "--images-dir", tmp_path / "img", "--classes", classes(tmp_path), "--lang", "en")
    assert r.returncode == 0, r.stderr
    assert [(g[0], g[4]) for g in lines(out)] == [("great white shark", "2"), ("great white shark", "2")]


def test_list_paths_are_relative_to_the_list_by_default(tmp_path):
    images(tmp_path, ["pics/a.jpg"])
    (tmp_path / "list.tsv").write_text("pics/a.jpg\ttench\n", encoding="utf-8")
    result = parse_labels(str(tmp_path / "list.tsv"))
    assert [(r.image_id, r.label, r.caption) for r in result.records] == [("pics/a", "tench", "tench")]


@pytest.mark.parametrize("content, needle", [
    ("a.jpg\tgoldfish\nb.jpg\n", "list.tsv:2: expected 2 tab-separated columns (image_path \\t label), found 1"),
    ("a.jpg\tgoldfish\n\tgoldfish\n", "list.tsv:2: empty image path (column 1)"),
    ("a.jpg\tgoldfish\nb.jpg\tunicorn\n", "list.tsv:2: label 'unicorn' is not a class of the class-name file"),
    ("a.jpg\t9\n", "list.tsv:1: class index 9 out of range 0..2"),
    ("a.jpg\t \n", "list.tsv:1: no label"),
])
def test_bad_list_lines_are_one_line_naming_file_and_line(tmp_path, content, needle):
    images(tmp_path, ["a.jpg", "b.jpg"])
    (tmp_path / "list.tsv").write_text(content, encoding="utf-8")
    r = run(tmp_path / "list.tsv", tmp_path / "out.tsv", "--classes", classes(tmp_path))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and needle in r.stderr, r.stderr
    assert not (tmp_path / "out.tsv").exists()


def test_other_bad_inputs(tmp_path):
    images(tmp_path, ["a.jpg"])
    (tmp_path / "list.tsv").write_text("a.jpg\ttench\nmissing.jpg\ttench\n", encoding="utf-8")
    r = run(tmp_path / "list.tsv", tmp_path / "out.tsv")
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0
    assert "list.tsv: image '" in r.stderr and "missing.jpg' not found (line 2)" in r.stderr, r.stderr
    r = run(tmp_path / "list.tsv", tmp_path / "out.tsv", "--skip-missing")
    assert r.returncode == 0 and len(lines(tmp_path / "out.tsv")) == 1
    with pytest.raises(ConversionError, match="class-name file not found"):
        parse_labels(str(tmp_path / "list.tsv"), classes=str(tmp_path / "nope.tsv"))
    with pytest.raises(ConversionError, match="no such file or folder"):
        parse_labels(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="no images in class sub-folders"):
        parse_labels(str(tmp_path / "empty"))
    (tmp_path / "bad_classes.tsv").write_text("class_index\twnid\tlabel_en\tlabel_zh\n0\tn0\ttench\n",
                                             encoding="utf-8")
    with pytest.raises(DataError, match=r"bad_classes\.tsv:2: 3 columns, expected 4"):
        parse_labels(str(tmp_path / "list.tsv"), classes=str(tmp_path / "bad_classes.tsv"))


@pytest.mark.shared
def test_confident_labels_are_the_classifiers_top1_and_feed_the_converter(tmp_path):
    photos = need_shared("data", "efficientnet_lite0", "imagenet50")
    classes = need_shared("data", "imagenet_classes.tsv")
    rows = [ln.split("\t") for ln in (photos / "labels.tsv").read_text(encoding="utf-8").splitlines()[1:7]]
    (tmp_path / "only.txt").write_text("".join(r[0] + "\n" for r in rows), encoding="utf-8")
    tool = [sys.executable, str(ROOT / "tools" / "confident_labels.py"), str(photos), "--classes",
            str(classes), "--weights",
            str(need_shared("data", "efficientnet_lite0", "efficientnet_lite0_imagenet.npz"))]
    r = subprocess.run([*tool, str(tmp_path / "all.txt"), "--only", str(tmp_path / "only.txt"),
                        "--min-prob", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = lines(tmp_path / "all.txt")
    # the reference network's own top-1 (its top-5 list, first) for each photo
    assert got == [["path", "label"]] + [[row[0], row[6].split(",")[0]] for row in rows]
    r = subprocess.run([*tool, str(tmp_path / "none.txt"), "--only", str(tmp_path / "only.txt"),
                        "--min-prob", "1.01"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and lines(tmp_path / "none.txt") == [["path", "label"]]
    r = run(tmp_path / "all.txt", tmp_path / "out.tsv", "--images-dir", photos,
            "--classes", classes)
    assert r.returncode == 0, r.stderr
    assert [g[4] for g in lines(tmp_path / "out.tsv")] == [row[6].split(",")[0] for row in rows]

"""Object tags (ernievil2.tags, tools/extract_tags.py): class-name cleaning, Pillow-exact
preprocessing without Pillow, top-k distinct names, the TSV rewrite (column 4, one
classification per image id, atomic output), and the real ImageNet Lite0 on ImageNet-50 photos."""
import base64
import importlib.util

import numpy as np
import paddle
import pytest
from conftest import ROOT, need_shared
from helpers import make_image, tsv_line

from ernievil2.data.tsv import DataError
from ernievil2.models.efficientnet import EfficientNet
from ernievil2.tags import (
    ObjectTagger,
    classifier_transform,
    clean_class_name,
    format_tags,
    load_class_names,
    pillow_bicubic_resize,
    top_k_names,
)
from ernievil2.transforms import decode_image

LITE0 = ("data", "efficientnet_lite0")


def _load_tool():
    spec = importlib.util.spec_from_file_location("extract_tags", ROOT / "tools" / "extract_tags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


# --- class names ----------------------------------------------------------------------------------

def test_clean_class_name_keeps_one_readable_name():
    assert clean_class_name("kite (bird of prey)") == "kite"
    assert clean_class_name("沙球（一种打击乐器）") == "沙球"
    assert clean_class_name("cardboard box / carton") == "cardboard box"
    assert clean_class_name("military hat (bearskin or shako)") == "military hat"
    assert clean_class_name("great  white shark") == "great white shark"
    assert clean_class_name("T-shirt") == "T-shirt"


def _write_classes(path, rows, header="class_index\twnid\tlabel_en\tlabel_zh"):
    path.write_text(header + "\n" + "".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_load_class_names_by_language_and_checks_order(tmp_path):
    good = _write_classes(tmp_path / "c.tsv", [("0", "n1", "kite (bird of prey)", "鸢"),
                                               ("1", "n2", "tiger shark", "虎鲨")])
    assert load_class_names(good, "en") == ["kite", "tiger shark"]
    assert load_class_names(good, "zh") == ["鸢", "虎鲨"]
    assert load_class_names(good, "en", clean=False)[0] == "kite (bird of prey)"
    bad = _write_classes(tmp_path / "bad.tsv", [("0", "n1", "a", "甲"), ("2", "n2", "b", "乙")])
    with pytest.raises(ValueError, match=r"bad.tsv:3: class_index '2', expected 1"):
        load_class_names(bad)
    short = _write_classes(tmp_path / "short.tsv", [("0", "n1", "a")])
    with pytest.raises(ValueError, match=r"short.tsv:2: 3 columns"):
        load_class_names(short)
    with pytest.raises(ValueError, match="lang"):
        load_class_names(good, "fr")


def test_top_k_names_are_distinct_and_best_first():
    names = ["missile", "cat", "missile", "dog"]
    logits = np.array([[5.0, 1.0, 4.0, 3.0], [0.0, 2.0, 1.0, 3.0]])
    assert top_k_names(logits, names, 2) == [["missile", "dog"], ["dog", "cat"]]
    assert top_k_names(logits, names, 10)[0] == ["missile", "dog", "cat"]  # only 3 distinct
    assert format_tags(["great white shark", "虎鲨"]) == "great white shark 虎鲨"
    with pytest.raises(ValueError, match="do not match"):
        top_k_names(logits, names[:3], 1)


# --- Pillow's resize without Pillow ---------------------------------------------------------------

@pytest.mark.parametrize("h, w, out_w, out_h", [
    (375, 500, 341, 256),  # aspect-preserving shrink, as the classifier transform does
    (167, 250, 384, 256),  # enlarge (a small Flickr8k photo)
    (300, 300, 256, 256),
    (41, 97, 97, 23),  # one axis only
    (97, 41, 23, 97),
])
def test_pillow_bicubic_resize_is_exact(h, w, out_w, out_h):
    Image = pytest.importorskip("PIL.Image")
    img = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(img).resize((out_w, out_h), Image.BICUBIC))
    np.testing.assert_array_equal(pillow_bicubic_resize(img, (out_w, out_h)), ref)


def test_classifier_transform_shape_and_range():
    img = decode_image(make_image(3, h=180, w=300))
    x = classifier_transform(img)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    assert -1.0 <= x.min() and x.max() <= 1.0


@pytest.mark.parametrize("h, w", [(1, 3001), (3001, 1), (2, 777), (777, 3), (13, 29)])
def test_classifier_transform_of_long_images_equals_pillow_resize_then_crop(h, w):
    Image = pytest.importorskip("PIL.Image")
    img = np.random.default_rng(h + w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    resize, crop = 16, 12  # small, so that Pillow can resize the whole image
    size = (resize, round(h * resize / w)) if w <= h else (round(w * resize / h), resize)
    full = np.asarray(Image.fromarray(img).resize(size, Image.BICUBIC))
    left, top = round((size[0] - crop) / 2), round((size[1] - crop) / 2)
    want = (full[top:top + crop, left:left + crop].astype(np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_array_equal(classifier_transform(img, resize, crop), want.transpose(2, 0, 1))


@pytest.mark.parametrize("h, w", [(1, 100_000), (100_000, 1)])
def test_classifier_transform_of_a_1x100000_image_stays_small(h, w):
    import tracemalloc

    img = np.zeros((h, w, 3), np.uint8)
    img[...] = (255, 0, 51)
    tracemalloc.start()
    try:
        x = classifier_transform(img)  # the whole resize would be 256 x 25,600,000 pixels
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak
    assert x.shape == (3, 224, 224)
    want = (np.array([255, 0, 51], np.float32) / 255 - 0.5) / 0.5  # a plain colour stays plain
    np.testing.assert_allclose(x, np.broadcast_to(want[:, None, None], x.shape), atol=1e-6)


# --- the TSV tool with a small random classifier (no ../shared) -----------------------------------

CLASSES = ["apple", "ball", "cat", "dog", "egg", "fish"]


@pytest.fixture(scope="module")
def random_tagger():
    paddle.seed(7)
    model = EfficientNet("lite0", num_classes=len(CLASSES), drop_connect_rate=0.0)
    return ObjectTagger(model, CLASSES, topk=2, batch_size=2)


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_extract_tags_writes_column_4_once_per_image(tmp_path, random_tagger):
    images = {k: make_image(seed, h=60 + 10 * seed, w=90) for seed, k in enumerate(["a", "b", "c"])}
    lines = [tsv_line("红色的猫", "a", images["a"]),
             tsv_line("a dog on the grass", "b", images["b"]) + "\told tags\tlabel7",
             tsv_line("另一个说法", "a", images["a"]),
             tsv_line("鱼", "c", images["c"]) + "\t",
             tsv_line("cat", "c", images["c"])]
    src = _write_lines(tmp_path / "in.tsv", lines)
    calls = []
    real = random_tagger.tag_pixels
    random_tagger.tag_pixels = lambda px: calls.append(len(px)) or real(px)
    try:
        n, n_images = tool.extract_tags(src, tmp_path / "out" / "tagged.tsv", random_tagger,
                                        batch_size=2, num_workers=1, progress=False)
    finally:
        del random_tagger.tag_pixels
    assert (n, n_images) == (5, 3) and sum(calls) == 3  # one classification per image id
    out = (tmp_path / "out" / "tagged.tsv").read_text(encoding="utf-8").splitlines()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["tagged.tsv"]  # no temp file left
    rows = [line.split("\t") for line in out]
    for row, line in zip(rows, lines):
        assert row[:3] == line.split("\t")[:3]  # text, id, image unchanged
    assert [len(r) for r in rows] == [4, 5, 4, 4, 4] and rows[1][4] == "label7"
    # the expected tags, straight from the classifier on each image's pixels
    for row in rows:
        px = classifier_transform(decode_image(images[row[1]]))[None]
        expected = top_k_names(random_tagger.logits(px), CLASSES, 2)[0]
        assert row[3] == format_tags(expected) and len(expected) == 2
    # captions of one image share its tags whatever they say
    assert rows[0][3] == rows[2][3] and rows[3][3] == rows[4][3]
    assert rows[1][3] != "old tags"


def test_extract_tags_rejects_an_id_with_two_images(tmp_path, random_tagger):
    src = _write_lines(tmp_path / "in.tsv", [tsv_line("x", "same", make_image(1)),
                                             tsv_line("y", "same", make_image(2))])
    with pytest.raises(DataError, match=r"in.tsv:2: image id 'same' has different image bytes "
                                        r"than on line 1"):
        tool.extract_tags(src, tmp_path / "out.tsv", random_tagger, progress=False)
    assert not (tmp_path / "out.tsv").exists()


def test_extract_tags_reports_a_bad_image_line(tmp_path, random_tagger):
    bad = "text\tid9\t" + base64.b64encode(b"not an image").decode()
    src = _write_lines(tmp_path / "in.tsv", [tsv_line("x", "ok", make_image(1)), bad])
    with pytest.raises(DataError, match=r"in.tsv:2: image: not a decodable image"):
        tool.extract_tags(src, tmp_path / "out.tsv", random_tagger, progress=False)
    assert list(tmp_path.iterdir()) == [src]


def test_cli_reports_missing_files(tmp_path, capsys):
    src = _write_lines(tmp_path / "in.tsv", [tsv_line("x", "a", make_image(1))])
    assert tool.main([str(src), str(tmp_path / "o.tsv"), "--weights", str(tmp_path / "no.npz"),
                      "--no-progress"]) == 1
    assert "no.npz: no such file" in capsys.readouterr().err


# --- the real ImageNet Lite0 (../shared) ----------------------------------------------------------

def _imagenet50_rows():
    folder = need_shared(*LITE0, "imagenet50")
    lines = (folder / "labels.tsv").read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    return folder, [dict(zip(header, line.split("\t"))) for line in lines[1:]]


@pytest.mark.shared
def test_classifier_transform_equals_reference_inputs():
    folder, rows = _imagenet50_rows()
    ref = np.load(need_shared(*LITE0, "inputs_first4.npy"))
    ours = np.stack([classifier_transform(decode_image((folder / r["file"]).read_bytes()))
                     for r in rows[:4]])
    np.testing.assert_allclose(ours, ref, atol=1e-6)


@pytest.mark.shared
def test_lite0_tags_give_the_reference_top1_names(tmp_path):
    folder, rows = _imagenet50_rows()
    classes = need_shared("data", "imagenet_classes.tsv")
    picked = rows[:3]
    src = _write_lines(tmp_path / "in.tsv", [
        tsv_line(f"caption {i}", r["file"], (folder / r["file"]).read_bytes())
        for i, r in enumerate(picked)])
    tagger = ObjectTagger.lite0(need_shared(*LITE0, "efficientnet_lite0_imagenet.npz"), classes,
                                lang="zh", topk=3)
    names_en = load_class_names(classes, "en")
    for lang, names in (("zh", tagger.names), ("en", names_en)):
        tagger.names = names
        out = tmp_path / f"out_{lang}.tsv"
        assert tool.extract_tags(src, out, tagger, progress=False) == (3, 3)
        for row, ref in zip(out.read_text(encoding="utf-8").splitlines(), picked):
            top1 = int(ref["reference_top5"].split(",")[0])
            assert row.split("\t")[3].startswith(names[top1] + " "), (lang, row.split("\t")[3])
            assert len(row.split("\t")[3].split()) >= 3

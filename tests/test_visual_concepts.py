"""Visual concepts (ViCHA, `visual_concepts: embed`): the image's tags, embedded with the text
tower's word table, join the image side (ViT: at [CLS]; EfficientNet: a zero-initialised map onto
the pooled feature). The tags come from the image (the TSV's 4th column, or the Lite0 classifier
on the image), never from the caption."""
import subprocess
import sys

import numpy as np
import paddle
import pytest
import yaml

from conftest import ROOT, need_shared
from ernievil2.data.pipeline import BatchLoader
from ernievil2.embed import build_towers, embed
from ernievil2.factory import as_config, build_dual_encoder
from ernievil2.tagging import concept_tagger, extract_tags
from ernievil2.transforms import decode_image
from helpers import TINY_ERNIE, TINY_VIT, make_image, tiny_config, tsv_line
from test_train_resume import cmd, train_config

TINY_EFFNET = {"type": "efficientnet", "name": "lite0", "image_size": 32}


def pair(image_model, seed=0):
    out = []
    for concepts in ("none", "embed"):
        paddle.seed(seed)
        m = build_dual_encoder(dict(image_model), dict(TINY_ERNIE), embed_dim=32,
                               visual_concepts=concepts)
        m.eval()
        out.append(m)
    return out


TAGS = paddle.to_tensor([[1, 7, 9, 2, 0], [1, 12, 2, 0, 0]], dtype="int64")


@pytest.mark.parametrize("tower", [TINY_VIT, TINY_EFFNET], ids=["vit", "efficientnet"])
def test_at_initialisation_the_output_is_unchanged(tower):
    plain, concepts = pair(tower)
    x = paddle.randn([2, 3, 32, 32])
    np.testing.assert_array_equal(plain.encode_image(x).numpy(), concepts.encode_image(x, TAGS).numpy())
    with pytest.raises(ValueError, match="needs the image's tag ids"):
        concepts.encode_image(x)


def _mean_tag_embedding(m):
    keep = (TAGS != 0).astype("float32").unsqueeze(-1)
    return (m.text_model.word_emb(TAGS) * keep).sum(1) / keep.sum(1)


def test_vit_adds_the_concepts_at_the_class_token():
    _, m = pair(TINY_VIT)
    m.visual_concepts.proj.weight.set_value(paddle.randn(m.visual_concepts.proj.weight.shape))
    x = paddle.randn([2, 3, 32, 32])
    added = paddle.matmul(_mean_tag_embedding(m), m.visual_concepts.proj.weight)
    want = m.visual.forward_levels(x, 1, cls_add=added)[0]
    if m.visual_proj is not None:
        want = m.visual_proj(want)
    want = paddle.nn.functional.normalize(want, axis=-1)
    np.testing.assert_allclose(m.encode_image(x, TAGS).numpy(), want.numpy(), atol=1e-6)
    other = paddle.to_tensor([[1, 20, 2, 0, 0], [1, 21, 2, 0, 0]], dtype="int64")
    assert np.abs(m.encode_image(x, TAGS).numpy() - m.encode_image(x, other).numpy()).max() > 1e-4


def test_efficientnet_adds_the_concepts_to_the_pooled_feature_so_a_cache_works():
    _, m = pair(TINY_EFFNET)
    m.visual_concepts.proj.weight.set_value(paddle.randn(m.visual_concepts.proj.weight.shape))
    x = paddle.randn([2, 3, 32, 32])
    pooled = m.visual(x)  # what the frozen-feature cache keeps
    added = paddle.matmul(_mean_tag_embedding(m), m.visual_concepts.proj.weight)
    want = paddle.nn.functional.normalize(m.visual_proj(pooled + added), axis=-1)
    np.testing.assert_allclose(m.encode_image(x, TAGS).numpy(), want.numpy(), atol=1e-6)
    np.testing.assert_allclose(m.project_image(pooled, TAGS).numpy(), want.numpy(), atol=1e-6)


# -------------------------------------------------------------------------- inference: the tags
def _trained_model(tmp_path, **over):
    """A tiny model trained 2 steps with visual concepts; returns its final infer.yaml."""
    path, _ = train_config(tmp_path / "run", max_steps=2, save_every=2, visual_concepts="embed", **over)
    r = subprocess.run(cmd(path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp_path / "run" / "out" / "final" / "infer.yaml"


def _images(tmp_path, name, captions, tags=None):
    lines = [tsv_line(c, f"img{i}", make_image(100 + i)) + (f"\t{tags[i]}" if tags else "")
             for i, c in enumerate(captions)]
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(p)


def _embed(infer_yaml, test_file, **over):
    cfg = as_config(str(infer_yaml), test_file=test_file, num_workers=0, **over)
    towers, transform, encode_texts = build_towers(cfg, tagged_file=test_file)
    loader = BatchLoader(test_file, 3, image_transform=transform, text_encoder=encode_texts,
                         decode_image=decode_image)
    return embed(towers, loader).image


@pytest.mark.slow
def test_inference_tags_come_from_the_image_never_from_the_caption(tmp_path):
    infer_yaml = _trained_model(tmp_path)
    # training moved the zero-initialised map, so the tags matter
    sd = paddle.load(str(infer_yaml.parent / "model.pdparams"))
    assert np.abs(np.asarray(sd["visual_concepts.proj.weight"])).max() > 0
    captions = ["红色的圆形", "绿色的方块", "蓝色的三角", "黄色的圆形"]
    leak = ["红色", "绿色", "蓝色", "黄色"]  # captions that ARE tag words
    tags = ["红色 圆形", "绿色", "蓝色 方块", "黄色"]
    base = _embed(infer_yaml, _images(tmp_path, "a.tsv", captions, tags))
    np.testing.assert_array_equal(base, _embed(infer_yaml, _images(tmp_path, "b.tsv", leak, tags)))
    other = _embed(infer_yaml, _images(tmp_path, "c.tsv", captions, tags[::-1]))
    assert np.abs(base - other).max() > 1e-5


@pytest.mark.slow
@pytest.mark.shared
def test_without_a_4th_column_the_classifier_tags_the_image_itself(tmp_path):
    """The same as the file tagged by tools/extract_tags.py's function with that classifier,
    whatever the captions say."""
    lite0 = need_shared("data", "efficientnet_lite0", "efficientnet_lite0_imagenet.npz")
    infer_yaml = _trained_model(tmp_path)
    captions = ["红色的圆形", "绿色的方块", "蓝色的三角", "黄色的圆形"]
    leak = ["红色", "绿色", "蓝色", "黄色"]  # captions that ARE tag words
    over = {"tag_classifier": str(lite0)}
    untagged = _embed(infer_yaml, _images(tmp_path, "d.tsv", captions), **over)
    tagged_path = str(tmp_path / "d_tags.tsv")
    extract_tags(_images(tmp_path, "d.tsv", captions), tagged_path,
                 concept_tagger(str(lite0)), progress=False)
    np.testing.assert_array_equal(untagged, _embed(infer_yaml, tagged_path))
    np.testing.assert_array_equal(
        untagged, _embed(infer_yaml, _images(tmp_path, "e.tsv", leak), **over))


@pytest.mark.slow
def test_run_infer_on_the_final_model_and_the_exported_path(tmp_path):
    infer_yaml = _trained_model(tmp_path)
    test_file = _images(tmp_path, "t.tsv", ["红色的圆形", "绿色的方块"], ["红色 圆形", "绿色"])
    out = tmp_path / "emb.out"
    r = subprocess.run(["bash", str(ROOT / "run_infer.sh"), "0", str(infer_yaml),
                        f"test_file={test_file}", f"output_file={out}"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2
    r = subprocess.run(["bash", str(ROOT / "run_infer.sh"), "0", str(infer_yaml),
                        f"test_file={test_file}", f"output_file={out}", "execution=inference"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "visual_concepts: embed runs with execution: eager or to_static" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_missing_classifier_is_one_line(tmp_path):
    cfg = tiny_config(tmp_path, visual_concepts="embed", tag_classifier=str(tmp_path / "none.npz"))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    r = subprocess.run(["bash", str(ROOT / "run_infer.sh"), "0", str(path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "tag classifier not found" in r.stderr and "Traceback" not in r.stderr


def test_export_says_in_one_line_that_it_has_no_tag_input(tmp_path):
    from ernievil2.config import ConfigError
    from ernievil2.export import export_from_config

    cfg = as_config(tiny_config(tmp_path, visual_concepts="embed"))
    with pytest.raises(ConfigError, match="the export format has no input for"):
        export_from_config(cfg, str(tmp_path / "export"))
    assert not (tmp_path / "export").exists()


def test_commands_without_a_tagged_tsv_refuse_a_concepts_model_in_one_line(tmp_path):
    """ernievil2-index / -serve and eval_zeroshot embed images that carry no tags: they stop with
    a ConfigError (one line on the console) instead of a traceback from the image tower."""
    from ernievil2.config import ConfigError
    from ernievil2.search.encoder import Encoder

    cfg = as_config(tiny_config(tmp_path, visual_concepts="embed"))
    with pytest.raises(ConfigError, match="visual_concepts: embed models need each image's tags"):
        Encoder.from_config(cfg)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(dict(cfg), allow_unicode=True), encoding="utf-8")
    (tmp_path / "classes.txt").write_text("cat\ndog\n", encoding="utf-8")
    r = subprocess.run([sys.executable, str(ROOT / "eval_zeroshot.py"), str(path), "--classes",
                        str(tmp_path / "classes.txt"), "--images", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "visual_concepts: embed models need each image's tags" in r.stderr
    assert "Traceback" not in r.stderr

import numpy as np
import paddle
import pytest

from ernievil2.models.params import count_parameters
from ernievil2.models.ernie import ErnieTextModel, load_ernie_config
from ernievil2.factory import build_dual_encoder as create_model, image_preprocess_spec, resolve_image_spec
from helpers import TINY_ERNIE, TINY_VIT


def tiny_model(**kw):
    paddle.seed(0)
    m = create_model(kw.pop("image_model", dict(TINY_VIT)), dict(TINY_ERNIE), **kw)
    m.eval()
    return m


def test_encoders_return_unit_vectors_of_embed_dim():
    m = tiny_model()
    img = m.encode_image(paddle.randn([2, 3, 32, 32]))
    txt = m.encode_text(paddle.to_tensor([[1, 7, 8, 2, 0], [1, 9, 2, 0, 0]], dtype="int64"))
    assert img.shape == [2, 64] and txt.shape == [2, 64]
    np.testing.assert_allclose(np.linalg.norm(img.numpy(), axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt.numpy(), axis=1), 1.0, atol=1e-5)


def test_no_projection_when_widths_match_and_heads_when_they_differ():
    assert tiny_model().visual_proj is None and tiny_model().text_proj is None
    m = tiny_model(image_model={**TINY_VIT, "width": 32, "heads": 2}, embed_dim=48)
    assert m.visual_proj is not None and m.text_proj is not None
    assert m.encode_image(paddle.randn([1, 3, 32, 32])).shape == [1, 48]
    names = set(m.state_dict())
    assert "visual_proj.weight" in names and "text_proj.weight" in names


def test_padding_does_not_change_the_text_embedding():
    m = tiny_model()
    short = paddle.to_tensor([[1, 7, 8, 9, 2]], dtype="int64")
    padded = paddle.to_tensor([[1, 7, 8, 9, 2] + [0] * 11], dtype="int64")
    np.testing.assert_allclose(m.encode_text(short).numpy(), m.encode_text(padded).numpy(), atol=1e-6)


def test_every_text_layer_matters_and_dropout_only_in_training():
    m = tiny_model()
    ids = paddle.to_tensor([[1, 7, 8, 9, 2]], dtype="int64")
    a = m.encode_text(ids).numpy()
    np.testing.assert_array_equal(a, m.encode_text(ids).numpy())  # eval: deterministic
    m.train()
    assert not np.allclose(a, m.encode_text(ids).numpy())  # dropout 0.1 is active in training


def test_ernie2_sentence_embedding_is_a_parameter_and_used():
    t = ErnieTextModel(**{**TINY_ERNIE, "use_sent_emb": True})
    assert "sent_emb.weight" in t.state_dict()
    assert "sent_emb.weight" not in ErnieTextModel(**TINY_ERNIE).state_dict()


def test_text_longer_than_positions_is_an_error():
    t = ErnieTextModel(**{**TINY_ERNIE, "max_position_embeddings": 8})
    with pytest.raises(ValueError, match="max_position_embeddings"):
        t(paddle.ones([1, 9], dtype="int64"))


def test_ernie_config_rejects_unknown_keys(tmp_path):
    p = tmp_path / "c.json"
    p.write_text('{"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, '
                 '"vocab_size": 10, "hiden_act": "gelu"}')
    with pytest.raises(ValueError, match="hiden_act"):
        load_ernie_config(str(p))


def test_official_base_model_has_the_official_parameter_count(tmp_path):
    # 350 tensors, 203,738,881 parameters for ViT-B/16 + 12-layer ERNIE 3.0 base (official_release.md)
    from helpers import write_json
    cfg = write_json(tmp_path / "e.json", {"hidden_size": 768, "num_hidden_layers": 12,
                                           "num_attention_heads": 12, "vocab_size": 40000,
                                           "max_position_embeddings": 2048})
    with paddle.LazyGuard():
        m = create_model("vit_b16", cfg)
    assert len(m.state_dict()) == 350
    assert count_parameters(m) == 203_738_881


def test_unknown_image_tower_is_an_error_listing_the_known_ones():
    with pytest.raises(ValueError, match="vit_b16"):
        resolve_image_spec("vit_b17")


def test_preprocessing_follows_the_tower():
    assert image_preprocess_spec("vit_b16") == (224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert image_preprocess_spec("vit_b16", 288)[0] == 288
    size, mean, _ = image_preprocess_spec("efficientnet_lite0")
    assert size == 224 and mean == (0.5, 0.5, 0.5)


def test_lite_towers_get_half_statistics_however_named():
    assert image_preprocess_spec({"type": "efficientnet", "name": "lite0"})[1] == (0.5, 0.5, 0.5)
    assert image_preprocess_spec({"type": "efficientnet", "name": "b0"})[1] == (0.485, 0.456, 0.406)


def test_mean_pooling_averages_the_non_padding_tokens_and_ignores_padding():
    paddle.seed(0)
    t = ErnieTextModel(**{**TINY_ERNIE, "pooling": "mean"})
    t.eval()
    ids = paddle.to_tensor([[1, 7, 8, 9, 2]], dtype="int64")
    padded = paddle.to_tensor([[1, 7, 8, 9, 2, 0, 0, 0]], dtype="int64")
    out = t(ids).numpy()
    np.testing.assert_allclose(out, t(padded).numpy(), atol=1e-6)
    # the same weights with [CLS] pooling give another vector: the option is really used
    paddle.seed(0)
    cls = ErnieTextModel(**TINY_ERNIE)
    cls.eval()
    cls.set_state_dict(t.state_dict())
    assert not np.allclose(out, cls(ids).numpy(), atol=1e-3)
    # and the mean is over the hidden states of the 5 real tokens
    hidden = []
    t.encoder_stack.block[-1].register_forward_post_hook(lambda layer, inp, o: hidden.append(o))
    t(padded)
    np.testing.assert_allclose(out, hidden[0].numpy()[:, :5].mean(1), atol=1e-6)
    assert set(t.state_dict()) == set(cls.state_dict())  # one checkpoint layout for both


def test_unknown_pooling_is_an_error():
    with pytest.raises(ValueError, match="pooling"):
        ErnieTextModel(**{**TINY_ERNIE, "pooling": "max"})


def test_zero_layer_tower_is_the_mean_of_normalised_token_and_position_embeddings():
    # configs/text/ernie_embed_mean.json (the Flickr8k-CN recipe): no transformer block at all
    from pathlib import Path
    cfg = load_ernie_config(Path(__file__).resolve().parents[1] / "packages" / "configs" / "text"
                            / "ernie_embed_mean.json")
    assert cfg["num_hidden_layers"] == 0 and cfg["pooling"] == "mean"
    paddle.seed(0)
    t = ErnieTextModel(**{**cfg, "vocab_size": 64})
    t.eval()
    assert len(t.encoder_stack.block) == 0
    ids = paddle.to_tensor([[1, 7, 8, 2, 0, 0], [1, 9, 2, 0, 0, 0]], dtype="int64")
    out = t(ids).numpy()
    pos = paddle.arange(6, dtype="int64").unsqueeze(0)
    x = t.ln(t.word_emb(ids) + t.pos_emb(pos)).numpy()
    np.testing.assert_allclose(out[0], x[0, :4].mean(0), atol=1e-5)
    np.testing.assert_allclose(out[1], x[1, :3].mean(0), atol=1e-5)
    # the token order still matters through the position embeddings
    swapped = paddle.to_tensor([[1, 8, 7, 2, 0, 0]], dtype="int64")
    assert not np.allclose(out[0], t(swapped).numpy()[0], atol=1e-4)


def test_model_info_prints_the_counts_the_run_log_prints(tmp_path):
    """tools/model_info.py (lazy build) and factory.create_model's log line (real build) agree,
    for a BatchNorm tower (running statistics excluded by both) and a ViT."""
    import logging
    import subprocess
    import sys
    import yaml
    from conftest import ROOT
    from ernievil2.cli import load_infer_config
    from ernievil2.factory import create_model as create_run_model
    from helpers import tiny_config

    paths = []
    for name, image_model in (("lite0", "efficientnet_lite0"), ("vit", dict(TINY_VIT))):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tiny_config(tmp_path, image_model=image_model, embed_dim=32)))
        paths.append(path)
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "model_info.py"), *map(str, paths)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in r.stdout.splitlines() if ".yaml" in line}
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # on the logger itself: setup_logging stops propagation
    factory_log = logging.getLogger("ernievil2.factory")
    factory_log.addHandler(handler)
    old_level = factory_log.level
    factory_log.setLevel(logging.INFO)
    try:
        models = {path: create_run_model(load_infer_config(str(path))) for path in paths}
    finally:
        factory_log.removeHandler(handler)
        factory_log.setLevel(old_level)
    logs = [r.getMessage() for r in records if r.getMessage().startswith("parameters:")]
    assert len(logs) == len(paths)
    for path, logged in zip(paths, logs):
        model = models[path]
        row = table[path.name]
        assert logged == (f"parameters: image tower {row[2]}, text tower {row[4]}, total {row[7]}")
        bn_stats = sum(int(np.prod(p.shape)) for n, p in model.visual.named_parameters()
                       if n.endswith(("_mean", "_variance")))
        assert (bn_stats > 0) == (path.stem == "lite0")
        n_all = sum(int(np.prod(p.shape)) for p in model.visual.parameters())
        assert int(row[2].replace(",", "")) == n_all - bn_stats

"""Names of published files: registry, cache paths, name -> path resolution for config keys, and
the layouts the base entries are checked against (without allocating a model)."""
import math
import os
import subprocess
import sys
from pathlib import Path

import paddle
import pytest

from ernievil2 import pretrained
from ernievil2.cli import load_infer_config, load_train_config, user_error_line
from ernievil2.config import ConfigError
from ernievil2.download import expected_layout
from ernievil2.models.efficientnet import build_efficientnet
from ernievil2.models.lite0_timm import timm_names


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv(pretrained.HOME_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(pretrained.BASE_ENV, raising=False)
    return tmp_path / "cache"


def test_paths_and_values_that_are_not_names_pass_through(home, tmp_path):
    existing = tmp_path / "mine.pdparams"
    existing.write_bytes(b"x")
    assert pretrained.resolve(str(existing), pretrained.WEIGHTS) == str(existing)
    assert pretrained.resolve("./not/there.pdparams", pretrained.WEIGHTS) == "./not/there.pdparams"
    assert pretrained.resolve("", pretrained.WEIGHTS) == ""
    assert pretrained.resolve(None, pretrained.VOCAB) is None


def test_missing_name_says_which_command_fetches_it(home):
    with pytest.raises(FileNotFoundError) as err:
        pretrained.weights_path("ernie_vil-2.0-base-zh")
    assert str(err.value) == ("ernie_vil-2.0-base-zh is not downloaded: run `ernievil2-download "
                              "ernie_vil-2.0-base-zh` (or python tools/download.py ernie_vil-2.0-base-zh)")


def test_downloaded_name_resolves_to_its_cache_file(home):
    entry = pretrained.REGISTRY["ernie-3.0-base-zh-vocab"]
    path = home / "pretrained" / "ernie-3.0-base-zh-vocab.txt"
    assert pretrained.cache_path(entry) == str(path)
    path.parent.mkdir(parents=True)
    path.write_text("[PAD]\n", encoding="utf-8")
    assert pretrained.vocab_path("ernie-3.0-base-zh-vocab") == str(path)
    lite0 = pretrained.REGISTRY["efficientnet-lite0-imagenet"]
    (home / "pretrained" / "efficientnet-lite0-imagenet.pdparams").write_bytes(b"x")
    assert pretrained.image_tower_path(lite0.name) == pretrained.cache_path(lite0)


def test_a_name_of_another_kind_is_a_config_error(home):
    with pytest.raises(ConfigError, match="'ernie-3.0-base-zh-vocab' is a vocab download, not a weights"):
        pretrained.weights_path("ernie-3.0-base-zh-vocab")


def test_default_home_and_mirror_override(monkeypatch):
    monkeypatch.delenv(pretrained.HOME_ENV, raising=False)
    monkeypatch.setenv("HOME", "/somewhere")
    assert pretrained.home() == "/somewhere/.cache/ernievil2"
    entry = pretrained.REGISTRY["ernie_vil-2.0-base-zh"]
    monkeypatch.delenv(pretrained.BASE_ENV, raising=False)
    assert pretrained.url_of(entry) == entry.url
    monkeypatch.setenv(pretrained.BASE_ENV, "http://127.0.0.1:8000/")
    assert pretrained.url_of(entry) == "http://127.0.0.1:8000/ernie_vil-2.0-base-zh/model_state.pdparams"
    assert pretrained.raw_path(entry) == \
        "/somewhere/.cache/ernievil2/downloads/ernie_vil-2.0-base-zh/model_state.pdparams"


def test_registry_md5s_are_the_published_ones():
    reg = pretrained.REGISTRY
    assert reg["ernie_vil-2.0-base-zh"].md5 == "38d8c8e01f74ba881e87d9a3f669e5ae"
    assert reg["ernie-3.0-base-zh-vocab"].md5 == "1c1c1f4fd93c5bed3b4eebec4de976a8"
    assert reg["ernie-vil2-base-vit"].md5 is None and reg["efficientnet-lite0-imagenet"].md5 is None
    assert {e.kind for e in reg.values()} == {pretrained.WEIGHTS, pretrained.VOCAB, pretrained.IMAGE_TOWER}


@pytest.mark.parametrize("name", ["ernie-vil2-base-vit", "ernie_vil-2.0-base-zh"])
def test_base_weights_are_checked_against_350_tensors_and_203738881_parameters(name):
    # The numbers of the official release (issue; ../shared README: 350 keys for the base model);
    # the layout comes from the model built without allocating its weights.
    entry = pretrained.REGISTRY[name]
    layout = expected_layout(entry)
    assert len(layout) == entry.tensors == 350
    count = sum(math.prod(shape) for shape in layout.values())
    assert count == entry.parameters == 203_738_881
    assert not any(k.startswith("visual.classfy.") for k in layout)
    assert layout["visual.blocks.11.attn.qkv.weight"] == [768, 2304]
    assert layout["text_model.word_emb.weight"] == [40000, 768]


def test_timm_lite0_names_cover_the_model():
    with paddle.LazyGuard():
        model = build_efficientnet("lite0", with_classifier=True)
    names = timm_names(model)
    assert sorted(names.values()) == sorted(model.state_dict())
    # timm nests the 16 blocks by stage (repeats 1, 2, 2, 3, 3, 4, 1); the first is separable.
    assert names["blocks.0.0.conv_dw.weight"] == "blocks.0.depthwise_conv.weight"
    assert names["blocks.0.0.conv_pw.weight"] == "blocks.0.project_conv.weight"
    assert names["blocks.1.0.conv_pw.weight"] == "blocks.1.expand_conv.weight"
    assert names["blocks.4.0.bn3.running_var"] == "blocks.8.bn_project._variance"
    assert names["blocks.5.3.conv_pwl.weight"] == "blocks.14.project_conv.weight"
    assert names["blocks.6.0.conv_dw.weight"] == "blocks.15.depthwise_conv.weight"
    assert names["bn1.running_mean"] == "bn_stem._mean" and names["bn2.weight"] == "bn_head.weight"
    assert names["classifier.weight"] == "classifier.weight"


def _cache_file(home, name, content=b"x"):
    path = home / "pretrained" / (name + pretrained.REGISTRY[name].ext)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return str(path)


def test_config_keys_resolve_downloaded_names_from_the_cache(home, tmp_path):
    vocab = _cache_file(home, "ernie-3.0-base-zh-vocab", "[PAD]\n".encode())
    tower = _cache_file(home, "efficientnet-lite0-imagenet")
    cfg = load_infer_config(None, ["vocab_file=ernie-3.0-base-zh-vocab"], quiet=True)
    assert cfg.vocab_file == vocab
    train = load_train_config(None, ["vocab_file=ernie-3.0-base-zh-vocab",
                                     "init_image_tower=efficientnet-lite0-imagenet"])
    assert (train.vocab_file, train.init_image_tower) == (vocab, tower)
    # Paths, missing paths and empty values stay as given (a later "not found" names the path).
    cfg = load_infer_config(None, ["vocab_file=./no/such/vocab.txt", "init_from_params="], quiet=True)
    assert (cfg.vocab_file, cfg.init_from_params) == ("./no/such/vocab.txt", "")
    (tmp_path / "ernie-vil2-base-vit").write_bytes(b"mine")  # an existing file wins over the name
    cfg = load_infer_config(None, [f"init_from_params={tmp_path / 'ernie-vil2-base-vit'}"], quiet=True)
    assert cfg.init_from_params == str(tmp_path / "ernie-vil2-base-vit")


def test_a_config_naming_a_missing_download_fails_with_the_fetch_command(home, tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("init_from_params: ernie-vil2-base-vit\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError) as err:
        load_infer_config(str(yaml_file), quiet=True)
    line = user_error_line(err.value)
    assert line == ("error: ernie-vil2-base-vit is not downloaded: run `ernievil2-download "
                    "ernie-vil2-base-vit` (or python tools/download.py ernie-vil2-base-vit)")
    with pytest.raises(ConfigError, match="is a weights download, not a vocab one"):
        load_infer_config(None, ["vocab_file=ernie-vil2-base-vit"], quiet=True)


def test_reading_a_config_with_names_does_not_import_paddle(home):
    _cache_file(home, "ernie-3.0-base-zh-vocab")
    code = ("import sys; from ernievil2.cli import load_infer_config; "
            "cfg = load_infer_config(None, ['vocab_file=ernie-3.0-base-zh-vocab'], quiet=True); "
            "print(cfg.vocab_file.endswith('.txt'), 'paddle' in sys.modules)")
    packages = Path(__file__).resolve().parents[1] / "packages"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(packages)}).stdout
    assert out.split() == ["True", "False"]

from pathlib import Path

import pytest
import yaml

from ernievil2 import resources
from ernievil2.cli import load_infer_config as load_config, load_train_config
from ernievil2.config import ConfigError
from ernievil2.keys import OFFICIAL_KEYS
from ernievil2.models.ernie import load_ernie_config
from ernievil2.pretrained import REGISTRY, cache_path

OFFICIAL_YAML = {
    "input_dtype": "int64", "device": "gpu", "infer_batch_size": 10, "max_text_seqlen": 48,
    "vocab_file": "./packages/ernie_base_3.0/vocab.txt",
    "text_model_config": "./packages/ernie_base_3.0/ernie_config.base.json",
    "test_file": "./packages/coco/your_data_path", "output_file": "./test_out/cross_modal_embeddings.out",
    "init_from_params": "./params/your_model_weights_path", "pad_token": 0, "cls_token": 1,
    "sep_token": 2, "mask_token": 3, "unk_token": 17963,
}


def test_the_official_yaml_is_accepted_as_is(tmp_path):
    p = tmp_path / "ernie_vil_base.yaml"
    p.write_text(yaml.safe_dump(OFFICIAL_YAML))
    cfg = load_config(str(p))
    assert set(OFFICIAL_KEYS) <= set(cfg)
    assert cfg.infer_batch_size == 10 and cfg.image_model == "vit_b16"


SHIPPED = ["demo_tiny", "ernie_vil_base", "ernie_vil_base_efficientnet_b5",
           "ernie_vil_large_efficientnet_l2", "ernie_vil_large_vit_l14", "flickr8k_cn_lite0",
           "own_photos_lite0"]


def test_the_shipped_configs_are_listed_by_resources():
    assert resources.shipped_run_configs() == SHIPPED
    assert set(resources.shipped_text_configs()) >= {"ernie_3.0_base_zh", "ernie_demo_tiny"}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load_by_name_from_any_directory(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # download names in a config resolve when it is read: a cache holding them
    monkeypatch.setenv("ERNIEVIL2_HOME", str(tmp_path / "home"))
    for entry in REGISTRY.values():
        Path(cache_path(entry)).parent.mkdir(parents=True, exist_ok=True)
        Path(cache_path(entry)).touch()
    cfg, train_cfg = load_config(name), load_train_config(name)
    path = resources.run_config_path(name)
    assert Path(path).parent == resources.configs_dir() and cfg.infer_batch_size >= 1
    assert train_cfg.text_model_config == cfg.text_model_config
    # the text tower is named, not a path into the source tree, and resolves from here
    assert "/" not in yaml.safe_load(Path(path).read_text())["text_model_config"]
    assert load_ernie_config(cfg.text_model_config)["hidden_size"] > 0
    if name.startswith("ernie_vil"):
        assert set(OFFICIAL_KEYS) <= set(yaml.safe_load(Path(path).read_text()))


@pytest.mark.parametrize("name", resources.shipped_text_configs())
def test_shipped_text_configs_are_plain_ernie_configs(name):
    path = resources.text_config_path(name.replace("_", "-"))
    assert path.endswith(f"{name}.json") and not any(k.startswith("_") for k in load_ernie_config(path))


def test_the_factory_reads_a_run_config_that_also_drives_training():
    from ernievil2.factory import as_config
    cfg = as_config("demo_tiny")
    assert "max_steps" not in cfg and cfg.embed_dim == 128
    with pytest.raises(ConfigError, match="'infer_batch_sise'"):
        as_config("demo_tiny", infer_batch_sise=3)


def test_paths_in_a_config_stay_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tower.json").write_text((resources.configs_dir() / "text" / "ernie_demo_tiny.json").read_text())
    (tmp_path / "run.yaml").write_text("test_file: data/x.tsv\ntext_model_config: tower.json\n")
    cfg = load_config("run.yaml", ["output_file=out/e.out"])
    assert (cfg.test_file, cfg.text_model_config, cfg.output_file) == ("data/x.tsv", "tower.json", "out/e.out")
    with pytest.raises(ConfigError, match="not found: nothing_here.yaml"):
        load_config("nothing_here.yaml")


def test_unknown_key_and_bad_value_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'infer_batch_sise'"):
        load_config(None, ["infer_batch_sise=3"])
    with pytest.raises(ConfigError, match="'infer_batch_size' = 0 is invalid"):
        load_config(None, ["infer_batch_size=0"])
    with pytest.raises(ConfigError, match="'text_padding'"):
        load_config(None, ["text_padding=shortest"])


def test_overrides_are_yaml_typed():
    cfg = load_config(None, ["infer_batch_size=32", "skip_bad_lines=true", "image_model={base: vit_b16, layers: 2}"])
    assert cfg.infer_batch_size == 32 and cfg.skip_bad_lines is True
    assert cfg.image_model == {"base": "vit_b16", "layers": 2}


def test_test_file_path_need_not_contain_coco():
    assert load_config(None, ["test_file=/data/flickr_test.tsv"]).test_file == "/data/flickr_test.tsv"


def test_numeric_keys_accept_ints_and_store_floats():
    cfg = load_train_config(None, ["lr=0", "ema_decay=0", "init_logit_scale=4"])
    assert cfg.lr == 0.0 and isinstance(cfg.lr, float)
    assert isinstance(cfg.init_logit_scale, float)
    with pytest.raises(ConfigError, match="'ema_decay' = 1 is invalid"):
        load_train_config(None, ["ema_decay=1"])


def test_inference_config_names_training_keys_and_ignores_them(caplog):
    with caplog.at_level("WARNING", logger="ernievil2"):
        cfg = load_config(None, ["lr=0.1", "infer_batch_size=4"])
    assert "lr" not in cfg and cfg.infer_batch_size == 4
    assert "run_train.sh" in caplog.text and "lr" in caplog.text


def test_bad_yaml_override_is_one_line():
    with pytest.raises(ConfigError, match="not valid YAML") as e:
        load_config(None, ["image_model={base: vit_b16"])
    assert "\n" not in str(e.value)


def test_training_schema_is_inference_plus_training():
    cfg = load_train_config(None, ["infer_batch_size=4", "max_steps=3"])
    assert cfg.infer_batch_size == 4 and cfg.max_steps == 3


def test_library_config_module_imports_no_key_tables():
    import ernievil2.config as config
    assert not hasattr(config, "SCHEMA") and not hasattr(config, "register_keys")

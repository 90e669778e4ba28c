"""Run configuration: the official `ernie_vil_base.yaml` keys with their official meaning, plus
the project's own keys. Every key is declared once here, with its default and check; an unknown
key or a bad value is an error naming the key (the official AttrDict accepted anything).
"""
import difflib
import os
from dataclasses import dataclass
from typing import Any, Callable

import yaml


@dataclass(frozen=True)
class Key:
    default: Any
    check: Callable[[Any], bool]
    expect: str  # what a valid value looks like, for the error message
    doc: str


def _is_int(lo=None):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo)


def _is_num(lo=None):
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and (lo is None or v >= lo)


def _one_of(*opts):
    return lambda v: v in opts


_str = lambda v: isinstance(v, str)  # noqa: E731
_opt_str = lambda v: v is None or isinstance(v, str)  # noqa: E731
_bool = lambda v: isinstance(v, bool)  # noqa: E731
_opt_int = lambda v: v is None or _is_int(1)(v)  # noqa: E731

OFFICIAL_KEYS = {
    "input_dtype": Key("int64", _one_of("int64", "int32"), "int64 or int32", "dtype of the token ids"),
    "device": Key("gpu", _str, "gpu or cpu", "gpu (falls back to CPU, with a warning, where there is none); anything else = CPU"),
    "infer_batch_size": Key(10, _is_int(1), "a positive int", "lines per batch and process"),
    "max_text_seqlen": Key(48, _is_int(3), "an int >= 3", "text length in tokens, [CLS] and [SEP] included"),
    "vocab_file": Key("./packages/ernie_base_3.0/vocab.txt", _str, "a path", "vocab: `token\\tid` lines or one token a line"),
    "text_model_config": Key("./packages/configs/text/ernie_3.0_base_zh.json", _str, "a path", "ERNIE json config of the text tower"),
    "test_file": Key("", _str, "a path", "TSV to embed: text \\t image_id \\t base64 image"),
    "output_file": Key("./test_out/cross_modal_embeddings.out", _str, "a path", "embeddings output"),
    "init_from_params": Key("", _str, "a path or empty", "checkpoint (official or PaddleNLP layout); empty = random weights"),
    "pad_token": Key(0, _is_int(0), "an int", "id of [PAD]"),
    "cls_token": Key(1, _is_int(0), "an int", "id of [CLS]"),
    "sep_token": Key(2, _is_int(0), "an int", "id of [SEP]"),
    "mask_token": Key(3, _is_int(0), "an int", "id of [MASK]"),
    "unk_token": Key(17963, _is_int(0), "an int", "accepted for compatibility; unused (the official value is wrong: [UNK] is taken from the vocab)"),
}

PROJECT_KEYS = {
    "image_model": Key("vit_b16", lambda v: isinstance(v, (str, dict)), "a tower name or mapping",
                       "image tower: vit_b16, vit_l14, efficientnet_b5, efficientnet_l2, efficientnet_lite0, or a mapping"),
    "image_size": Key(None, _opt_int, "null or a positive int", "input resolution; null = the tower's own"),
    "embed_dim": Key(None, _opt_int, "null or a positive int", "joint space width; null = the text tower's width (no projection)"),
    "text_padding": Key("longest", _one_of("longest", "max_length"), "longest or max_length",
                        "pad each batch to its longest text (same [CLS] output, faster) or always to max_text_seqlen (official)"),
    "num_workers": Key(2, _is_int(0), "an int >= 0", "image decode/preprocess worker threads per process (0 = inline)"),
    "prefetch": Key(4, _is_int(1), "a positive int", "batches prepared ahead (bounded queue)"),
    "skip_bad_lines": Key(False, _bool, "true or false", "skip bad input lines and report them, instead of stopping"),
    "amp": Key("none", _one_of("none", "fp16", "bf16"), "none, fp16 or bf16", "mixed precision (GPU only; untested on CPU-only CI)"),
    "execution": Key("eager", _one_of("eager", "to_static", "inference"), "eager, to_static or inference",
                     "eager; compiled with paddle.jit.to_static; or inference: the exported towers in "
                     "Paddle Inference predictors (oneDNN on CPU), the fastest on CPU"),
    "export_dir": Key("", _str, "a path or empty",
                      "execution inference: the export to run (made there if it holds none); "
                      "empty = a cache folder per model (~/.cache/ernievil2/exports, or $ERNIEVIL2_EXPORT_CACHE)"),
    "write_sidecar": Key(True, _bool, "true or false", "also write OUTPUT.npz, which eval_retri.py reads faster"),
    "log_dir": Key("./log", _str, "a path", "run logs (and the launcher's logs under log_dir/launch)"),
    "seed": Key(0, _is_int(0), "an int >= 0", "random seed (random weights, augmentation, shuffling)"),
}

SCHEMA = {**OFFICIAL_KEYS, **PROJECT_KEYS}


class ConfigError(ValueError):
    pass


class Config(dict):
    """A validated run config; keys are also attributes (cfg.infer_batch_size)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def register_keys(keys):
    """Let a sub-system (e.g. training) declare its keys in the same schema."""
    clash = set(keys) & set(SCHEMA)
    if clash:
        raise ValueError(f"config keys declared twice: {sorted(clash)}")
    SCHEMA.update(keys)


def parse_override(item):
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path=None, overrides=(), schema=None):
    schema = schema or SCHEMA
    data = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
    for item in overrides:
        k, v = parse_override(item) if isinstance(item, str) else item
        data[k] = v
    where = path or "config"
    unknown = sorted(set(data) - set(schema))
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, schema, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{where}: unknown key(s) {', '.join(hints)}; every key is listed in "
                          "packages/configs/ernie_vil_base.yaml and the README")
    cfg = Config({k: spec.default for k, spec in schema.items()})
    for k, v in data.items():
        if not schema[k].check(v):
            raise ConfigError(f"{where}: key {k!r} = {v!r} is invalid: expected {schema[k].expect}")
        cfg[k] = v
    return cfg


def describe_keys(schema=None):
    """Markdown table of every key (used to generate the README's config section)."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for k, spec in (schema or SCHEMA).items():
        rows.append(f"| `{k}` | `{spec.default!r}` | {spec.doc} |")
    return "\n".join(rows)


# The training keys live in train/keys.py (next to the code that uses them) but belong to the same
# schema, so that one YAML file can drive run_infer.sh and run_train.sh.
from .train import keys as _train_keys  # noqa: E402,F401  (registers TRAIN_KEYS)

"""Run configuration: a generic schema and loader. The key tables are in `ernievil2.keys`
(INFER_KEYS, TRAIN_KEYS); each entry point composes the schema it accepts. An unknown key or a
bad value is an error naming the key, with "did you mean" (the official AttrDict accepted
anything).
"""
import difflib
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import yaml


@dataclass(frozen=True)
class Key:
    default: Any
    check: Callable[[Any], bool]
    expect: str  # what a valid value looks like, for the error message
    doc: str
    coerce: Optional[Callable[[Any], Any]] = None  # applied to a valid value (e.g. int -> float)


def is_int(lo=None):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo)


def is_num(lo=None, hi=None):
    """A number (int or float) in [lo, hi); YAML reads `lr: 0` as an int, so ints are accepted."""
    return lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool)
                      and (lo is None or v >= lo) and (hi is None or v < hi))


def one_of(*opts):
    return lambda v: v in opts


def is_str(v):
    return isinstance(v, str)


def is_bool(v):
    return isinstance(v, bool)


def opt_int(v):
    return v is None or is_int(1)(v)


def num_key(default, doc, lo=0, hi=None, expect="a number"):
    """A float key that also accepts ints (stored as float)."""
    return Key(default, is_num(lo, hi), expect, doc, coerce=float)


class ConfigError(ValueError):
    pass


class Config(dict):
    """A validated run config; keys are also attributes (cfg.infer_batch_size)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def compose(*tables):
    """One schema from several key tables; a key declared twice is a programming error."""
    schema = {}
    for table in tables:
        clash = set(schema) & set(table)
        if clash:
            raise ValueError(f"config keys declared twice: {sorted(clash)}")
        schema.update(table)
    return schema


def parse_override(item):
    """`key=value` with the value read as YAML (`lr=1e-3`, `views=[[image, text, 1.0]]`)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        problem = str(e).splitlines()[0]
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem})") from None
    return key.strip(), value


def read_yaml_mapping(path):
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else path
            raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
    return data


def load_config(path=None, overrides=(), *, schema, elsewhere=None, on_elsewhere=None):
    """Read a YAML file (optional) and `key=value` overrides against `schema`.

    elsewhere: {command: key table} of keys another command uses; such keys are not errors here
    but are dropped, and `on_elsewhere(keys_by_command)` is called (entry points log it)."""
    data = read_yaml_mapping(path) if path else {}
    for item in overrides:
        k, v = parse_override(item) if isinstance(item, str) else item
        data[k] = v
    where = path or "config"
    foreign = {}
    for command, table in (elsewhere or {}).items():
        keys = sorted(k for k in data if k in table and k not in schema)
        if keys:
            foreign[command] = keys
            for k in keys:
                data.pop(k)
    unknown = sorted(set(data) - set(schema))
    if unknown:
        known = list(schema) + [k for t in (elsewhere or {}).values() for k in t]
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, known, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{where}: unknown key(s) {', '.join(hints)}; every key is listed in the "
                          "README's configuration section")
    if foreign and on_elsewhere:
        on_elsewhere(foreign)
    cfg = Config()
    for k, spec in schema.items():
        v = data.get(k, spec.default)
        if k in data and not spec.check(v):
            raise ConfigError(f"{where}: key {k!r} = {v!r} is invalid: expected {spec.expect}")
        cfg[k] = spec.coerce(v) if spec.coerce and v is not None else v
    return cfg

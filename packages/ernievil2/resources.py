"""Shipped resources (run configs, ERNIE text configs), found by name from any directory.

Installed, they are package data under `ernievil2/configs`; in a source checkout they are
`packages/configs` beside the package. A value that names an existing file is a path (relative to
the working directory, as in the official code); otherwise it may be the name of a shipped file:
`demo_tiny` -> configs/demo_tiny.yaml, `ernie-3.0-base-zh` -> configs/text/ernie_3.0_base_zh.json.
"""
import os
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def configs_dir() -> Path:
    installed = _HERE / "configs"
    return installed if installed.is_dir() else _HERE.parent / "configs"


def _named(folder: Path, value: str, ext: str):
    if not value or os.sep in value or "/" in value:
        return None
    stem = value[:-len(ext)] if value.endswith(ext) else value
    for candidate in (stem, stem.replace("-", "_")):
        path = folder / f"{candidate}{ext}"
        if path.is_file():
            return str(path)
    return None


def shipped(folder: Path, ext: str):
    return sorted(p.stem for p in folder.glob(f"*{ext}")) if folder.is_dir() else []


def run_config_path(value) -> str:
    """A YAML path as given, or the path of the shipped run config of that name."""
    value = os.fspath(value)
    if os.path.isfile(value):
        return value
    return _named(configs_dir(), value, ".yaml") or value


def text_config_path(value):
    """An ERNIE json path as given, or the shipped text config of that name."""
    if not isinstance(value, str) or os.path.isfile(value):
        return value
    return _named(configs_dir() / "text", value, ".json") or value


def shipped_run_configs():
    return shipped(configs_dir(), ".yaml")


def shipped_text_configs():
    return shipped(configs_dir() / "text", ".json")

"""Published weights and vocab by name: the registry, the local cache, and name -> path resolution.

`ernievil2-download NAME` (ernievil2.download) fetches a name into the cache; config keys that take
a file (`init_from_params`, `vocab_file`, `init_image_tower`) also accept the name and resolve it
here. Cache layout ($ERNIEVIL2_HOME, default ~/.cache/ernievil2):

    pretrained/NAME.pdparams | NAME.txt    checked files in the project's layout (what names resolve to)
    downloads/NAME/FILE.part               a partial download, resumed with an HTTP Range request
    downloads/NAME/FILE                    a complete raw download, or the file copied there by hand

This module stays light (no paddle): configs import it while they are being read.
"""
import os
import posixpath
from dataclasses import dataclass, field
from typing import Optional

from .config import ConfigError

HOME_ENV = "ERNIEVIL2_HOME"
# A mirror holding NAME/FILE for every name (e.g. http://127.0.0.1:8000 in the tests).
BASE_ENV = "ERNIEVIL2_DOWNLOAD_BASE"
WEIGHTS, VOCAB, IMAGE_TOWER = "weights", "vocab", "image_tower"

# The ERNIE-ViL 2.0 base dual encoder (ViT-B/16 + ERNIE 3.0 base zh) in the official layout, with the
# unused ImageNet head (visual.classfy.*) dropped.
BASE_MODEL = {"image_model": "vit_b16", "text_model_config": "ernie-3.0-base-zh"}
BASE_TENSORS, BASE_PARAMETERS = 350, 203_738_881
PADDLENLP_ERNIE_VIL = "https://paddlenlp.bj.bcebos.com/models/community/PaddlePaddle/ernie_vil-2.0-base-zh"


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # WEIGHTS (init_from_params), VOCAB (vocab_file) or IMAGE_TOWER (init_image_tower)
    url: str
    fmt: str  # how ernievil2.download checks and converts it: "ernie_vil", "vocab" or "timm_lite0"
    ext: str  # of the cached file
    md5: Optional[str]  # of the downloaded file, where the publisher gives one
    source: str  # where the URL (and md5) are published
    # What the structural check compares against: model specs, and exact counts where known.
    model: dict = field(default_factory=dict)
    tensors: Optional[int] = None
    parameters: Optional[int] = None


REGISTRY = {e.name: e for e in (
    Entry("ernie-vil2-base-vit", WEIGHTS,
          "https://bj.bcebos.com/wenxin-models/OPEN_ERNIE_VIL2_BASE_ViT.pdparams", "ernie_vil",
          ".pdparams", None, "PaddlePaddle/ERNIE Research/ERNIE-ViL2 readme (official release)",
          BASE_MODEL, BASE_TENSORS, BASE_PARAMETERS),
    Entry("ernie_vil-2.0-base-zh", WEIGHTS, f"{PADDLENLP_ERNIE_VIL}/model_state.pdparams",
          "ernie_vil", ".pdparams", "38d8c8e01f74ba881e87d9a3f669e5ae",
          "PaddleNLP resource map for PaddlePaddle/ernie_vil-2.0-base-zh (PaddleNLP layout, "
          "converted to the official one)", BASE_MODEL, BASE_TENSORS, BASE_PARAMETERS),
    Entry("ernie-3.0-base-zh-vocab", VOCAB, f"{PADDLENLP_ERNIE_VIL}/vocab.txt", "vocab", ".txt",
          "1c1c1f4fd93c5bed3b4eebec4de976a8",
          "PaddleNLP resource map for PaddlePaddle/ernie_vil-2.0-base-zh (the ERNIE 3.0 base zh vocab)",
          {"text_model_config": "ernie-3.0-base-zh"}),
    Entry("efficientnet-lite0-imagenet", IMAGE_TOWER,
          "https://huggingface.co/timm/tf_efficientnet_lite0.in1k/resolve/main/model.safetensors",
          "timm_lite0", ".pdparams", None,
          "timm tf_efficientnet_lite0.in1k (ImageNet-1k, ported from the TF EfficientNet-Lite release)",
          {"image_model": "efficientnet_lite0"}, tensors=247),  # 245 for the tower, 2 for the head
)}


def names(kind: str):
    """The registered names of one kind (key docs and error messages list them)."""
    return sorted(n for n, e in REGISTRY.items() if e.kind == kind)


def home() -> str:
    return os.path.abspath(os.path.expanduser(
        os.environ.get(HOME_ENV) or os.path.join("~", ".cache", "ernievil2")))


def cache_path(entry: Entry) -> str:
    """Where the checked file of `entry` lives (whether or not it is there)."""
    return os.path.join(home(), "pretrained", entry.name + entry.ext)


def download_dir(entry: Entry) -> str:
    return os.path.join(home(), "downloads", entry.name)


def raw_path(entry: Entry) -> str:
    """Where the complete raw download goes (a user without network copies the file here)."""
    return os.path.join(download_dir(entry), posixpath.basename(entry.url))


def url_of(entry: Entry) -> str:
    base = os.environ.get(BASE_ENV)
    if base:
        return f"{base.rstrip('/')}/{entry.name}/{posixpath.basename(entry.url)}"
    return entry.url


def fetch_command(name: str) -> str:
    return f"`ernievil2-download {name}` (or python tools/download.py {name})"


def resolve(value, kind: str, registry=None):
    """A config value -> a local path. An existing path (or anything that is not a registered
    name) is returned as it is; a registered name gives its cached file, or FileNotFoundError
    saying which command fetches it."""
    registry = REGISTRY if registry is None else registry
    if not isinstance(value, str) or value not in registry or os.path.exists(value):
        return value
    entry = registry[value]
    if entry.kind != kind:
        wanted = sorted(n for n, e in registry.items() if e.kind == kind)
        raise ConfigError(f"{value!r} is a {entry.kind} download, not a {kind} one "
                          f"(the {kind} names: {', '.join(wanted)})")
    path = cache_path(entry)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{value} is not downloaded: run {fetch_command(value)}")
    return path


def weights_path(value):
    return resolve(value, WEIGHTS)


def vocab_path(value):
    return resolve(value, VOCAB)


def image_tower_path(value):
    return resolve(value, IMAGE_TOWER)

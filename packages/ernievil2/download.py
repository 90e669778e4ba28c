"""Fetch published weights and vocab by name into the cache: `ernievil2-download NAME [NAME...]`.

    ernievil2-download --list
    ernievil2-download ernie_vil-2.0-base-zh ernie-3.0-base-zh-vocab efficientnet-lite0-imagenet

Each name (ernievil2.pretrained.REGISTRY) is one file. The download goes to a `.part` file that a
later run resumes (HTTP Range); the md5 is checked where the publisher gives one; then the file is
read, converted to the project's layout and checked against the model it is for (names, shapes,
counts), and only then placed atomically in the cache. A file failing a check is deleted. Without
network, the error names the URL and the path to copy the file to by hand.
"""
import argparse
import hashlib
import http.client
import logging
import os
import shutil
import sys
import urllib.error
import urllib.request

from tqdm import tqdm

from . import pretrained
from .fileio import atomic_path

log = logging.getLogger(__name__)

CHUNK = 1 << 20
PART = ".part"


class DownloadError(RuntimeError):
    """A download that failed or a file that was rejected; the message is one line."""


class Interrupted(DownloadError):
    """The transfer stopped part-way; the `.part` file is kept and the next try resumes it."""


# ------------------------------------------------------------------------------------- HTTP
def fetch(url, dest, *, timeout=60, progress=True):
    """Download `url` to `dest`, resuming `dest.part` if a previous try left one.

    The part file is appended to across runs, so it is not written through fileio's atomic
    helpers; it is renamed to `dest` only once the server has sent every byte."""
    part = dest + PART
    have = os.path.getsize(part) if os.path.isfile(part) else 0
    headers = {"User-Agent": "ernievil2-download"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing past what the part holds: it is complete
            os.replace(part, dest)
            return
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"cannot reach {url} ({reason}); offline? Copy that file by hand to "
                            f"{dest} and run the command again") from None
    with resp:
        if have and resp.status != 206:
            have = 0  # the server ignores Range requests: start over
        elif have and not resp.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            os.remove(part)
            raise Interrupted(f"{url}: the server resumed at another offset "
                              f"({resp.headers.get('Content-Range')}); the partial file is dropped, "
                              "run the command again")
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        got = have
        try:
            with open(part, "ab" if have else "wb") as f, tqdm(
                    total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=os.path.basename(dest), disable=None if progress else True) as bar:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
            of = f"{total:,}" if total is not None else "?"
            raise Interrupted(f"{url}: interrupted after {got:,} of {of} bytes "
                              f"({type(e).__name__}); run the command again to resume") from None
    if total is not None and got < total:
        raise Interrupted(f"{url}: the connection closed after {got:,} of {total:,} bytes; "
                          "run the command again to resume")
    os.replace(part, dest)


def md5_of(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------- structural checks
def check_state(state, expected, entry, where):
    """`state` ({name: array}) must have exactly the names and shapes of `expected` ({name:
    shape}), and the entry's tensor and parameter counts where it gives them."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(f"{k} {list(state[k].shape)} vs {list(expected[k])}"
                       for k in set(state) & set(expected) if list(state[k].shape) != list(expected[k]))
    problems = [f"{label} ({len(items)}): {', '.join(items[:10])}"
                for label, items in (("missing", missing), ("unexpected", unexpected),
                                     ("mis-shaped", misshaped)) if items]
    n_params = sum(int(a.size) for a in state.values())
    if entry.tensors is not None and len(state) != entry.tensors:
        problems.append(f"{len(state)} tensors, expected {entry.tensors}")
    if entry.parameters is not None and n_params != entry.parameters:
        problems.append(f"{n_params:,} parameters, expected {entry.parameters:,}")
    if problems:
        raise DownloadError(f"{where}: not the {entry.name} layout: " + "; ".join(problems))


def expected_layout(entry):
    """{name: shape} of the dual encoder the entry is for, built without allocating weights."""
    import paddle

    from .factory import build_dual_encoder
    from .resources import text_config_path

    with paddle.LazyGuard():
        model = build_dual_encoder(entry.model["image_model"],
                                   text_config_path(entry.model["text_model_config"]))
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def _readable(read, path, what):
    try:
        return read(path)
    except Exception as e:  # noqa: BLE001 - whatever the parser raises, the file is not usable
        raise DownloadError(f"{path}: not a readable {what} ({type(e).__name__}: {e})") from None


def convert_ernie_vil(raw, dest, entry):
    """Official or PaddleNLP `.pdparams` -> the official layout without visual.classfy.*."""
    import paddle

    from .checkpoint import DROPPED_PREFIXES, read_state_dict, to_model_layout

    state, layout = to_model_layout(_readable(read_state_dict, raw, "Paddle checkpoint"))
    state = {k: v for k, v in state.items() if not k.startswith(DROPPED_PREFIXES)}
    check_state(state, expected_layout(entry), entry, f"{raw} ({layout} layout)")
    with atomic_path(dest) as tmp:
        paddle.save(state, tmp)


def convert_vocab(raw, dest, entry):
    """A vocab the text tower can use: the official special-token ids, every id an embedding row."""
    from .models.ernie import load_ernie_config
    from .resources import text_config_path
    from .tokenizer import CLS, MASK, PAD, SEP, UNK, load_vocab

    vocab = _readable(load_vocab, raw, "vocab")
    wrong = [f"{tok} at {vocab.get(tok)} (not {i})"
             for i, tok in enumerate((PAD, CLS, SEP, MASK)) if vocab.get(tok) != i]
    if UNK not in vocab:
        wrong.append(f"no {UNK}")
    rows = load_ernie_config(text_config_path(entry.model["text_model_config"]))["vocab_size"]
    if max(vocab.values()) >= rows:
        wrong.append(f"ids up to {max(vocab.values())} but the text tower has {rows} rows")
    if wrong:
        raise DownloadError(f"{raw}: not the {entry.name} vocab: " + "; ".join(wrong))
    with atomic_path(dest) as tmp:
        shutil.copyfile(raw, tmp)


def _read_safetensors(path):
    from safetensors.numpy import load_file

    return load_file(path)


def convert_timm_lite0(raw, dest, entry):
    """timm's tf_efficientnet_lite0 safetensors -> an image-tower checkpoint (`visual.*`, the
    ImageNet head under lite0_timm.HEAD_PREFIX)."""
    import paddle

    from .factory import resolve_image_spec
    from .models.efficientnet import build_efficientnet
    from .models.lite0_timm import from_timm, tower_checkpoint

    tensors = _readable(_read_safetensors, raw, "safetensors file")
    with paddle.LazyGuard():
        model = build_efficientnet(resolve_image_spec(entry.model["image_model"])["name"],
                                   with_classifier=True)
    state = from_timm(tensors, model)
    check_state(state, {k: list(v.shape) for k, v in model.state_dict().items()}, entry, raw)
    with atomic_path(dest) as tmp:
        paddle.save(tower_checkpoint(state), tmp)


CONVERTERS = {"ernie_vil": convert_ernie_vil, "vocab": convert_vocab, "timm_lite0": convert_timm_lite0}


# ------------------------------------------------------------------------------ by name
def download(name, *, registry=None, retries=2, timeout=60, progress=True):
    """Fetch, check and place `name`; returns its cache path (at once if it is there already)."""
    registry = pretrained.REGISTRY if registry is None else registry
    if name not in registry:
        raise DownloadError(f"unknown name {name!r}; known: {', '.join(sorted(registry))}")
    entry = registry[name]
    dest = pretrained.cache_path(entry)
    if os.path.isfile(dest):
        log.info("%s: already downloaded: %s", name, dest)
        return dest
    raw = pretrained.raw_path(entry)
    os.makedirs(os.path.dirname(raw), exist_ok=True)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    url = pretrained.url_of(entry)
    if not os.path.isfile(raw):
        log.info("%s: downloading %s", name, url)
        for attempt in range(retries + 1):
            try:
                fetch(url, raw, timeout=timeout, progress=progress)
                break
            except Interrupted as e:
                if attempt == retries:
                    raise
                log.warning("%s; resuming", str(e).split(";")[0])
    try:
        if entry.md5:
            got = md5_of(raw)
            if got != entry.md5:
                raise DownloadError(f"{raw}: md5 {got}, but {entry.source} publishes {entry.md5} "
                                    "(corrupt or a different file)")
        CONVERTERS[entry.fmt](raw, dest, entry)
    except DownloadError as e:
        os.remove(raw)
        raise DownloadError(f"{e}: rejected and deleted; run the command again to fetch it anew") from None
    os.remove(raw)
    log.info("%s: checked and saved to %s", name, dest)
    return dest


def describe(registry=None):
    """One line per name: status, kind, source."""
    registry = pretrained.REGISTRY if registry is None else registry
    lines = []
    for name, entry in sorted(registry.items()):
        path = pretrained.cache_path(entry)
        status = path if os.path.isfile(path) else "not downloaded"
        lines.append(f"{name}  [{entry.kind}]  {status}\n    {entry.url}  ({entry.source})")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="ernievil2-download", description=__doc__.splitlines()[0],
        epilog=f"Cache: ${pretrained.HOME_ENV} (now {pretrained.home()}); a mirror: "
               f"${pretrained.BASE_ENV} (serving NAME/FILE).")
    ap.add_argument("names", nargs="*", metavar="NAME", help="names to fetch (see --list)")
    ap.add_argument("--list", action="store_true", help="list the names and what is downloaded")
    args = ap.parse_args(argv)
    if args.list or not args.names:
        print(describe())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    status = 0
    for name in args.names:
        try:
            print(f"{name}: {download(name)}")
        except DownloadError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())

"""Export both towers as Paddle Inference models, for deployment and for `execution: inference`.

An export folder holds, per tower, `TOWER.json` (the PIR program) + `TOWER.pdiparams` (weights),
traced by paddle.jit.to_static with a dynamic batch (and, for text, a dynamic length), plus the
vocab, `encoder.json` (what deploy_encoder.py needs: factory.encoder_settings -- image
size/mean/std, tokenizer settings, embedding width -- and where the weights came from) and copies
of deploy_encoder.py and the modules it imports (DEPLOY_FILES), so that the folder embeds on its
own without this repository. Optionally `TOWER.onnx` through paddle2onnx (an optional
dependency: `pip install paddle2onnx onnxruntime`).

`encoder.json` is written last: a folder without it is an unfinished export.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import warnings

import numpy as np
import paddle

from .config import ConfigError
from .deploy_encoder import (EXPORT_FORMAT, FORMAT_VERSION, META_FILE, TOWERS, TowerPredictor,
                             read_export_meta)
from .distributed import barrier, get_rank, get_world_size
from .embed import Towers, input_specs
from .factory import create_model, encoder_settings, image_preprocess_spec
from .fileio import atomic_dir, write_text

log = logging.getLogger("ernievil2.export")

HERE = os.path.dirname(os.path.abspath(__file__))
# Copied into every export so that the folder runs without this repository.
DEPLOY_FILES = ("deploy_encoder.py", "transforms.py", "tokenizer.py", "fileio.py")
VOCAB_NAME = "vocab.txt"
CACHE_ENV = "ERNIEVIL2_EXPORT_CACHE"
ONNX_OPSET = 17


def export_model(model, out_dir, settings, vocab_file, source=None):
    """Trace and save both towers of an ErnieViL2 `model` into `out_dir`; `settings` are the
    preprocessing and tokenizer ones (factory.encoder_settings). Returns encoder.json's content."""
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, META_FILE)
    if os.path.exists(meta_path):
        os.remove(meta_path)  # the folder is unfinished until the new one is written
    model.eval()
    specs = input_specs(settings["image"]["image_size"], settings["text"]["input_dtype"])
    for tower, fn in (("image", model.encode_image), ("text", model.encode_text)):
        static_fn = paddle.jit.to_static(fn, input_spec=[specs[tower]], full_graph=True)
        with warnings.catch_warnings():  # "What you save is a function": saving one is the point
            warnings.filterwarnings("ignore", "What you save is a function")
            paddle.jit.save(static_fn, os.path.join(out_dir, tower))
    shutil.copyfile(vocab_file, os.path.join(out_dir, VOCAB_NAME))
    for name in DEPLOY_FILES:
        shutil.copyfile(os.path.join(HERE, name), os.path.join(out_dir, name))
    meta = {
        "format": EXPORT_FORMAT, "version": FORMAT_VERSION, **settings,
        "paddle_version": paddle.__version__,
        "image": {"model": "image.json", "params": "image.pdiparams", "input": "images",
                  **settings["image"]},
        "text": {"model": "text.json", "params": "text.pdiparams", "input": "input_ids",
                 "vocab": VOCAB_NAME, **settings["text"]},
        "source": source or {},
    }
    _write_meta(out_dir, meta)
    return meta


def _write_meta(out_dir, meta):
    write_text(os.path.join(out_dir, META_FILE), json.dumps(meta, indent=1, ensure_ascii=False))


def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def config_fingerprint(cfg):
    """What the exported weights and programs depend on, hashed: the model keys, the text config's
    content, the checkpoint file (path, size, mtime) or the seed of random weights, the model code,
    Paddle's version and the device kind it is traced on. Computed without building the model,
    so a cache hit skips building it."""
    ckpt = cfg.init_from_params
    if ckpt:
        st = os.stat(ckpt)
        weights = {"checkpoint": os.path.realpath(ckpt), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    else:
        weights = {"random_seed": cfg.seed}
    code = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(HERE, "models", "*.py"))):
        code.update(open(path, "rb").read())
    items = {
        "image_model": cfg.image_model, "image_size": cfg.image_size, "embed_dim": cfg.embed_dim,
        "input_dtype": cfg.input_dtype, "text_model_config": _sha256_file(cfg.text_model_config),
        "weights": weights, "model_code": code.hexdigest(), "paddle": paddle.__version__,
        # a GPU trace may hold GPU-only kernels (e.g. flash attention): one export per device kind
        "device": paddle.device.get_device().split(":")[0],
    }
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:20]


def verify_export(model, export_dir, batch=3, seq_len=9, seed=0):
    """Largest |exported - eager| per tower (and per ONNX tower, when there is one) on random
    inputs: a batch of pixels, and ids of several lengths (row 0 padded after 4 tokens)."""
    meta = read_export_meta(export_dir)
    rng = np.random.default_rng(seed)
    size = meta["image"]["image_size"]
    pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    vocab = model.text_model.word_emb.weight.shape[0]
    ids = rng.integers(5, vocab, (batch, seq_len)).astype(meta["text"]["input_dtype"])
    ids[:, 0] = meta["text"]["cls_token"]
    ids[0, 4:] = meta["text"]["pad_token"]
    inputs = {"image": pixels, "text": ids}
    model.eval()
    with paddle.no_grad():
        eager = {"image": model.encode_image(paddle.to_tensor(pixels)).numpy(),
                 "text": model.encode_text(paddle.to_tensor(ids)).numpy()}
    diffs = {}
    for tower in ("image", "text"):
        pred = TowerPredictor(os.path.join(export_dir, meta[tower]["model"]),
                              os.path.join(export_dir, meta[tower]["params"]))
        diffs[tower] = float(np.abs(pred(inputs[tower]) - eager[tower]).max())
        if "onnx" in meta:
            import onnxruntime as ort
            sess = ort.InferenceSession(os.path.join(export_dir, meta["onnx"][tower]),
                                        providers=["CPUExecutionProvider"])
            out = sess.run(None, {sess.get_inputs()[0].name: inputs[tower]})[0]
            diffs[f"{tower}_onnx"] = float(np.abs(out - eager[tower]).max())
    return diffs


def export_from_config(cfg, out_dir, onnx=False, opset=ONNX_OPSET, verify=False):
    """Build the model of a run config (checkpoint loaded) and export it to `out_dir`; with
    `verify`, record verify_export's differences in encoder.json (`verified_max_abs_diff`)."""
    model = create_model(cfg)
    source = {"fingerprint": config_fingerprint(cfg), "init_from_params": cfg.init_from_params,
              "seed": cfg.seed, "image_model": cfg.image_model,
              "text_model_config": cfg.text_model_config}
    meta = export_model(model, out_dir, encoder_settings(cfg, model.embed_dim), cfg.vocab_file,
                        source=source)
    if onnx:
        meta = export_onnx(out_dir, opset=opset)
    if verify:
        meta["verified_max_abs_diff"] = verify_export(model, out_dir)
        _write_meta(out_dir, meta)
    return meta


def export_onnx(export_dir, opset=ONNX_OPSET):
    """Convert both exported towers to ONNX with paddle2onnx (optional dependency)."""
    try:
        import paddle2onnx
    except ImportError:
        raise RuntimeError("ONNX export needs paddle2onnx, an optional dependency: "
                           "pip install paddle2onnx onnxruntime") from None
    # paddle2onnx's default optimiser (polygraphy) pip-installs packages at run time; onnxoptimizer
    # is its own dependency and needs no network.
    os.environ.setdefault("POLYGRAPHY_AUTOINSTALL_DEPS", "0")
    meta = read_export_meta(export_dir)
    names = {}
    for tower in ("image", "text"):
        out = os.path.join(export_dir, f"{tower}.onnx")
        if os.path.exists(out):
            os.remove(out)
        paddle2onnx.export(os.path.join(export_dir, meta[tower]["model"]),
                           os.path.join(export_dir, meta[tower]["params"]), out,
                           opset_version=opset, optimize_tool="onnxoptimizer")
        if not os.path.isfile(out):  # paddle2onnx logs conversion errors instead of raising
            raise RuntimeError(f"paddle2onnx did not write {out}; see its log above")
        names[tower] = os.path.basename(out)
    meta["onnx"] = {**names, "opset": opset, "paddle2onnx_version": paddle2onnx.__version__}
    _write_meta(export_dir, meta)
    return meta


# ------------------------------------------------------------------ used by execution: inference
def cache_root():
    return os.environ.get(CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "ernievil2", "exports")


def is_complete(export_dir):
    try:
        read_export_meta(export_dir)
        return True
    except ValueError:
        return False


def check_matches_config(meta, cfg, export_dir):
    """An export used for a config must take the inputs the config's pipeline makes."""
    size = image_preprocess_spec(cfg.image_model, cfg.image_size)[0]
    where = os.path.join(export_dir, META_FILE)
    if meta["image"]["image_size"] != size:
        raise ConfigError(f"{where}: image_size {meta['image']['image_size']} but the config's "
                          f"pipeline makes {size}x{size} images; re-export or fix export_dir")
    if meta["text"].get("input_dtype", "int64") != cfg.input_dtype:
        raise ConfigError(f"{where}: text input_dtype {meta['text'].get('input_dtype')} but the "
                          f"config has input_dtype {cfg.input_dtype}")
    made_from = meta.get("source", {}).get("fingerprint")
    if made_from and made_from != config_fingerprint(cfg):
        log.warning("%s was exported from other weights or model settings than this config's "
                    "(init_from_params %r); using it as export_dir says", export_dir,
                    meta.get("source", {}).get("init_from_params"))


def ensure_export(cfg):
    """The export folder `execution: inference` runs: `export_dir` if set (exported there when it
    holds no export yet), else a cache folder named by config_fingerprint(cfg). Rank 0 exports;
    the other processes wait for it."""
    explicit = bool(cfg.export_dir)
    target = cfg.export_dir if explicit else os.path.join(cache_root(), config_fingerprint(cfg))
    if get_rank() == 0:
        if is_complete(target):
            log.info("execution inference: using the export in %s", target)
        elif explicit:
            log.info("execution inference: exporting the model to export_dir %s", target)
            export_from_config(cfg, target)
        else:
            log.info("execution inference: exporting the model to the cache %s (once per model; "
                     "set %s to move the cache)", target, CACHE_ENV)
            with atomic_dir(target) as tmp:  # replaces an unfinished export, if any
                export_from_config(cfg, tmp)
    barrier()
    meta = read_export_meta(target)
    check_matches_config(meta, cfg, target)
    return target, meta


def predictor_towers(cfg, device="cpu", amp="none"):
    """execution inference: the exported towers (see ensure_export) in Paddle Inference
    predictors; the model is only built when the export has to be made."""
    export_dir, meta = ensure_export(cfg)
    # The processes of one machine share its cores; more math threads than cores is slower.
    world = get_world_size()
    local = int(os.environ.get("PADDLE_LOCAL_SIZE", world)) if world > 1 else 1
    threads = max(1, (os.cpu_count() or 1) // local)
    precision = {"none": "fp32", "fp16": "fp16", "bf16": "bf16"}[amp]
    tower = {t: TowerPredictor(os.path.join(export_dir, meta[t]["model"]),
                               os.path.join(export_dir, meta[t]["params"]), device=device,
                               num_threads=threads, precision=precision) for t in TOWERS}
    log.info("predictors on %s (%s, %d math thread(s)) from %s", device,
             "oneDNN" if device == "cpu" else precision, threads, export_dir)
    return Towers(tower["image"], tower["text"], int(meta["embed_dim"]))

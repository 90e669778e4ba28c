"""Export both towers as Paddle Inference models, for deployment and for `execution: inference`.

An export folder holds, per tower, `TOWER.json` (the PIR program) + `TOWER.pdiparams` (weights),
traced by paddle.jit.to_static with a dynamic batch (and, for text, a dynamic length), plus the
vocab, `encoder.json` (what deploy_encoder.py needs: factory.encoder_settings -- image
size/mean/std, tokenizer settings, embedding width -- and where the weights came from) and copies
of deploy_encoder.py and the modules it imports (DEPLOY_FILES), so that the folder embeds on its
own without this repository. Optionally `TOWER.onnx` through paddle2onnx (an optional
dependency: `pip install paddle2onnx onnxruntime`).

`encoder.json` is written last: a folder without it is an unfinished export. Every export is
verified against the eager model by default (verify_export); one that disagrees is not left in
place: a failed Paddle export is removed whole, a failed ONNX conversion loses its ONNX files and
their encoder.json entry (the verified Paddle export stays).
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
from .deploy_encoder import (EXPORT_FORMAT, FORMAT_VERSION, META_FILE, TOWERS, ExportError,
                             TowerPredictor, read_export_meta)
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
# Largest |exported - eager| a verified export may show on the L2-normalised embeddings. fp32 towers
# agree to ~1e-6; a broken conversion is off by 1e-2 and more.
VERIFY_TOLERANCE = 1e-4


def export_model(model, out_dir, settings, vocab_file, source=None):
    """Trace and save both towers of an ErnieViL2 `model` into `out_dir`; `settings` are the
    preprocessing and tokenizer ones (factory.encoder_settings). Returns encoder.json's content."""
    os.makedirs(out_dir, exist_ok=True)
    _remove_files(out_dir, [META_FILE])  # the folder is unfinished until the new one is written
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


def _remove_files(folder, names):
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.remove(path)


def remove_export(out_dir):
    """Delete what export_model and export_onnx write (encoder.json first: from then on the folder
    is no export); the folder itself goes too when nothing else is left in it."""
    written = [f"{t}{ext}" for t in TOWERS for ext in (".json", ".pdiparams", ".onnx")]
    _remove_files(out_dir, [META_FILE, *written, VOCAB_NAME, *DEPLOY_FILES])
    if os.path.isdir(out_dir) and not os.listdir(out_dir):
        os.rmdir(out_dir)


def remove_onnx(out_dir):
    """Delete the ONNX files and their encoder.json entry; the Paddle export stays usable."""
    meta = read_export_meta(out_dir)
    meta.pop("onnx", None)
    _write_meta(out_dir, meta)
    _remove_files(out_dir, [f"{t}.onnx" for t in TOWERS])


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


def verify_export(model, export_dir, formats=("paddle", "onnx"), batch=3, seq_len=9, seed=0):
    """Largest |exported - eager| per tower (`image`, `text`) and per ONNX tower (`image_onnx`,
    `text_onnx`, when the export has them) on random inputs: a batch of pixels, and ids of
    several lengths (row 0 padded after 4 tokens). `formats` picks which of the two to run."""
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
    # A GPU trace may hold GPU-only kernels: run it where it was traced.
    device = "gpu" if paddle.device.get_device().startswith("gpu") else "cpu"
    diffs = {}
    for tower in TOWERS:
        if "paddle" in formats:
            pred = TowerPredictor(os.path.join(export_dir, meta[tower]["model"]),
                                  os.path.join(export_dir, meta[tower]["params"]), device=device)
            diffs[tower] = float(np.abs(pred(inputs[tower]) - eager[tower]).max())
        if "onnx" in formats and "onnx" in meta:
            try:
                import onnxruntime as ort
            except ImportError:
                raise ExportError("verifying the ONNX export needs onnxruntime: "
                                  "pip install onnxruntime (or export with --no-verify)") from None
            sess = ort.InferenceSession(os.path.join(export_dir, meta["onnx"][tower]),
                                        providers=["CPUExecutionProvider"])
            out = sess.run(None, {sess.get_inputs()[0].name: inputs[tower]})[0]
            diffs[f"{tower}_onnx"] = float(np.abs(out - eager[tower]).max())
    return diffs


def export_from_config(cfg, out_dir, onnx=False, opset=ONNX_OPSET, verify=True):
    """Build the model of a run config (checkpoint loaded) and export it to `out_dir`, checked by
    verify_export unless `verify` is false: the differences go into encoder.json
    (`verified_max_abs_diff`). Nothing failed is left in place: an error or a difference above
    VERIFY_TOLERANCE removes the whole export when it is the Paddle one (ExportError), the ONNX
    files and their encoder.json entry when it is the ONNX conversion."""
    if cfg.visual_concepts == "embed":
        raise ConfigError("visual_concepts: embed: the exported image tower would need each image's "
                          "tag ids, which the export format has no input for; embed with run_infer.sh "
                          "(execution: eager or to_static)")
    model = create_model(cfg)
    source = {"fingerprint": config_fingerprint(cfg), "init_from_params": cfg.init_from_params,
              "seed": cfg.seed, "image_model": cfg.image_model,
              "text_model_config": cfg.text_model_config}
    try:
        meta = export_model(model, out_dir, encoder_settings(cfg, model.embed_dim), cfg.vocab_file,
                            source=source)
        if verify:
            meta = _record_verified(model, out_dir, "paddle", "the export was removed")
    except BaseException:
        remove_export(out_dir)
        raise
    if onnx:
        try:
            meta = export_onnx(out_dir, opset=opset)
            if verify:
                meta = _record_verified(model, out_dir, "onnx", "the ONNX files were removed, "
                                        "the verified Paddle export is kept")
        except BaseException:
            remove_onnx(out_dir)
            raise
    return meta


def _record_verified(model, out_dir, fmt, removed):
    diffs = verify_export(model, out_dir, formats=(fmt,))
    failed = {t: d for t, d in diffs.items() if not d <= VERIFY_TOLERANCE}  # NaN fails too
    if failed:
        what = "ONNX towers" if fmt == "onnx" else "exported towers"
        raise ExportError(f"{out_dir}: the {what} differ from the eager model ({_diff_text(failed)}; "
                          f"tolerance {VERIFY_TOLERANCE:g}): {removed}")
    meta = read_export_meta(out_dir)
    meta["verified_max_abs_diff"] = {**meta.get("verified_max_abs_diff", {}), **diffs}
    _write_meta(out_dir, meta)
    return meta


def _diff_text(diffs):
    return ", ".join(f"{t} max |diff| {d:.3g}" for t, d in diffs.items())


def export_onnx(export_dir, opset=ONNX_OPSET):
    """Convert both exported towers to ONNX with paddle2onnx (optional dependency)."""
    try:
        import paddle2onnx
    except ImportError:
        raise ExportError("ONNX export needs paddle2onnx, an optional dependency: "
                          "pip install paddle2onnx onnxruntime") from None
    # paddle2onnx's default optimiser (polygraphy) pip-installs packages at run time; onnxoptimizer
    # is its own dependency and needs no network.
    os.environ.setdefault("POLYGRAPHY_AUTOINSTALL_DEPS", "0")
    meta = read_export_meta(export_dir)
    names = {}
    for tower in TOWERS:
        out = os.path.join(export_dir, f"{tower}.onnx")
        if os.path.exists(out):
            os.remove(out)
        paddle2onnx.export(os.path.join(export_dir, meta[tower]["model"]),
                           os.path.join(export_dir, meta[tower]["params"]), out,
                           opset_version=opset, optimize_tool="onnxoptimizer")
        if not os.path.isfile(out):  # paddle2onnx logs conversion errors instead of raising
            raise ExportError(f"paddle2onnx did not write {out}; see its log above")
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

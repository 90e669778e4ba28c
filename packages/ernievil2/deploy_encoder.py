"""Embed images and texts with an exported ERNIE-ViL 2.0 model: Paddle Inference, no training code.

An export folder (written by `tools/export_model.py`, see export.py) holds one Paddle Inference
model per tower (`image.json` + `image.pdiparams`, `text.json` + `text.pdiparams`), the vocab, and
`encoder.json` (preprocessing and tokenizer settings). This module needs numpy, cv2, paddle's
`paddle.inference` and three small modules of this package without heavy dependencies,
transforms.py, tokenizer.py and fileio.py. The export copies them all into the folder, so it also
runs on its own, with no checkout of this repository:

    python EXPORT_DIR/deploy_encoder.py EXPORT_DIR --text "一只狗" --image dog.jpg

    from deploy_encoder import DeployEncoder          # or: from ernievil2.deploy_encoder import ...
    enc = DeployEncoder("EXPORT_DIR")                 # CPU: oneDNN; GPU when there is one
    sims = enc.encode_texts(["一只狗"]) @ enc.encode_images(["dog.jpg"]).T

Embeddings are L2-normalised, so a dot product is the cosine similarity. On CPU fp32 the outputs
match the eager model within 1e-5 (tests/test_export.py).
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

try:  # inside the package
    from .fileio import atomic_path
    from .tokenizer import ErnieTokenizer
    from .transforms import decode_image, make_eval_transform
except ImportError:  # a copied export folder: the modules sit beside this file
    from fileio import atomic_path  # type: ignore[no-redef]
    from tokenizer import ErnieTokenizer  # type: ignore[no-redef]
    from transforms import decode_image, make_eval_transform  # type: ignore[no-redef]

META_FILE = "encoder.json"
EXPORT_FORMAT = "ernievil2-export"
FORMAT_VERSION = 1
TOWERS = ("image", "text")
PRECISIONS = ("fp32", "fp16", "bf16")


class ExportError(ValueError):
    """An export folder that cannot be used; the message names the file and the problem."""


def read_export_meta(export_dir) -> dict:
    """encoder.json of an export folder, checked: format, version, and every tower's files."""
    export_dir = os.fspath(export_dir)
    path = os.path.join(export_dir, META_FILE)
    if not os.path.isfile(path):
        raise ExportError(f"{path}: not found; {export_dir} is not a (complete) export "
                          "(make one with tools/export_model.py)")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    if meta.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path}: format is {meta.get('format')!r}, expected {EXPORT_FORMAT!r}")
    if meta.get("version") != FORMAT_VERSION:
        raise ExportError(f"{path}: version {meta.get('version')!r}; this reader knows {FORMAT_VERSION}")
    for tower in TOWERS:
        spec = meta.get(tower)
        if not isinstance(spec, dict):
            raise ExportError(f"{path}: missing the {tower!r} section")
        for key in ("model", "params"):
            f = os.path.join(export_dir, str(spec.get(key, "")))
            if not spec.get(key) or not os.path.isfile(f):
                raise ExportError(f"{path}: {tower}.{key} file {f} is missing")
    return meta


def _has_gpu() -> bool:
    import paddle
    return paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


class TowerPredictor:
    """One exported tower in a Paddle Inference predictor: numpy batch in, numpy embeddings out.

    CPU: oneDNN kernels (much faster than the plain CPU kernels, and than eager on AMD CPUs, where
    MKL's default kernels are slow), `num_threads` math threads (default: all cores; give
    cores / processes when several processes share a machine). `precision="bf16"` runs oneDNN
    bfloat16 (CPUs with AVX512-BF16 only). GPU: `precision` fp32, fp16 or bf16.
    """

    def __init__(self, model_file, params_file, device="cpu", num_threads=None, precision="fp32",
                 gpu_id=0, gpu_memory_mb=256, onednn=True, onednn_cache_capacity=1):
        import paddle.inference as pi

        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        config = pi.Config(os.fspath(model_file), os.fspath(params_file))
        if device == "gpu":
            kind = {"fp32": pi.PrecisionType.Float32, "fp16": pi.PrecisionType.Half,
                    "bf16": pi.PrecisionType.Bfloat16}[precision]
            config.enable_use_gpu(gpu_memory_mb, gpu_id, kind)
        elif device == "cpu":
            config.disable_gpu()
            config.set_cpu_math_library_num_threads(int(num_threads or os.cpu_count() or 1))
            if precision == "fp16":
                raise ValueError("precision fp16 needs a GPU; on CPU use fp32 (or bf16 where the "
                                 "CPU has AVX512-BF16)")
            if onednn or precision == "bf16":
                config.enable_mkldnn()
                # oneDNN caches kernels and re-laid-out weights per input shape (a tower's worth
                # of memory for each text length seen); keep only the last few shapes.
                config.set_mkldnn_cache_capacity(int(onednn_cache_capacity))
            else:
                config.disable_mkldnn()
            if precision == "bf16":
                config.enable_mkldnn_bfloat16()
        else:
            raise ValueError(f"device must be cpu or gpu, got {device!r}")
        config.disable_glog_info()
        self.device, self.precision = device, precision
        self.predictor = pi.create_predictor(config)
        self.input_name = self.predictor.get_input_names()[0]
        self.output_name = self.predictor.get_output_names()[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        handle = self.predictor.get_input_handle(self.input_name)
        x = np.ascontiguousarray(x)
        handle.reshape(list(x.shape))
        handle.copy_from_cpu(x)
        self.predictor.run()
        out = self.predictor.get_output_handle(self.output_name).copy_to_cpu()
        return out.astype(np.float32, copy=False)


class DeployEncoder:
    """Both towers of an export folder, with the preprocessing and tokenizer they were made for."""

    def __init__(self, export_dir, device="auto", num_threads=None, precision="fp32",
                 text_padding="longest", onednn=True):
        self.export_dir = os.fspath(export_dir)
        self.meta = read_export_meta(self.export_dir)
        if device == "auto":
            device = "gpu" if _has_gpu() else "cpu"
        self.device = device
        files = {t: (os.path.join(self.export_dir, self.meta[t]["model"]),
                     os.path.join(self.export_dir, self.meta[t]["params"])) for t in TOWERS}
        kw = dict(device=device, num_threads=num_threads, precision=precision, onednn=onednn)
        self.image_tower = TowerPredictor(*files["image"], **kw)
        self.text_tower = TowerPredictor(*files["text"], **kw)
        img, txt = self.meta["image"], self.meta["text"]
        self.embed_dim = int(self.meta["embed_dim"])
        self.image_size = int(img["image_size"])
        self.transform = make_eval_transform(self.image_size, mean=img["mean"], std=img["std"])
        self.input_dtype = np.dtype(txt.get("input_dtype", "int64"))
        self.tokenizer = ErnieTokenizer.from_file(
            os.path.join(self.export_dir, txt["vocab"]), max_seq_len=txt["max_seq_len"],
            pad_token=txt["pad_token"], cls_token=txt["cls_token"], sep_token=txt["sep_token"],
            mask_token=txt["mask_token"])
        if text_padding not in ("longest", "max_length"):
            raise ValueError(f"text_padding must be longest or max_length, got {text_padding!r}")
        self.text_padding = text_padding

    # -- raw tensors ---------------------------------------------------------------------------
    def run_image(self, pixels: np.ndarray) -> np.ndarray:
        """float32 [B, 3, S, S] preprocessed pixels -> [B, D] normalised embeddings."""
        pixels = np.asarray(pixels, dtype=np.float32)
        if pixels.ndim != 4 or pixels.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(f"pixels must be [B, 3, {self.image_size}, {self.image_size}], "
                             f"got {list(pixels.shape)}")
        return self.image_tower(pixels)

    def run_text(self, input_ids: np.ndarray) -> np.ndarray:
        """int [B, L] token ids (0 = padding) -> [B, D] normalised embeddings."""
        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be [B, L], got {list(input_ids.shape)}")
        return self.text_tower(input_ids.astype(self.input_dtype, copy=False))

    # -- raw inputs ----------------------------------------------------------------------------
    def preprocess_image(self, image) -> np.ndarray:
        """A path, image file bytes, or an RGB uint8 HxWx3 array -> float32 [3, S, S]."""
        if isinstance(image, (str, os.PathLike)):
            with open(image, "rb") as f:
                image = f.read()
        if isinstance(image, (bytes, bytearray, memoryview)):
            image = decode_image(bytes(image))
        return self.transform(image)

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        return self.tokenizer.batch_encode(list(texts), padding=self.text_padding)

    def encode_images(self, images: Sequence, batch_size: int = 16) -> np.ndarray:
        out = [self.run_image(np.stack([self.preprocess_image(im) for im in images[i:i + batch_size]]))
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        texts = list(texts)
        out = [self.run_text(self.tokenize(texts[i:i + batch_size]))
               for i in range(0, len(texts), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="Embed texts and images with an exported ERNIE-ViL 2.0 "
                                "model and print their cosine similarities.")
    p.add_argument("export_dir", help="folder written by tools/export_model.py")
    p.add_argument("--text", nargs="*", default=[], help="texts to embed")
    p.add_argument("--image", nargs="*", default=[], help="image files to embed")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    p.add_argument("--threads", type=int, default=None, help="CPU math threads (default: all cores)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--save", default=None, help="also write the embeddings to this .npz")
    args = p.parse_args(argv)
    enc = DeployEncoder(args.export_dir, device=args.device, num_threads=args.threads,
                        precision=args.precision)
    text = enc.encode_texts(args.text)
    image = enc.encode_images(args.image)
    print(f"{len(text)} text(s), {len(image)} image(s), dim {enc.embed_dim}, device {enc.device}")
    if len(text) and len(image):
        sims = text @ image.T
        for t, row in zip(args.text, sims):
            print("\t".join(f"{s:.4f}" for s in row) + f"\t{t}")
    if args.save:
        save = args.save if args.save.endswith(".npz") else args.save + ".npz"  # as np.savez names it
        with atomic_path(save) as tmp:
            np.savez(tmp, text=text, image=image)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

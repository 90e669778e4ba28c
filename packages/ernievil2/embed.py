"""The one embedding loop, shared by inference (run_infer) and validation during training.

A tower pair is two callables, numpy batch in, float32 [B, D] L2-normalised embeddings out:
the model run eagerly or compiled (`model_towers`, here), or exported towers in Paddle Inference
predictors (export.predictor_towers); `build_towers` picks one by the config's `execution`.
`embed` feeds them a BatchLoader's batches, running the image tower once per distinct image.
"""
from typing import Callable, NamedTuple

import numpy as np
import paddle
from paddle.static import InputSpec
from tqdm import tqdm

from .data.pipeline import BatchLoader
from .data.tsv import SkipReport, count_lines
from .factory import (create_model_and_transforms, create_tokenizer, create_transforms,
                      image_preprocess_spec, text_encoder)
from .precision import autocast


class Towers(NamedTuple):
    """The two encoders as numpy batch -> float32 [B, embed_dim] normalised embeddings."""
    encode_image: Callable[[np.ndarray], np.ndarray]
    encode_text: Callable[[np.ndarray], np.ndarray]
    embed_dim: int


class Embeddings(NamedTuple):
    """Rows in file order; `line_numbers` are 1-based physical lines of the TSV."""
    text: np.ndarray  # float32 [N, D]
    image: np.ndarray  # float32 [N, D]
    line_numbers: np.ndarray  # int64 [N]
    image_ids: list
    skip_report: SkipReport


def input_specs(image_size, input_dtype="int64"):
    """Each tower's input for tracing, dynamic in the batch size and the text length (without
    them every new text length would be traced again)."""
    return {"image": InputSpec([None, 3, image_size, image_size], "float32", "images"),
            "text": InputSpec([None, None], input_dtype, "input_ids")}


def model_towers(model, amp="none", to_static=False, image_size=None, input_dtype="int64"):
    """The towers of a dual encoder, eager, or with `to_static` one compiled program per tower
    (input_specs), compiled here, at start-up, not in the first batch."""
    encode_image, encode_text = model.encode_image, model.encode_text
    if to_static:
        specs = input_specs(image_size, input_dtype)
        encode_image = paddle.jit.to_static(encode_image, input_spec=[specs["image"]], full_graph=True)
        encode_text = paddle.jit.to_static(encode_text, input_spec=[specs["text"]], full_graph=True)

    def numpy_in_out(fn):
        def run(x):
            with paddle.no_grad(), autocast(amp):
                return fn(paddle.to_tensor(x)).astype("float32").numpy()
        return run

    towers = Towers(numpy_in_out(encode_image), numpy_in_out(encode_text), model.embed_dim)
    if to_static:
        towers.encode_image(np.zeros([1, 3, image_size, image_size], np.float32))
        towers.encode_text(np.ones([1, 2], input_dtype))
    return towers


def build_towers(cfg, device="cpu", amp="none"):
    """(towers, eval image transform, text encoder) for the config's `execution`."""
    if cfg.execution == "inference":
        from .export import predictor_towers  # export imports this module
        _, transform = create_transforms(cfg)
        tokenizer = create_tokenizer(cfg)
        towers = predictor_towers(cfg, device, amp)
    else:
        model, _, transform, tokenizer = create_model_and_transforms(cfg)
        towers = model_towers(model, amp, to_static=cfg.execution == "to_static",
                              image_size=image_preprocess_spec(cfg.image_model, cfg.image_size)[0],
                              input_dtype=cfg.input_dtype)
    return towers, transform, text_encoder(cfg, tokenizer)


class DistinctImages:
    """The image tower run once per distinct image (data.pipeline.image_key): multi-caption files (AIC-ICC,
    Flickr: 5 captions a photo) repeat each image on consecutive lines. An embedding is the same
    row for every line of its image; the cache holds one [D] row per distinct image seen, as
    many as the output's rows at most."""

    def __init__(self, encode_image: Callable[[np.ndarray], np.ndarray]):
        self.encode_image = encode_image
        self.seen = {}  # image key -> its embedding row
        self.images_embedded = 0

    def __call__(self, images: np.ndarray, keys: list) -> np.ndarray:
        new = {}  # key -> index of its first row in this batch, for keys not seen before
        for i, key in enumerate(keys):
            if key not in self.seen and key not in new:
                new[key] = i
        if new:
            rows = self.encode_image(images[list(new.values())])
            self.seen.update(zip(new, rows))
            self.images_embedded += len(new)
        return np.stack([self.seen[key] for key in keys])


def embed(towers: Towers, loader: BatchLoader, progress=False, desc="embed") -> Embeddings:
    """Both embeddings of every line the loader yields (its rank's share of the file); each
    distinct image of the share goes through the image tower once.

    The progress bar counts lines of the whole file, up to the last line embedded: a rank's
    share of an image-sharded file is only known once it has been read."""
    encode_image = DistinctImages(towers.encode_image)
    texts, images, lines, image_ids = [], [], [], []
    # closed on errors too, so an error line starts on a line of its own
    with tqdm(total=count_lines(loader.path) if progress else None, unit="lines", desc=desc,
              disable=not progress, dynamic_ncols=True) as bar:
        for batch in loader:
            images.append(encode_image(batch.images, batch.image_keys))
            texts.append(towers.encode_text(batch.input_ids))
            lines.append(batch.line_numbers)
            image_ids.extend(batch.image_ids)
            bar.update(int(batch.line_numbers[-1]) - bar.n)
        if progress:
            bar.update(bar.total - bar.n)  # the lines after this rank's last one were read too

    def rows(parts):
        return np.concatenate(parts) if parts else np.zeros((0, towers.embed_dim), np.float32)
    return Embeddings(rows(texts), rows(images),
                      np.concatenate(lines) if lines else np.zeros(0, np.int64), image_ids,
                      loader.skip_report)

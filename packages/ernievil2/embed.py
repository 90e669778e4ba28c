"""The one embedding loop, shared by inference (run_infer) and validation during training.

A tower pair is two callables, numpy batch in, float32 [B, D] L2-normalised embeddings out:
the model run eagerly or compiled (`model_towers`, here), or exported towers in Paddle Inference
predictors (export.predictor_towers); `build_towers` picks one by the config's `execution`.
`embed` feeds them a BatchLoader's batches, running the image tower once per distinct image.
"""
from typing import Callable, NamedTuple, Optional

import numpy as np
import paddle
from paddle.static import InputSpec
from tqdm import tqdm

from .data.pipeline import BatchLoader
from .config import ConfigError
from .data.tsv import SkipReport, count_lines
from .factory import (create_model_and_transforms, create_tokenizer, create_transforms,
                      image_preprocess_spec, text_encoder)
from .precision import autocast
from .tagging import image_tags_for


class Towers(NamedTuple):
    """The two encoders as numpy batch -> float32 [B, embed_dim] normalised embeddings. With
    `image_tags` (a model with visual concepts) encode_image also takes the tag ids it gives for
    a data.pipeline Batch."""
    encode_image: Callable[..., np.ndarray]
    encode_text: Callable[[np.ndarray], np.ndarray]
    embed_dim: int
    image_tags: Optional[Callable[..., np.ndarray]] = None


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


def model_towers(model, amp="none", to_static=False, image_size=None, input_dtype="int64",
                 image_tags=None):
    """The towers of a dual encoder, eager, or with `to_static` one compiled program per tower
    (input_specs), compiled here, at start-up, not in the first batch. A model with visual
    concepts needs `image_tags`: Batch -> tag ids (tagging.ImageConcepts)."""
    tagged = getattr(model, "uses_tags", False)  # any object with the two encode_* methods works
    if tagged and image_tags is None:
        raise ValueError("this model embeds visual concepts: its image tower needs image_tags")
    encode_image, encode_text = model.encode_image, model.encode_text
    if to_static:
        specs = input_specs(image_size, input_dtype)
        image_spec = [specs["image"]] + ([InputSpec([None, None], "int64", "tag_ids")] if tagged else [])
        encode_image = paddle.jit.to_static(encode_image, input_spec=image_spec, full_graph=True)
        encode_text = paddle.jit.to_static(encode_text, input_spec=[specs["text"]], full_graph=True)

    def numpy_in_out(fn):
        def run(*x):
            with paddle.no_grad(), autocast(amp):
                return fn(*map(paddle.to_tensor, x)).astype("float32").numpy()
        return run

    towers = Towers(numpy_in_out(encode_image), numpy_in_out(encode_text), model.embed_dim,
                    image_tags if tagged else None)
    if to_static:
        towers.encode_image(np.zeros([1, 3, image_size, image_size], np.float32),
                            *([np.ones([1, 2], np.int64)] if tagged else []))
        towers.encode_text(np.ones([1, 2], input_dtype))
    return towers


def build_towers(cfg, device="cpu", amp="none", tagged_file=None):
    """(towers, eval image transform, text encoder) for the config's `execution`. With
    visual_concepts: embed the image tower also takes each line's tags (tagging.image_tags_for
    on `tagged_file`, the TSV being embedded); a caller with no such file cannot run it."""
    if cfg.visual_concepts == "embed" and tagged_file is None:
        raise ConfigError("visual_concepts: embed models need each image's tags, which only "
                          "run_infer.sh (a TSV) gives so far; this command cannot use them")
    if cfg.visual_concepts == "embed" and cfg.execution == "inference":
        raise ConfigError("visual_concepts: embed runs with execution: eager or to_static; the "
                          "exported towers (execution: inference, tools/export_model.py) take no tags")
    if cfg.execution == "inference":
        from .export import predictor_towers  # export imports this module
        _, transform = create_transforms(cfg)
        tokenizer = create_tokenizer(cfg)
        towers = predictor_towers(cfg, device, amp)
    else:
        model, _, transform, tokenizer = create_model_and_transforms(cfg)
        image_tags = (image_tags_for(cfg, tagged_file, tokenizer)
                      if cfg.visual_concepts == "embed" else None)
        towers = model_towers(model, amp, to_static=cfg.execution == "to_static",
                              image_size=image_preprocess_spec(cfg.image_model, cfg.image_size)[0],
                              input_dtype=cfg.input_dtype, image_tags=image_tags)
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

    def __call__(self, images: np.ndarray, keys: list, *inputs: np.ndarray) -> np.ndarray:
        """inputs: further per-row inputs of the image tower (visual concepts' tag ids)."""
        new = {}  # key -> index of its first row in this batch, for keys not seen before
        for i, key in enumerate(keys):
            if key not in self.seen and key not in new:
                new[key] = i
        if new:
            first = list(new.values())
            rows = self.encode_image(images[first], *(x[first] for x in inputs))
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
            tags = () if towers.image_tags is None else (towers.image_tags(batch),)
            # with visual concepts an embedding depends on the line's tags (a 4th column) too
            keys = (batch.image_keys if not tags else
                    [(key, row.tobytes()) for key, row in zip(batch.image_keys, tags[0])])
            images.append(encode_image(batch.images, keys, *tags))
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

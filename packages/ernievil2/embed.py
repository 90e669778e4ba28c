"""The one embedding loop, shared by inference (run_infer) and validation during training.

A tower pair is two callables, numpy batch in, float32 [B, D] L2-normalised embeddings out:
the model run eagerly or compiled (`model_towers`, here), or exported towers in Paddle Inference
predictors (export.predictor_towers). `embed` feeds them a BatchLoader's batches.
"""
from typing import Callable, NamedTuple, Optional

import numpy as np
import paddle
from paddle.static import InputSpec
from tqdm import tqdm

from .data.pipeline import BatchLoader
from .data.tsv import SkipReport
from .precision import autocast


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


def embed(towers: Towers, loader: BatchLoader, progress=False, desc="embed") -> Embeddings:
    """Both embeddings of every line the loader yields (its rank's share of the file)."""
    texts, images, lines, image_ids = [], [], [], []
    # closed on errors too, so an error line starts on a line of its own
    with tqdm(total=loader.total_lines_for_rank if progress else None, unit="lines", desc=desc,
              disable=not progress, dynamic_ncols=True) as bar:
        for batch in loader:
            tags = () if towers.image_tags is None else (towers.image_tags(batch),)
            images.append(towers.encode_image(batch.images, *tags))
            texts.append(towers.encode_text(batch.input_ids))
            lines.append(batch.line_numbers)
            image_ids.extend(batch.image_ids)
            bar.update(len(batch))
        bar.update(loader.skip_report.count)  # skipped lines were read too

    def rows(parts):
        return np.concatenate(parts) if parts else np.zeros((0, towers.embed_dim), np.float32)
    return Embeddings(rows(texts), rows(images),
                      np.concatenate(lines) if lines else np.zeros(0, np.int64), image_ids,
                      loader.skip_report)

"""Search an index folder: text to image, image to image, and text to captions (image-to-text
search over the stored captions), with the model the index was built with."""
from __future__ import annotations

import os
import pathlib
from typing import NamedTuple

import numpy as np

from ..factory import as_config
from . import store, vectors
from .encoder import Encoder
from .store import QueryError

MAX_QUERY_CHARS = 1000  # the tokenizer keeps max_text_seqlen tokens; longer input is only cost
MAX_IMAGE_BYTES = 20 << 20  # an uploaded query image; decode_image bounds its pixels as well
MAX_K = 1000


class Hit(NamedTuple):
    rank: int  # 1 = best
    score: float  # cosine similarity
    row: int  # the image's row in the index
    image_id: str
    caption: str | None  # the matched caption (text_to_text), else the image's first caption
    thumbnail: str  # relative to the index folder, e.g. "thumbs/000012.jpg"


class Searcher:
    """An opened index: its embeddings (memory-mapped), ids, captions, vector index and model."""

    def __init__(self, index_dir, manifest, encoder: Encoder):
        self.index_dir = pathlib.Path(index_dir).resolve()
        self.manifest = manifest
        self.encoder = encoder
        dim = manifest["embed_dim"]
        if encoder.embed_dim != dim:
            raise store.IndexFolderError(f"{self.index_dir / store.MANIFEST}: embed_dim {dim}, "
                                         f"but the model embeds into {encoder.embed_dim}")
        images = store.read_json(self.index_dir / store.IMAGES)
        captions = store.read_json(self.index_dir / store.CAPTIONS)
        self.image_ids = images["ids"]
        self.caption_texts, self.caption_rows = captions["texts"], captions["rows"]
        self.image_embeddings = store.open_rows(self.index_dir / store.IMAGE_EMB, dim)
        self.caption_embeddings = store.open_rows(self.index_dir / store.CAPTION_EMB, dim)
        if not len(self.image_embeddings) == len(self.image_ids) == manifest["images"]:
            raise store.IndexFolderError(f"{self.index_dir}: {len(self.image_embeddings)} image "
                                         f"embeddings, {len(self.image_ids)} ids, manifest says "
                                         f"{manifest['images']}: the folder is damaged")
        self.first_caption = {}
        for text, row in zip(self.caption_texts, self.caption_rows):
            self.first_caption.setdefault(row, text)
        settings = manifest["vector_index"]
        if settings["type"] == "flat":
            self.image_index = vectors.build(self.image_embeddings, settings)
        else:
            self.image_index = vectors.load(self.index_dir / store.VECTOR_INDEX, settings)
        self.caption_index = vectors.build(self.caption_embeddings, {"type": "flat"})

    @classmethod
    def open(cls, index_dir, config=None, encoder=None) -> "Searcher":
        """Open `index_dir` with the model of `config` (default: the config the index was built
        with); IndexFolderError when that model is not the index's. `encoder` replaces the
        config's towers (tests)."""
        manifest = store.read_manifest(index_dir)
        stored = store.read_json(os.path.join(index_dir, store.CONFIG))
        cfg = as_config(config if config is not None else stored)
        store.check_fingerprint(manifest, cfg, index_dir,
                                "the config it was built with (its files changed since)"
                                if config is None else f"config {config}"
                                if isinstance(config, (str, os.PathLike)) else "the config given")
        return cls(index_dir, manifest, encoder or Encoder.from_config(cfg))

    def __len__(self) -> int:
        return len(self.image_ids)

    # ------------------------------------------------------------------------------- queries
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """float32 [n, D] normalised text embeddings; QueryError for an empty or too long text."""
        for text in texts:
            _check_text(text)
        return self.encoder.texts(list(texts))

    def encode_image_bytes(self, image_bytes: bytes) -> np.ndarray:
        """float32 [1, D] normalised embedding of an image file's bytes."""
        if not isinstance(image_bytes, (bytes, bytearray)) or not image_bytes:
            raise QueryError("query image: empty")
        if len(image_bytes) > MAX_IMAGE_BYTES:
            raise QueryError(f"query image: {len(image_bytes)} bytes, more than the limit of "
                             f"{MAX_IMAGE_BYTES} ({MAX_IMAGE_BYTES >> 20} MiB)")
        try:
            pixels, _ = self.encoder.prepare(bytes(image_bytes))
        except ValueError as e:  # not an image, or over the pixel limit (a bomb)
            raise QueryError(f"query image: {e}") from None
        return self.encoder.pixels(pixels[None])

    def text_to_image(self, query: str, k: int = 10) -> list[Hit]:
        return self._image_hits(self.encode_texts([query]), k)

    def image_to_image(self, image_bytes: bytes, k: int = 10) -> list[Hit]:
        return self._image_hits(self.encode_image_bytes(image_bytes), k)

    def text_to_text(self, query: str, k: int = 10) -> list[Hit]:
        """The captions nearest to the query (each hit is a caption and its image)."""
        if not self.caption_texts:
            raise QueryError(f"{self.index_dir} holds no captions (it was built from images "
                             "without captions): search the images instead")
        scores, found = vectors.search(self.caption_index, self.encode_texts([query]), _check_k(k))
        return [self._hit(rank, score, self.caption_rows[c], self.caption_texts[c])
                for rank, (score, c) in enumerate(_valid(scores[0], found[0]), start=1)]

    def thumbnail_file(self, row: int) -> pathlib.Path:
        """The thumbnail of image `row`; only rows of this index, so only files inside it."""
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)) or not 0 <= row < len(self):
            raise QueryError(f"no image row {row!r} in this index (0..{len(self) - 1})")
        path = (self.index_dir / store.thumbnail_name(int(row))).resolve()
        if not path.is_relative_to(self.index_dir):  # e.g. thumbs/ made a link elsewhere
            raise QueryError(f"thumbnail of row {row} is outside the index folder")
        return path

    # ------------------------------------------------------------------------------- helpers
    def _image_hits(self, query: np.ndarray, k: int) -> list[Hit]:
        scores, found = vectors.search(self.image_index, query, _check_k(k))
        return [self._hit(rank, score, row, self.first_caption.get(row))
                for rank, (score, row) in enumerate(_valid(scores[0], found[0]), start=1)]

    def _hit(self, rank, score, row, caption) -> Hit:
        row = int(row)
        return Hit(rank, float(score), row, self.image_ids[row], caption, store.thumbnail_name(row))


def _valid(scores, rows):
    """(score, row) pairs; faiss marks missing results (an approximate index's empty cells) -1."""
    return [(s, r) for s, r in zip(scores, rows) if r >= 0]


def _check_text(text):
    if not isinstance(text, str) or not text.strip():
        raise QueryError("query text: empty")
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(f"query text: {len(text)} characters, more than the limit of "
                         f"{MAX_QUERY_CHARS}")


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
        raise QueryError(f"k must be an int in 1..{MAX_K}, got {k!r}")
    return int(k)

"""ERNIE-ViL 2.0 in PaddlePaddle: the library (towers, tokenizer, transforms, readers, losses,
checkpoint layouts, retrieval metrics). The scripts at the repository root only call into it."""

__version__ = "0.1.0"

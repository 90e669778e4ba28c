"""ERNIE-ViL 2.0 in PaddlePaddle: the library (towers, tokenizer, transforms, readers, losses,
checkpoint layouts, retrieval metrics). The scripts at the repository root only call into it."""

__version__ = "0.1.0"

import warnings

# Paddle warns about a missing C++ compiler cache on every import; it concerns building custom
# operators, which this project never does.
warnings.filterwarnings("ignore", message="No ccache found")

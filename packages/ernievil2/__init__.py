"""ERNIE-ViL 2.0 in PaddlePaddle: the library (towers, tokenizer, transforms, readers, losses,
checkpoint layouts, retrieval metrics). The commands (ernievil2-infer, ernievil2-train,
ernievil2-eval; run_infer.sh, run_train.sh, eval_retri.py) only call into it.

    import ernievil2
    model, train_tf, eval_tf, tokenizer = ernievil2.create_model_and_transforms(
        "ernie_vil_base", vocab_file="vocab.txt", init_from_params="model.pdparams")

The names below are imported on first use, so `import ernievil2` does not load paddle.
"""

__version__ = "0.1.0"

import warnings

from .lazy import lazy_exports

# Paddle warns about a missing C++ compiler cache on every import; it concerns building custom
# operators, which this project never does.
warnings.filterwarnings("ignore", message="No ccache found")

_EXPORTS = {
    "create_model_and_transforms": "factory",
    "create_model": "factory",
    "create_tokenizer": "factory",
    "create_transforms": "factory",
    "decode_image": "transforms",
    "load_checkpoint": "checkpoint",
    "ErnieTokenizer": "tokenizer",
    "read_embeddings": "embeddings",
    "shipped_run_configs": "resources",
    "shipped_text_configs": "resources",
    "ConfigError": "config",
    "DataError": "data.tsv",
    "CheckpointError": "checkpoint",
    "VocabError": "tokenizer",
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

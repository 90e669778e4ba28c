"""The inference and model keys: the official `ernie_vil_base.yaml` keys with their official
meaning, plus the project's own. run_infer.sh accepts these; run_train.sh accepts these and the
training keys (`ernievil2.train.keys`)."""
from .config import Key, is_bool, is_int, is_str, one_of, opt_int
from .resources import text_config_path

OFFICIAL_KEYS = {
    "input_dtype": Key("int64", one_of("int64", "int32"), "int64 or int32", "dtype of the token ids"),
    "device": Key("gpu", is_str, "gpu or cpu", "gpu (falls back to CPU, with a warning, where there is none); anything else = CPU"),
    "infer_batch_size": Key(10, is_int(1), "a positive int", "lines per batch and process"),
    "max_text_seqlen": Key(48, is_int(3), "an int >= 3", "text length in tokens, [CLS] and [SEP] included"),
    "vocab_file": Key("./packages/ernie_base_3.0/vocab.txt", is_str, "a path", "vocab: `token\\tid` lines or one token a line"),
    "text_model_config": Key("ernie-3.0-base-zh", is_str, "a path or a shipped name", "ERNIE json config of the text tower: a path, or a shipped name (ernie-3.0-base-zh, ernie-3.0-large-zh, ernie-2.0-base-en, ernie-2.0-large-en, ernie-demo-tiny, ernie-embed-mean)", coerce=text_config_path),
    "test_file": Key("", is_str, "a path", "TSV to embed: text \\t image_id \\t base64 image"),
    "output_file": Key("./test_out/cross_modal_embeddings.out", is_str, "a path", "embeddings output"),
    "init_from_params": Key("", is_str, "a path or empty", "checkpoint (official or PaddleNLP layout); empty = random weights"),
    "pad_token": Key(0, is_int(0), "an int", "id of [PAD]"),
    "cls_token": Key(1, is_int(0), "an int", "id of [CLS]"),
    "sep_token": Key(2, is_int(0), "an int", "id of [SEP]"),
    "mask_token": Key(3, is_int(0), "an int", "id of [MASK]"),
    "unk_token": Key(17963, is_int(0), "an int", "accepted for compatibility; unused (the official value is wrong: [UNK] is taken from the vocab)"),
}

PROJECT_KEYS = {
    "image_model": Key("vit_b16", lambda v: isinstance(v, (str, dict)), "a tower name or mapping",
                       "image tower: vit_b16, vit_l14, efficientnet_b5, efficientnet_l2, efficientnet_lite0, or a mapping"),
    "image_size": Key(None, opt_int, "null or a positive int", "input resolution; null = the tower's own"),
    "embed_dim": Key(None, opt_int, "null or a positive int", "joint space width; null = the text tower's width (no projection)"),
    "text_padding": Key("longest", one_of("longest", "max_length"), "longest or max_length",
                        "pad each batch to its longest text (same [CLS] output, faster) or always to max_text_seqlen (official)"),
    "num_workers": Key(2, is_int(0), "an int >= 0", "image decode/preprocess worker threads per process (0 = inline)"),
    "prefetch": Key(4, is_int(1), "a positive int", "batches prepared ahead (bounded queue)"),
    "skip_bad_lines": Key(False, is_bool, "true or false", "skip bad input lines and report them, instead of stopping"),
    "amp": Key("none", one_of("none", "fp16", "bf16"), "none, fp16 or bf16", "mixed precision (GPU only; untested on CPU-only CI)"),
    "execution": Key("eager", one_of("eager", "to_static", "inference"), "eager, to_static or inference",
                     "eager; compiled with paddle.jit.to_static; or inference: the exported towers in "
                     "Paddle Inference predictors (oneDNN on CPU), the fastest on CPU"),
    "export_dir": Key("", is_str, "a path or empty",
                      "execution inference: the export to run (made there if it holds none); "
                      "empty = a cache folder per model (~/.cache/ernievil2/exports, or $ERNIEVIL2_EXPORT_CACHE)"),
    "write_sidecar": Key(True, is_bool, "true or false", "also write OUTPUT.npz, which eval_retri.py reads faster"),
    "log_dir": Key("./log", is_str, "a path", "run logs (and the launcher's logs under log_dir/launch)"),
    "seed": Key(0, is_int(0), "an int >= 0", "random seed (random weights, augmentation, shuffling)"),
}

INFER_KEYS = {**OFFICIAL_KEYS, **PROJECT_KEYS}

"""The key tables of the run config, one per command; each entry point composes its schema from
them (run_infer.sh: INFER_KEYS; run_train.sh: INFER_KEYS + TRAIN_KEYS), so one YAML file can drive
both commands. INFER_KEYS are the official `ernie_vil_base.yaml` keys with their official meaning
plus the project's own (model, reader, execution); TRAIN_KEYS are training's. The library knows
the training keys only as names to leave alone: a run config given to the factory may hold them."""
from .config import Key, is_bool, is_int, is_num, is_str, num_key, one_of, opt_int
from .pretrained import IMAGE_TOWER, VOCAB, WEIGHTS, image_tower_path, names, vocab_path, weights_path
from .resources import text_config_path

OFFICIAL_KEYS = {
    "input_dtype": Key("int64", one_of("int64", "int32"), "int64 or int32", "dtype of the token ids"),
    "device": Key("gpu", is_str, "gpu or cpu", "gpu (falls back to CPU, with a warning, where there is none); anything else = CPU"),
    "infer_batch_size": Key(10, is_int(1), "a positive int", "lines per batch and process"),
    "max_text_seqlen": Key(48, is_int(3), "an int >= 3", "text length in tokens, [CLS] and [SEP] included"),
    "vocab_file": Key("./packages/ernie_base_3.0/vocab.txt", is_str, "a path or a download name", f"vocab: `token\\tid` lines or one token a line; or a name fetched by `ernievil2-download NAME` ({', '.join(names(VOCAB))}); training also takes `auto`: a vocab of the training captions and tags, written to output_dir/vocab.txt (what the final infer.yaml names)", coerce=vocab_path),
    "text_model_config": Key("ernie-3.0-base-zh", is_str, "a path or a shipped name", "ERNIE json config of the text tower: a path, or a shipped name (ernie-3.0-base-zh, ernie-3.0-large-zh, ernie-2.0-base-en, ernie-2.0-large-en, ernie-demo-tiny, ernie-embed-mean)", coerce=text_config_path),
    "test_file": Key("", is_str, "a path", "TSV to embed: text \\t image_id \\t base64 image"),
    "output_file": Key("./test_out/cross_modal_embeddings.out", is_str, "a path", "embeddings output"),
    "init_from_params": Key("", is_str, "a path, a download name or empty", f"checkpoint (official or PaddleNLP layout), or a name fetched by `ernievil2-download NAME` ({', '.join(names(WEIGHTS))}); empty = random weights", coerce=weights_path),
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
    "max_image_pixels": Key(89_478_485, opt_int, "null or a positive int",  # transforms.DEFAULT_MAX_IMAGE_PIXELS
                            "images with more pixels are bad lines (decompression bombs; read from the file header "
                            "before decoding); null = no limit of ours (OpenCV's own, 2^30 pixels, still applies)"),
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
    "tag_classes": Key("", is_str, "a path or empty",
                       "when the tags view needs tags and train_file has none, the trainer tags each image "
                       "with its top-3 ImageNet classes (the Lite0 classifier: init_image_tower or the "
                       "efficientnet-lite0-imagenet download): their names from this class_index/wnid/"
                       "label_en/label_zh TSV; empty = the class numbers as words (c0 .. c999); with "
                       "visual_concepts: embed, inference names the tag_classifier's classes the same way"),
    "tag_lang": Key("zh", one_of("zh", "en"), "zh or en", "language of the tag_classes names"),
    "tag_classifier": Key("", is_str, "a path or empty",
                          "visual_concepts: embed: the ImageNet Lite0 classifier whose top-3 classes of "
                          "each image are its tags where the TSV has no 4th column (the reference .npz, "
                          "or a tower checkpoint with its head); empty = the efficientnet-lite0-imagenet "
                          "download"),
    "visual_concepts": Key("none", one_of("none", "embed"), "none or embed",
                           "embed: the image's object tags (the Lite0 classifier on the image, or the "
                           "TSV's 4th column), embedded with the text tower's word table, join the image "
                           "tower (ViT: at [CLS]; EfficientNet: a zero-initialised map onto the pooled "
                           "feature) (ViCHA)"),
}

INFER_KEYS = {**OFFICIAL_KEYS, **PROJECT_KEYS}

INFER_COMMAND = "run_infer.sh (ernievil2-infer)"
TRAIN_COMMAND = "run_train.sh (ernievil2-train)"

VIEWS = ("image", "image_aug", "text", "text_aug", "tags")


def _is_pairs(v):
    return (isinstance(v, list) and len(v) > 0 and all(
        isinstance(p, list) and len(p) == 3 and p[0] in VIEWS and p[1] in VIEWS and p[0] != p[1]
        and isinstance(p[2], (int, float)) and p[2] >= 0 for p in v))


SOURCE_KINDS = ("text", "label")


def _is_sources(v):
    return isinstance(v, list) and all(
        isinstance(p, list) and len(p) in (2, 3) and isinstance(p[0], str) and p[0].strip()
        and isinstance(p[1], (int, float)) and not isinstance(p[1], bool) and p[1] > 0
        and (len(p) == 2 or p[2] in SOURCE_KINDS) for p in v)


def _opt_num(v):
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0)


TRAIN_KEYS = {
    "train_file": Key("", is_str, "a path", "training TSV: text \\t image_id \\t base64 [\\t tags [\\t label]]"),
    "train_files": Key([], _is_sources, "a list of [path, weight] or [path, weight, text|label]",
                       "more training files mixed with train_file's rows (weight 1.0; train_file may be empty): "
                       "each row of a global batch comes from a file with probability weight / sum of weights; "
                       "kind label = image-label rows (column 5: a class index or a class name of "
                       "label_classes), whose text is a prompt of the class; label rows are UniCL positives "
                       "when they share a class, text rows when they share an image id of one file"),
    "label_classes": Key("", is_str, "a path or empty",
                         "class names of label rows: a class_index/wnid/label_en/label_zh TSV "
                         "(imagenet_classes.tsv) or one name a line"),
    "label_lang": Key("zh", one_of("zh", "en"), "zh or en", "language of the label_classes names and built-in templates"),
    "label_templates": Key("", is_str, "a path or empty",
                           "prompt templates of label rows, one a line with one {}; empty = the built-in "
                           "label_lang set (zeroshot.py); each step draws one per row"),
    "val_file": Key("", is_str, "a path or empty", "validation TSV scored every val_every steps (both protocols)"),
    "val_zeroshot_file": Key("", is_str, "a path or empty",
                             "labelled images classified zero-shot at every validation (top-1 / top-5 in the log "
                             "and train.jsonl): a TSV whose 5th column is the class (index or name), or a folder of "
                             "class sub-folders; needs val_zeroshot_classes"),
    "val_zeroshot_classes": Key("", is_str, "a path or empty",
                                "class names of val_zeroshot_file: imagenet_classes.tsv (val_zeroshot_lang picks "
                                "the column) or one name a line"),
    "val_zeroshot_lang": Key("zh", one_of("zh", "en"), "zh or en",
                             "class-name column and built-in prompt templates of the zero-shot validation"),
    "val_zeroshot_templates": Key("", is_str, "a path or empty",
                                  "prompt templates, one a line with one {} for the class name; empty = the "
                                  "built-in val_zeroshot_lang set"),
    "output_dir": Key("./output", is_str, "a path", "checkpoints, train.jsonl and the final model"),
    "batch_size": Key(32, is_int(1), "a positive int", "GLOBAL batch (all processes), the number of in-batch negatives"),
    "micro_batch_size": Key(0, is_int(0), "an int >= 0", "rows per encoder call on each process (GradCache); 0 = the whole local batch"),
    "max_steps": Key(1000, is_int(1), "a positive int", "optimizer steps"),
    "lr": num_key(5e-4, "peak learning rate"),
    "image_lr": Key(None, _opt_num, "null or a number", "image tower learning rate; null = lr", coerce=float),
    "text_lr": Key(None, _opt_num, "null or a number", "text tower learning rate; null = lr", coerce=float),
    "weight_decay": num_key(0.1, "AdamW decay (never on norms, biases, embeddings, temperatures)"),
    "warmup_steps": Key(100, is_int(0), "an int >= 0", "linear warmup, then cosine to min_lr_ratio * lr"),
    "min_lr_ratio": num_key(0.0, "final lr / peak lr"),
    "adam_beta1": num_key(0.9, "AdamW beta1"),
    "adam_beta2": num_key(0.98, "AdamW beta2"),
    "adam_eps": num_key(1e-6, "AdamW epsilon"),
    "ema_decay": num_key(0.0, "moving average of the trained weights, used for validation "
                         "and the final model (e.g. 0.99); 0 = off", hi=1, expect="a number in [0, 1)"),
    "grad_clip_norm": num_key(0.0, "global gradient norm clip; 0 = off"),
    "freeze_image_tower": Key(False, is_bool, "true or false", "keep the image tower fixed (LiT)"),
    "freeze_text_tower": Key(False, is_bool, "true or false", "keep the text tower fixed"),
    "image_feature_cache": Key(0, is_int(0), "an int >= 0",
                               "with freeze_image_tower: run the frozen tower once on K fixed views of each "
                               "training image (view 0 eval transform, 1..K-1 augmented) and train from "
                               "those features; 0 = run the tower every step"),
    "image_feature_cache_dir": Key("", is_str, "a path or empty",
                                   "keep the image_feature_cache array here, reused by runs with the "
                                   "same file, tower, K, seed and transforms"),
    "image_feature_cache_seed": Key(None, lambda v: v is None or is_int()(v), "null or an int", "seed of the cached views' augmentations; null = seed "
                                    "(fix it to share one cache across runs of different seeds)"),
    "freeze_bn_stats": Key("auto", one_of("auto", True, False), "auto, true or false",
                           "BatchNorm on running statistics; auto = when GradCache is on (BN cannot be exact there)"),
    "views": Key([["image", "text", 1.0]], _is_pairs, "a list of [view_a, view_b, weight]",
                 "contrasted view pairs; views: image, image_aug, text, text_aug, tags"),
    "targets": Key("clip", one_of("clip", "unicl"), "clip or unicl",
                   "unicl: rows sharing an image id (or label) are positives (soft targets)"),
    "unicl_key": Key("image_id", one_of("image_id", "label"), "image_id or label", "what makes two image-text rows the same class for unicl "
                      "(image-label rows of train_files always go by their class)"),
    "init_logit_scale": Key(None, lambda v: v is None or is_num(0)(v), "null or a number >= 0",
                            "log of the initial logit scale of every configured view pair; null = 2.65926 "
                            "(official) where a temperature starts at random, the checkpoint's value where "
                            "init_from_params has one; a number overrides the checkpoint", coerce=float),
    "max_logit_scale": num_key(4.6052, "clamp of every temperature (log 100)"),
    "text_aug": Key("mask", one_of("mask", "other_caption"), "mask or other_caption",
                    "second textual view: a masked/dropped copy, or another caption of the same image"),
    "text_mask_prob": num_key(0.15, "share of tokens masked or dropped in the text_aug view"),
    "augment": Key(True, is_bool, "true or false", "train-time image augmentation (else the eval transform)"),
    "init_image_tower": Key("", is_str, "a path, a download name or empty", f"an image-tower checkpoint (visual.* names), e.g. converted Lite0, or a name fetched by `ernievil2-download NAME` ({', '.join(names(IMAGE_TOWER))}); "
                            "with init_from_params too, the image tower comes from this one (a warning says so), the rest from init_from_params", coerce=image_tower_path),
    "grad_checkpointing": Key(False, is_bool, "true or false", "activation recompute in the towers"),
    "save_every": Key(500, is_int(1), "a positive int", "checkpoint every N steps (atomic)"),
    "save_every_minutes": num_key(0.0, "also checkpoint when N minutes have passed since the last one; 0 = off"),
    "keep_last": Key(2, is_int(1), "a positive int", "checkpoints kept (plus the best on validation)"),
    "val_every": Key(500, is_int(1), "a positive int", "validate every N steps (and at the end)"),
    "val_batch_size": Key(64, is_int(1), "a positive int", "batch for validation embedding"),
    "log_every": Key(10, is_int(1), "a positive int", "console/JSON-lines log every N steps"),
    "resume": Key("", is_str, "empty, auto or a path", "auto = latest checkpoint in output_dir (an unreadable one falls back to the one before); "
                  "needs the checkpoint's model and batch keys and process count"),
    "overwrite": Key(False, is_bool, "true or false", "empty a used output_dir first (else a new run refuses one that is not empty)"),
    "hierarchical_layers": Key(1, is_int(1), "a positive int",
                               "the image-text loss also on the pooled features of the K-1 layers below "
                               "the top of both towers, each through its own training-only projection and "
                               "temperature (ViCHA); 1 = the top only"),
    "hierarchical_weights": Key(None, lambda v: v is None or (isinstance(v, list) and all(
        is_num(0)(w) for w in v)), "null or a list of numbers >= 0",
        "loss weights of the levels 1..K-1 below the top (hierarchical_layers - 1 numbers); null = "
        "the image-text pair's weight for each"),
    "embed_file": Key("", is_str, "empty, train or a path",
                      "after training, embed this TSV with the final model into "
                      "output_dir/final/embeddings.out (+ .npz); train = train_file; empty = none"),
}


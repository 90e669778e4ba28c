"""What the trainer derives from the data before it builds anything, and the embeddings after:
the own-data path (configs/own_photos_lite0.yaml) from an image folder's TSV to a model and its
embeddings with no other tool.

Before training (`prepare`, every process; one process per folder writes (distributed.
folder_writer: rank 0, or one per machine when output_dir is not shared), the others wait):
- object tags, when the `tags` view is configured and no line of train_file has a 4th column:
  each image's top-3 ImageNet classes by the Lite0 classifier (init_image_tower when it is the
  Lite0 checkpoint with its head, else the efficientnet-lite0-imagenet download), written once
  into a tagged copy output_dir/train_tags.tsv; a stamp beside it (the source file's size and
  time, the classifier, the class names) decides whether a later run may reuse it;
- `vocab_file: auto`: the vocab of the captions and tags of every training file and of every
  prompt the label rows can get (corpus_vocab.py), fitted to the text tower's vocab_size, in
  output_dir/vocab.txt; a resumed run must find the same one.
After training (`embed_after_training`): embed_file embedded by the inference engine with the
final model (output_dir/final/infer.yaml) into output_dir/final/embeddings.out.
"""
import json
import logging
import os

from ..config import Config, ConfigError
from ..corpus_vocab import fitted_vocab, tsv_texts
from ..data.tsv import iter_records
from ..distributed import barrier, folder_writer
from ..fileio import write_text
from ..models.ernie import load_ernie_config
from ..pretrained import REGISTRY, cache_path, fetch_command
from ..tokenizer import VocabError, load_vocab, write_vocab
from .data import label_prompts, sources_of

log = logging.getLogger("ernievil2.train")

AUTO_VOCAB = "auto"
LITE0_DOWNLOAD = "efficientnet-lite0-imagenet"
TAG_TOPK = 3  # the Flickr8k recipe's tags per image
EMBED_TRAIN_FILE = "train"  # embed_file value meaning train_file


def prepare(cfg):
    """cfg with train_file / vocab_file / embed_file as the trainer should use them."""
    sources = sources_of(cfg)
    for source in sources:
        if not os.path.isfile(source.path):
            key = "train_file" if source.path == cfg.train_file else "train_files"
            raise FileNotFoundError(f"{key} not found: {source.path or '(empty)'}")
    os.makedirs(cfg.output_dir, exist_ok=True)
    out = Config(cfg)
    embed_source = sources[0].path  # embed_file: train means the user's file, not the tagged copy
    needs_tags = "tags" in views_of(cfg) or cfg.visual_concepts == "embed"
    if needs_tags and cfg.train_file and not has_tags(cfg.train_file):
        out["train_file"] = tagged_train_file(out)
    if cfg.embed_file == EMBED_TRAIN_FILE:
        out["embed_file"] = embed_source
    elif cfg.embed_file and not os.path.isfile(cfg.embed_file):  # known now, not after training
        raise FileNotFoundError(f"embed_file not found: {cfg.embed_file}")
    if cfg.vocab_file == AUTO_VOCAB:
        out["vocab_file"] = auto_vocab(out)
    return out


# ------------------------------------------------------------------------------------------ tags
def views_of(cfg):
    return {v for pair in cfg.views for v in pair[:2]}


def has_tags(path):
    """Whether any line of the TSV has object tags (column 4)."""
    return any(record.tags for record in iter_records(path))


def classifier_path(cfg):
    """The Lite0 checkpoint with its ImageNet head the tags come from."""
    import paddle

    from ..models.lite0_timm import HEAD_PREFIX

    if cfg.image_model == "efficientnet_lite0" and cfg.init_image_tower:
        names = paddle.load(cfg.init_image_tower, return_numpy=True)
        if any(k.startswith(HEAD_PREFIX) for k in names):
            return os.path.abspath(cfg.init_image_tower)
    path = cache_path(REGISTRY[LITE0_DOWNLOAD])
    if not os.path.isfile(path):
        raise ConfigError(f"{cfg.train_file}: the tags view needs object tags (column 4) and the "
                          f"file has none; they are computed with the ImageNet Lite0 classifier, "
                          f"which is not downloaded: run {fetch_command(LITE0_DOWNLOAD)}")
    return path


def tagger_of(classifier, classes, lang):
    from ..models.lite0_timm import classifier_from_checkpoint
    from ..tags import ObjectTagger, load_class_names

    model = classifier_from_checkpoint(classifier)
    names = (load_class_names(classes, lang) if classes
             else [f"c{i}" for i in range(model.num_classes)])
    return ObjectTagger(model, names, topk=TAG_TOPK)


def tagged_train_file(cfg):
    """output_dir/train_tags.tsv: train_file with computed tags (made once, then reused)."""
    from ..tagging import extract_tags

    tagged = os.path.join(cfg.output_dir, "train_tags.tsv")
    stamp_path = tagged + ".json"
    if folder_writer(cfg.output_dir):
        source = os.stat(cfg.train_file)
        classifier = classifier_path(cfg)
        classes = os.path.abspath(cfg.tag_classes) if cfg.tag_classes else ""
        stamp = {"source": os.path.abspath(cfg.train_file), "size": source.st_size,
                 "mtime_ns": source.st_mtime_ns, "classifier": classifier, "classes": classes,
                 "lang": cfg.tag_lang if classes else "", "topk": TAG_TOPK}
        if os.path.isfile(tagged) and read_stamp(stamp_path) == stamp:
            log.info("object tags: %s (computed by an earlier run)", tagged)
        else:
            log.info("object tags: %s has none; computing the top-%d ImageNet classes of each "
                     "image with %s%s", cfg.train_file, TAG_TOPK, classifier,
                     f" ({cfg.tag_lang} names from {classes})" if classes else
                     " (class numbers as tags: set tag_classes for names)")
            n, images = extract_tags(cfg.train_file, tagged,
                                     tagger_of(classifier, classes, cfg.tag_lang),
                                     num_workers=max(1, cfg.num_workers))
            write_text(stamp_path, json.dumps(stamp, indent=1) + "\n")
            log.info("object tags: %d lines, %d images -> %s", n, images, tagged)
    barrier()
    return tagged


def read_stamp(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------- vocab
def auto_vocab(cfg):
    """output_dir/vocab.txt built from the training captions and tags."""
    path = os.path.join(cfg.output_dir, "vocab.txt")
    if folder_writer(cfg.output_dir):
        rows = load_ernie_config(cfg.text_model_config)["vocab_size"]
        sources = sources_of(cfg)
        files = [s.path for s in sources]
        try:
            tokens, min_freq = fitted_vocab(tsv_texts(files) + prompt_texts(cfg, sources),
                                            max_size=rows)
        except VocabError as e:
            raise ConfigError(f"vocab_file: auto: {', '.join(files)}: {e} (vocab_size of "
                              f"{cfg.text_model_config})") from None
        if cfg.resume and os.path.isfile(path) and load_vocab(path) != {t: i for i, t in enumerate(tokens)}:
            raise ConfigError(f"vocab_file: auto: the captions of {cfg.train_file} give another "
                              f"vocab than {path}, which the checkpoint to resume was trained "
                              f"with (resume with vocab_file={path})")
        write_vocab(tokens, path)
        log.info("vocab_file auto: %d tokens from the captions%s of %s -> %s%s", len(tokens),
                 " and tags" if "tags" in views_of(cfg) else "",
                 ", ".join(files), path,
                 f" (words seen fewer than {min_freq} times left out to fit the text tower's "
                 f"vocab_size {rows})" if min_freq > 1 else "")
    barrier()
    return path


def prompt_texts(cfg, sources):
    """Every prompt the label rows can get: each template with each class their files use."""
    prompts = label_prompts(cfg, sources)
    if prompts is None:
        return []
    used = {prompts.resolve(r.label, s.path, r.line_no)
            for s in sources if s.kind == "label" for r in iter_records(s.path)}
    return [t.format(prompts.class_names[c]) for c in sorted(used) for t in prompts.templates]


# ------------------------------------------------------------------------------------ embeddings
def embed_after_training(cfg):
    """Embed embed_file with the final model (every process takes its share, as run_infer.sh)."""
    if not cfg.embed_file:
        return
    from ..cli import load_infer_config
    from ..engine.infer import run as run_inference

    final = os.path.join(cfg.output_dir, "final")
    out = os.path.join(final, "embeddings.out")
    infer_cfg = load_infer_config(os.path.join(final, "infer.yaml"),
                                  [("test_file", cfg.embed_file), ("output_file", out)], quiet=True)
    log.info("embedding %s with the final model -> %s", cfg.embed_file, out)
    run_inference(infer_cfg)

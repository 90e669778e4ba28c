"""Validation during training: embed a TSV with the current model and score it in both protocols
with the same metric code as eval_retri.py, with ties counted for the query (optimistic, the
official) and against it (pessimistic: collapsed embeddings score low); and, with
val_zeroshot_file, zero-shot classification top-1 / top-5 with the code of eval_zeroshot.py."""
import contextlib
import os
from typing import Callable, List, NamedTuple

from .. import zeroshot as zs
from ..config import ConfigError
from ..data.pipeline import BatchLoader
from ..embed import embed, model_towers
from ..metrics.retrieval import multi_caption_recall_both, official_recall_both, percent_table
from ..transforms import decode_image


def validate(model, path, transform, encode_texts, batch_size=64, num_workers=2, image_tags=None):
    """{'official', 'multi_caption', 'official_pessimistic', 'multi_caption_pessimistic'}: rows
    name -> {R@1, R@5, R@10, meanRecall} in %. image_tags: for a model with visual concepts
    (tagging.image_tags_for)."""
    loader = BatchLoader(path, batch_size, image_transform=transform, text_encoder=encode_texts,
                         decode_image=decode_image, num_workers=num_workers)
    with evaluating(model):
        emb = embed(model_towers(model, image_tags=image_tags), loader)
    both = {"official": official_recall_both(emb.text, emb.image),
            "multi_caption": multi_caption_recall_both(emb.text, emb.image, emb.image_ids)}
    out = {name: percent_table(rows["optimistic"]) for name, rows in both.items()}
    out.update({f"{name}_pessimistic": percent_table(rows["pessimistic"]) for name, rows in both.items()})
    return out


@contextlib.contextmanager
def evaluating(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


class ZeroShotTask(NamedTuple):
    """val_zeroshot_file's images with the class names and prompt templates, read once."""
    images: str
    names: List[str]
    templates: List[str]
    resolve: Callable


def zeroshot_task(cfg):
    """The run's ZeroShotTask, or None without val_zeroshot_file; its files are checked now, not
    at the first validation."""
    if not cfg.val_zeroshot_file:
        return None
    if not cfg.val_zeroshot_classes:
        raise ConfigError("val_zeroshot_file needs val_zeroshot_classes (the class-name file)")
    for key in ("val_zeroshot_file", "val_zeroshot_classes", "val_zeroshot_templates"):
        if cfg[key] and not os.path.exists(cfg[key]):
            raise FileNotFoundError(f"{key} not found: {cfg[key]}")
    names = zs.load_classes(cfg.val_zeroshot_classes, cfg.val_zeroshot_lang)
    templates = (zs.load_templates(cfg.val_zeroshot_templates) if cfg.val_zeroshot_templates
                 else zs.TEMPLATES[cfg.val_zeroshot_lang])
    return ZeroShotTask(cfg.val_zeroshot_file, names, templates, zs.LabelResolver(names))


def validate_zeroshot(model, task, transform, encode_texts, batch_size=64, num_workers=2):
    """{'top1', 'top5', 'chance_top1', 'chance_top5'} in %, with 'images' and 'classes': the
    class embeddings of the current model (computed once), then every image of the task."""
    batches = zs.labelled_batches(task.images, task.resolve, batch_size, transform, decode_image,
                                  num_workers=num_workers)
    with evaluating(model):
        towers = model_towers(model)
        class_emb = zs.class_embeddings(lambda t: towers.encode_text(encode_texts(t)), task.names,
                                        task.templates, batch_size)
        result = zs.classify(towers.encode_image, class_emb, batches)
    summary = zs.summarize(result.predictions, result.labels, task.names)
    return {**{k: 100 * summary[k] for k in ("top1", "top5", "chance_top1", "chance_top5")},
            "images": summary["images"], "classes": summary["classes"]}

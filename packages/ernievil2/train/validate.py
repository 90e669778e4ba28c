"""Validation during training: embed a TSV with the current model and score it in both protocols
with the same metric code as eval_retri.py, with ties counted for the query (optimistic, the
official) and against it (pessimistic: collapsed embeddings score low)."""
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
    was_training = model.training
    model.eval()
    try:
        emb = embed(model_towers(model, image_tags=image_tags), loader)
    finally:
        if was_training:
            model.train()
    both = {"official": official_recall_both(emb.text, emb.image),
            "multi_caption": multi_caption_recall_both(emb.text, emb.image, emb.image_ids)}
    out = {name: percent_table(rows["optimistic"]) for name, rows in both.items()}
    out.update({f"{name}_pessimistic": percent_table(rows["pessimistic"]) for name, rows in both.items()})
    return out

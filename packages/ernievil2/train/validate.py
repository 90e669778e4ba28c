"""Validation during training: embed a TSV with the current model and score it in both protocols
with the same metric code as eval_retri.py."""
from ..data.pipeline import BatchLoader
from ..embed import embed, model_towers
from ..metrics.retrieval import multi_caption_recall, official_recall, percent_table
from ..transforms import decode_image


def validate(model, path, transform, encode_texts, batch_size=64, num_workers=2):
    """{'official': rows, 'multi_caption': rows}: rows name -> {R@1, R@5, R@10, meanRecall} in %."""
    loader = BatchLoader(path, batch_size, image_transform=transform, text_encoder=encode_texts,
                         decode_image=decode_image, num_workers=num_workers)
    was_training = model.training
    model.eval()
    try:
        emb = embed(model_towers(model), loader)
    finally:
        if was_training:
            model.train()
    return {"official": percent_table(official_recall(emb.text, emb.image)),
            "multi_caption": percent_table(multi_caption_recall(emb.text, emb.image, emb.image_ids))}

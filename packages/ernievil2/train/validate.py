"""Validation during training: embed a TSV with the current model and score it in both protocols
with the same metric code as eval_retri.py."""
import numpy as np
import paddle

from ..data.pipeline import BatchLoader
from ..transforms import decode_image


@paddle.no_grad()
def embed_file(model, path, transform, encode_texts, batch_size=64, num_workers=2):
    texts, images, image_ids = [], [], []
    loader = BatchLoader(path, batch_size, image_transform=transform, text_encoder=encode_texts,
                         decode_image=decode_image, num_workers=num_workers)
    for batch in loader:
        images.append(model.encode_image(paddle.to_tensor(batch.images)).numpy())
        texts.append(model.encode_text(paddle.to_tensor(batch.input_ids)).numpy())
        image_ids.extend(batch.image_ids)
    return np.concatenate(texts), np.concatenate(images), image_ids


def validate(model, path, transform, encode_texts, batch_size=64, num_workers=2):
    """{'official': rows, 'multi_caption': rows}: rows name -> {R@1, R@5, R@10, meanRecall} in %."""
    from ..metrics.retrieval import multi_caption_recall, official_recall, percent_table

    was_training = model.training
    model.eval()
    try:
        text, image, ids = embed_file(model, path, transform, encode_texts, batch_size, num_workers)
    finally:
        if was_training:
            model.train()
    return {"official": percent_table(official_recall(text, image)),
            "multi_caption": percent_table(multi_caption_recall(text, image, ids))}

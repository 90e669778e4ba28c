"""The ERNIE-ViL 2.0 dual encoder: an image tower and a text tower mapped to one space.

Where the towers' widths equal `embed_dim` (the official base model) there is no projection, so
official checkpoints load unchanged; otherwise a bias-free Linear maps each tower to `embed_dim`.
"""
import math

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

OFFICIAL_TEMPERATURE_B = math.log(1 / 0.07)  # 2.65926, the official init; logit scale = exp(it)


class ContrastiveTemperature(nn.Layer):
    """Holds `temperature_b` under the official name `contrastive_loss_mm.temperature_b`."""

    def __init__(self, init=OFFICIAL_TEMPERATURE_B):
        super().__init__()
        self.temperature_b = self.create_parameter(
            [1], default_initializer=nn.initializer.Constant(init))


class ErnieViL2(nn.Layer):
    def __init__(self, visual, text_model, embed_dim=None):
        super().__init__()
        self.visual = visual
        self.text_model = text_model
        self.embed_dim = embed_dim or text_model.num_features
        # Only created when needed: the official checkpoint has no projection heads.
        self.visual_proj = (nn.Linear(visual.num_features, self.embed_dim, bias_attr=False)
                            if visual.num_features != self.embed_dim else None)
        self.text_proj = (nn.Linear(text_model.num_features, self.embed_dim, bias_attr=False)
                          if text_model.num_features != self.embed_dim else None)
        self.contrastive_loss_mm = ContrastiveTemperature()

    @property
    def image_size(self):
        return self.visual.image_size

    def encode_image(self, images, normalize=True):
        return self.project_image(self.visual(images), normalize)

    def project_image(self, tower_features, normalize=True):
        """The head on the image tower's output (training from cached frozen features uses it)."""
        x = tower_features
        if self.visual_proj is not None:
            x = self.visual_proj(x)
        return F.normalize(x, axis=-1) if normalize else x

    def encode_text(self, input_ids, normalize=True):
        x = self.text_model(input_ids)
        if self.text_proj is not None:
            x = self.text_proj(x)
        return F.normalize(x, axis=-1) if normalize else x

    def logit_scale(self):
        return paddle.exp(self.contrastive_loss_mm.temperature_b)

    def forward(self, images=None, input_ids=None):
        img = self.encode_image(images) if images is not None else None
        txt = self.encode_text(input_ids) if input_ids is not None else None
        return img, txt

    def set_grad_checkpointing(self, enable=True):
        for tower in (self.visual, self.text_model):
            if hasattr(tower, "grad_checkpointing"):
                tower.grad_checkpointing = enable

"""The ERNIE-ViL 2.0 dual encoder: an image tower and a text tower mapped to one space.

Where the towers' widths equal `embed_dim` (the official base model) there is no projection, so
official checkpoints load unchanged; otherwise a bias-free Linear maps each tower to `embed_dim`.

Temperatures: the model owns every contrastive temperature, in log space (logit scale =
exp(clip(t, 0, max_logit_scale))). The image-text one is the official
`contrastive_loss_mm.temperature_b`. Training-only ones (other view pairs, e.g. image-image_aug)
live under the prefix `train_heads.` (`train_heads.temperature_<view_a>__<view_b>`), added by the
trainer with `add_temperatures`; inference never creates them, and a checkpoint's `train_heads.*`
tensors are dropped when it is loaded for inference (ernievil2.checkpoint).
"""
import math

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

OFFICIAL_TEMPERATURE_B = math.log(1 / 0.07)  # 2.65926, the official init
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp of the log logit scale
TRAIN_HEADS_PREFIX = "train_heads."
OFFICIAL_PAIR = frozenset(("image", "text"))


def temperature_name(view_a, view_b):
    """The state_dict name of the temperature of the pair (view_a, view_b), in either order."""
    if frozenset((view_a, view_b)) == OFFICIAL_PAIR:
        return "contrastive_loss_mm.temperature_b"
    return f"{TRAIN_HEADS_PREFIX}temperature_{view_a}__{view_b}"


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
        self.train_heads = nn.Layer()  # empty unless training adds view-pair temperatures

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

    def forward(self, images=None, input_ids=None):
        img = self.encode_image(images) if images is not None else None
        txt = self.encode_text(input_ids) if input_ids is not None else None
        return img, txt

    def set_grad_checkpointing(self, enable=True):
        for tower in (self.visual, self.text_model):
            if hasattr(tower, "grad_checkpointing"):
                tower.grad_checkpointing = enable

    # -- temperatures -----------------------------------------------------------------------
    def add_temperatures(self, pairs, init=OFFICIAL_TEMPERATURE_B):
        """Create the training-only temperature of every (view_a, view_b, ...) pair that is not
        image-text and does not exist yet. Returns their state_dict names."""
        added = []
        for view_a, view_b, *_ in pairs:
            name = temperature_name(view_a, view_b)
            local = name[len(TRAIN_HEADS_PREFIX):]
            if name.startswith(TRAIN_HEADS_PREFIX) and not hasattr(self.train_heads, local):
                self.train_heads.add_parameter(local, self.train_heads.create_parameter(
                    [1], default_initializer=nn.initializer.Constant(float(init))))
                added.append(name)
        return added

    def temperature(self, view_a, view_b):
        """The log-space temperature Parameter of a pair."""
        name = temperature_name(view_a, view_b)
        if name.startswith(TRAIN_HEADS_PREFIX):
            local = name[len(TRAIN_HEADS_PREFIX):]
            if not hasattr(self.train_heads, local):
                raise KeyError(f"no temperature for the pair {view_a}-{view_b}: add_temperatures first")
            return getattr(self.train_heads, local)
        return self.contrastive_loss_mm.temperature_b

    def temperatures(self):
        """state_dict name -> Parameter of every temperature the model holds."""
        out = {"contrastive_loss_mm.temperature_b": self.contrastive_loss_mm.temperature_b}
        out.update({TRAIN_HEADS_PREFIX + n: p for n, p in self.train_heads.named_parameters()})
        return out

    def logit_scales(self, pairs, max_logit_scale=MAX_LOGIT_SCALE):
        """'view_a-view_b' -> exp(clip(temperature, 0, max_logit_scale)) for every pair: the
        multipliers of the cosine similarities. Clipped here too, so the scale never exceeds the
        bound between an optimizer step and `clamp_temperatures_`."""
        return {f"{a}-{b}": paddle.exp(paddle.clip(self.temperature(a, b), 0.0, max_logit_scale))
                for a, b, *_ in pairs}

    @paddle.no_grad()
    def clamp_temperatures_(self, max_logit_scale=MAX_LOGIT_SCALE):
        """Clamp every temperature in place to [0, max_logit_scale]; call after each optimizer
        step (the official code's clip returned a new tensor and changed nothing)."""
        for t in self.temperatures().values():
            t.set_value(paddle.clip(t, 0.0, max_logit_scale))

"""The ERNIE-ViL 2.0 dual encoder: an image tower and a text tower mapped to one space.

Where the towers' widths equal `embed_dim` (the official base model) there is no projection, so
official checkpoints load unchanged; otherwise a bias-free Linear maps each tower to `embed_dim`.

Temperatures: the model owns every contrastive temperature, in log space (logit scale =
exp(clip(t, 0, max_logit_scale))). The image-text one is the official
`contrastive_loss_mm.temperature_b`. Training-only ones (other view pairs, e.g. image-image_aug)
live under the prefix `train_heads.` (`train_heads.temperature_<view_a>__<view_b>`), added by the
trainer with `add_temperatures`; inference never creates them, and a checkpoint's `train_heads.*`
tensors are dropped when it is loaded for inference (ernievil2.checkpoint).

Hierarchical alignment (ViCHA): with `add_level_heads(K)` the image-text loss also contrasts the
pooled features of the K - 1 layers below the top of both towers, each through its own projection
`train_heads.{image,text}_h<i>_proj` (level i = i layers below the top) and its own temperature
(the pair `image_h<i>`-`text_h<i>`); level 0 is the model's own output, so inference is unchanged.

Visual concepts (ViCHA, `visual_concepts="embed"`): the image's tags (from a classifier on the
image, never a caption), as token ids, are embedded with the text tower's word table, averaged
and mapped by the zero-initialised `visual_concepts.proj` onto the image side: added to the
[CLS] token at a ViT's input, or to an EfficientNet's pooled output (so a frozen, cached tower
still works). At initialisation the model's outputs are those without concepts.
"""
import math

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

OFFICIAL_TEMPERATURE_B = math.log(1 / 0.07)  # 2.65926, the official init
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp of the log logit scale
TRAIN_HEADS_PREFIX = "train_heads."
OFFICIAL_PAIR = frozenset(("image", "text"))
VISUAL_CONCEPTS = ("none", "embed")


def level_view(view, level):
    """The feature name of `view` (image or text) at `level` layers below the top."""
    return view if level == 0 else f"{view}_h{level}"


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


class VisualConcepts(nn.Layer):
    """Mean word embedding of the tag tokens -> a zero-initialised map onto the image side."""

    def __init__(self, text_width, image_width):
        super().__init__()
        self.proj = nn.Linear(text_width, image_width, bias_attr=False,
                              weight_attr=paddle.ParamAttr(initializer=nn.initializer.Constant(0.0)))

    def forward(self, word_emb, tag_ids, pad_id):
        keep = (tag_ids != pad_id).astype("float32").unsqueeze(-1)
        pooled = (word_emb(tag_ids) * keep).sum(1) / paddle.clip(keep.sum(1), min=1.0)
        return self.proj(pooled)


class ErnieViL2(nn.Layer):
    def __init__(self, visual, text_model, embed_dim=None, visual_concepts="none"):
        super().__init__()
        if visual_concepts not in VISUAL_CONCEPTS:
            raise ValueError(f"visual_concepts must be one of {list(VISUAL_CONCEPTS)}, got {visual_concepts!r}")
        self.visual = visual
        self.text_model = text_model
        self.embed_dim = embed_dim or text_model.num_features
        # Only created when needed: the official checkpoint has no projection heads.
        self.visual_proj = (nn.Linear(visual.num_features, self.embed_dim, bias_attr=False)
                            if visual.num_features != self.embed_dim else None)
        self.text_proj = (nn.Linear(text_model.num_features, self.embed_dim, bias_attr=False)
                          if text_model.num_features != self.embed_dim else None)
        self.contrastive_loss_mm = ContrastiveTemperature()
        # ViT: the concepts join the class token at the input; others: the pooled output
        self.concepts_at_cls = hasattr(visual, "class_embedding")
        self.visual_concepts = None
        if visual_concepts == "embed":
            self.visual_concepts = VisualConcepts(
                text_model.num_features,
                visual.class_embedding.shape[-1] if self.concepts_at_cls else visual.num_features)
        self.train_heads = nn.Layer()  # empty unless training adds view-pair temperatures

    @property
    def image_size(self):
        return self.visual.image_size

    @property
    def uses_tags(self):
        """True when encode_image needs the image's tag ids (visual_concepts: embed)."""
        return self.visual_concepts is not None

    def _concepts(self, tag_ids):
        if tag_ids is None:
            raise ValueError("this model embeds visual concepts: encode_image needs the image's tag ids")
        return self.visual_concepts(self.text_model.word_emb, tag_ids, self.text_model.pad_token_id)

    def encode_image(self, images, tag_ids=None, normalize=True):
        return self.encode_image_levels(images, 1, tag_ids, normalize)[0]

    def encode_image_levels(self, images, levels, tag_ids=None, normalize=True):
        """[the image embedding, then the level heads' embeddings from the top down]."""
        if self.uses_tags and self.concepts_at_cls:
            feats = self.visual.forward_levels(images, levels, cls_add=self._concepts(tag_ids))
            tag_ids = None  # already in
        elif levels == 1:
            feats = [self.visual(images)]
        else:
            feats = self.visual.forward_levels(images, levels)
        return self._project_image_levels(feats, tag_ids, normalize)

    def project_image(self, tower_features, tag_ids=None, normalize=True):
        """The head on the image tower's output (training from cached frozen features uses it)."""
        return self._project_image_levels([tower_features], tag_ids, normalize)[0]

    def project_image_levels(self, tower_features, levels, tag_ids=None, normalize=True):
        """The heads on cached level features, concatenated along the last axis in the order of
        the tower's `forward_levels` (what feature_cache.LevelTower returns)."""
        widths = self.visual.level_widths(levels)
        return self._project_image_levels(paddle.split(tower_features, widths, axis=-1),
                                          tag_ids, normalize)

    def _project_image_levels(self, feats, tag_ids, normalize):
        x = feats[0]
        if self.uses_tags and not self.concepts_at_cls:
            x = x + self._concepts(tag_ids)
        if self.visual_proj is not None:
            x = self.visual_proj(x)
        out = [x] + [self._level_head("image", i)(f) for i, f in enumerate(feats[1:], 1)]
        return [F.normalize(o, axis=-1) for o in out] if normalize else out

    def encode_text(self, input_ids, normalize=True):
        return self.encode_text_levels(input_ids, 1, normalize)[0]

    def encode_text_levels(self, input_ids, levels, normalize=True):
        """[the text embedding, then the level heads' embeddings from the top down]."""
        feats = ([self.text_model(input_ids)] if levels == 1
                 else self.text_model.forward_levels(input_ids, levels))
        x = feats[0]
        if self.text_proj is not None:
            x = self.text_proj(x)
        out = [x] + [self._level_head("text", i)(f) for i, f in enumerate(feats[1:], 1)]
        return [F.normalize(o, axis=-1) for o in out] if normalize else out

    # -- hierarchical alignment ---------------------------------------------------------------
    def add_level_heads(self, levels):
        """Create the training-only projections of levels 1 .. levels-1 (a ValueError when a
        tower has fewer levels). Their temperatures come with add_temperatures(level pairs)."""
        depth = {"image": self.visual.depth, "text": self.text_model.depth}
        short = {k: d for k, d in depth.items() if d < levels}
        if short:
            raise ValueError(
                f"hierarchical_layers {levels} exceeds the depth of the "
                + ", ".join(f"{k} tower ({d} level{'s' * (d != 1)})" for k, d in short.items())
                + ": use a deeper tower (e.g. a text_model_config with num_hidden_layers >= "
                f"{levels}) or fewer levels")
        widths = {"image": self.visual.level_widths(levels),
                  "text": self.text_model.level_widths(levels)}
        for view in ("image", "text"):
            for i in range(1, levels):
                name = f"{level_view(view, i)}_proj"
                if not hasattr(self.train_heads, name):
                    self.train_heads.add_sublayer(
                        name, nn.Linear(widths[view][i], self.embed_dim, bias_attr=False))

    def _level_head(self, view, level):
        name = f"{level_view(view, level)}_proj"
        if not hasattr(self.train_heads, name):
            raise KeyError(f"no projection for {view} level {level}: add_level_heads first")
        return getattr(self.train_heads, name)

    def forward(self, images=None, input_ids=None, tag_ids=None):
        img = self.encode_image(images, tag_ids) if images is not None else None
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

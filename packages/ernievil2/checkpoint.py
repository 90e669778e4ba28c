"""Checkpoint layouts: the official ERNIE-ViL 2.0 `.pdparams` and PaddleNLP's `ErnieViLModel`.

The project's own parameter names are the official ones, so an official file loads as it is; a
PaddleNLP `model_state.pdparams` is renamed (and its ViT q/k/v fused into the official `qkv`,
laid out q|k|v on the output axis). The layout is detected from the names. Loading is strict,
except for the training-only `train_heads.*` tensors (view-pair temperatures, see
models/dual_encoder.py): inference drops them with a log line; training loads those its model has
and keeps its own initial value for the others.
"""
import glob
import logging
import os
import pickle
import re

import numpy as np
import paddle

from .fileio import atomic_path
from .models.dual_encoder import TRAIN_HEADS_PREFIX

log = logging.getLogger(__name__)

OFFICIAL, PADDLENLP = "official", "paddlenlp"
# Tensors the official files carry but the model never uses (an ImageNet classifier head).
DROPPED_PREFIXES = ("visual.classfy.",)

# (PaddleNLP name, official name). "{i}" is a block index; a name ending in "." is a prefix.
# Linear weights are [in, out] in both layouts.
NAME_PAIRS = [
    ("temperature", "contrastive_loss_mm.temperature_b"),
    ("vision_model.class_embedding", "visual.class_embedding"),
    ("vision_model.conv1.weight", "visual.patch_embed.proj.weight"),
    ("vision_model.positional_embedding.weight", "visual.positional_embedding"),
    ("vision_model.ln_pre.", "visual.norm_pre."),
    ("vision_model.ln_post.", "visual.norm_post."),
    ("vision_model.transformer.layers.{i}.self_attn.out_proj.", "visual.blocks.{i}.attn.proj."),
    ("vision_model.transformer.layers.{i}.linear1.", "visual.blocks.{i}.mlp.fc1."),
    ("vision_model.transformer.layers.{i}.linear2.", "visual.blocks.{i}.mlp.fc2."),
    ("vision_model.transformer.layers.{i}.norm1.", "visual.blocks.{i}.norm1."),
    ("vision_model.transformer.layers.{i}.norm2.", "visual.blocks.{i}.norm2."),
    ("text_model.embeddings.word_embeddings.", "text_model.word_emb."),
    ("text_model.embeddings.position_embeddings.", "text_model.pos_emb."),
    ("text_model.embeddings.token_type_embeddings.", "text_model.sent_emb."),
    ("text_model.embeddings.layer_norm.", "text_model.ln."),
    ("text_model.encoder.layers.{i}.self_attn.q_proj.", "text_model.encoder_stack.block.{i}.attn.q."),
    ("text_model.encoder.layers.{i}.self_attn.k_proj.", "text_model.encoder_stack.block.{i}.attn.k."),
    ("text_model.encoder.layers.{i}.self_attn.v_proj.", "text_model.encoder_stack.block.{i}.attn.v."),
    ("text_model.encoder.layers.{i}.self_attn.out_proj.", "text_model.encoder_stack.block.{i}.attn.o."),
    ("text_model.encoder.layers.{i}.linear1.", "text_model.encoder_stack.block.{i}.ffn.i."),
    ("text_model.encoder.layers.{i}.linear2.", "text_model.encoder_stack.block.{i}.ffn.o."),
    ("text_model.encoder.layers.{i}.norm1.", "text_model.encoder_stack.block.{i}.ln1."),
    ("text_model.encoder.layers.{i}.norm2.", "text_model.encoder_stack.block.{i}.ln2."),
    ("text_model.pooler.dense.", "text_model.pooler."),
]
_NLP_QKV = re.compile(r"^vision_model\.transformer\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
_OFFICIAL_QKV = re.compile(r"^visual\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
# The official layout keeps leading singleton axes PaddleNLP drops: official shape = (1,)*k + nlp shape.
_EXTRA_AXES = {"visual.class_embedding": 2, "visual.positional_embedding": 1}


def _compile(pattern):
    rx = "^" + re.escape(pattern).replace(re.escape("{i}"), r"(\d+)")
    return re.compile(rx if pattern.endswith(".") else rx + "$")


_RULES_TO_OFFICIAL = [(_compile(a), b) for a, b in NAME_PAIRS]
_RULES_TO_NLP = [(_compile(b), a) for a, b in NAME_PAIRS]


def _rename(name, rules):
    for rx, target in rules:
        m = rx.match(name)
        if m:
            head = target.replace("{i}", m.group(1)) if m.groups() else target
            return head + name[m.end():]
    return None


class CheckpointError(RuntimeError):
    pass


class UnreadableCheckpoint(CheckpointError):
    """The file is there but cannot be read: empty or truncated (e.g. an interrupted copy)."""


def _directory_hint(path):
    """Which checkpoint file inside a directory a user most likely meant."""
    found = [os.path.join(path, name) for name in ("model.pdparams", os.path.join("final", "model.pdparams"))
             if os.path.isfile(os.path.join(path, name))]
    found += sorted(set(glob.glob(os.path.join(path, "*.pdparams"))) - set(found))
    steps = sorted(glob.glob(os.path.join(path, "checkpoints", "step_*", "model.pdparams")))
    found += steps[-1:]
    if not found:
        return f"{path} is a directory with no .pdparams file in it; give a checkpoint file"
    return f"{path} is a directory, not a checkpoint file; the file inside it that looks right: {found[0]}"


def load_file(path, **kwargs):
    """paddle.load (or pickle for .pkl) with one-line errors that name the file: a directory,
    an empty or truncated file, a zip archive (.npz) instead of a Paddle checkpoint."""
    if os.path.isdir(path):
        raise CheckpointError(_directory_hint(path))
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    size = os.path.getsize(path)
    if size == 0:
        raise UnreadableCheckpoint(f"{path} is empty (0 bytes): an interrupted save or copy")
    with open(path, "rb") as f:
        if f.read(2) == b"PK":
            raise CheckpointError(f"{path} is a zip archive (a NumPy .npz, e.g. embeddings?), not a "
                                  "Paddle checkpoint (.pdparams)")
    try:
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                return pickle.load(f)
        return paddle.load(path, **kwargs)
    except (EOFError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UnreadableCheckpoint(f"{path} ({size:,} bytes) cannot be read: truncated, or not a "
                                   f"Paddle checkpoint ({first})") from None


def read_state_dict(path):
    """Load a .pdparams file as a dict of numpy arrays."""
    sd = load_file(path, return_numpy=True)
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: not a state dict (got {type(sd).__name__})")
    return {k: np.asarray(v) for k, v in sd.items()}


def detect_layout(state_dict):
    names = set(state_dict)
    if any(n.startswith(("vision_model.", "text_model.embeddings.", "text_model.encoder.")) for n in names):
        return PADDLENLP
    return OFFICIAL


def paddlenlp_to_official(sd):
    out, qkv = {}, {}
    for name, arr in sd.items():
        m = _NLP_QKV.match(name)
        if m:
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = arr
            continue
        new = _rename(name, _RULES_TO_OFFICIAL) or name  # unknown names: the strict load reports them
        if new in _EXTRA_AXES and arr.ndim < 3:
            arr = arr.reshape((1,) * _EXTRA_AXES[new] + arr.shape)
        out[new] = arr
    for (i, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"ViT block {i}: q/k/v {kind} incomplete (have {sorted(parts)})")
        out[f"visual.blocks.{i}.attn.qkv.{kind}"] = np.concatenate(
            [parts["q"], parts["k"], parts["v"]], axis=-1)
    return out


def official_to_paddlenlp(sd):
    out = {}
    for name, arr in sd.items():
        if name.startswith(DROPPED_PREFIXES):
            continue
        m = _OFFICIAL_QKV.match(name)
        if m:
            i, kind = m.groups()
            for part, chunk in zip("qkv", np.split(arr, 3, axis=-1)):
                out[f"vision_model.transformer.layers.{i}.self_attn.{part}_proj.{kind}"] = chunk
            continue
        new = _rename(name, _RULES_TO_NLP)
        if new is None:
            raise CheckpointError(f"no PaddleNLP name for {name!r} (this tower has no PaddleNLP layout)")
        if name in _EXTRA_AXES:
            arr = arr.reshape(arr.shape[_EXTRA_AXES[name]:])
        out[new] = arr
    return out


def to_model_layout(sd):
    """Return (state dict in the project's (official) names, layout detected)."""
    layout = detect_layout(sd)
    if layout == PADDLENLP:
        sd = paddlenlp_to_official(sd)
    return sd, layout


def load_checkpoint(model, path, strict=True, prefix_filter=None, training=False):
    """Load `path` into `model`. Strict: missing, unexpected or mis-shaped tensors stop the load
    with their names. `train_heads.*` tensors the model lacks are dropped (one log line); with
    training=True those the model has but the checkpoint lacks keep their value and are listed
    in the result's "initialised". Returns a dict with the layout found and what was loaded."""
    sd, layout = to_model_layout(read_state_dict(path))
    dropped = [n for n in sd if n.startswith(DROPPED_PREFIXES)]
    for n in dropped:
        del sd[n]
    if dropped:
        log.info("%s: dropped %d unused tensors (%s*)", path, len(dropped), DROPPED_PREFIXES[0])
    own = model.state_dict()
    if prefix_filter:  # e.g. load only an image tower: "visual."
        own = {k: v for k, v in own.items() if k.startswith(prefix_filter)}
    heads = sorted(n for n in sd if n.startswith(TRAIN_HEADS_PREFIX) and n not in own)
    for n in heads:
        del sd[n]
    if heads:
        log.info("%s: dropped %d training-only tensors (%s*), not used by this model", path,
                 len(heads), TRAIN_HEADS_PREFIX)
    initialised = sorted(k for k in own if k not in sd and training
                         and k.startswith(TRAIN_HEADS_PREFIX))
    missing = sorted(set(own) - set(sd) - set(initialised))
    unexpected = sorted(set(sd) - set(own))
    mis_shaped = sorted(f"{k}: checkpoint {list(sd[k].shape)} vs model {list(own[k].shape)}"
                        for k in set(own) & set(sd) if list(sd[k].shape) != list(own[k].shape))
    problems = []
    if missing:
        problems.append(f"missing ({len(missing)}): " + ", ".join(missing[:50]))
    if unexpected:
        problems.append(f"unexpected ({len(unexpected)}): " + ", ".join(unexpected[:50]))
    if mis_shaped:
        problems.append(f"mis-shaped ({len(mis_shaped)}): " + "; ".join(mis_shaped[:50]))
    if problems and strict:
        raise CheckpointError(f"{path} ({layout} layout) does not fit the model:\n  " +
                              "\n  ".join(problems))
    to_set = [k for k in own if k in sd and list(sd[k].shape) == list(own[k].shape)]
    for k in to_set:
        own[k].set_value(sd[k].astype(np.float32) if sd[k].dtype == np.float64 else sd[k])
    log.info("loaded %s: %s layout, %d tensors", path, layout, len(to_set))
    return {"layout": layout, "loaded": len(to_set), "dropped": dropped + heads,
            "missing": missing, "unexpected": unexpected, "initialised": initialised}


def inference_state_dict(model):
    """The model's state dict without the training-only tensors: what inference loads."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(TRAIN_HEADS_PREFIX)}


def save_state_dict(sd, path):
    """Atomic save: a crash never leaves a half-written checkpoint under the final name."""
    with atomic_path(path) as tmp:
        paddle.save(sd, tmp)


def convert_checkpoint(src, dst, to):
    """Write `src` in layout `to`, without training-only tensors. Returns (layout found, count)."""
    sd, layout = to_model_layout(read_state_dict(src))
    sd = {k: v for k, v in sd.items() if not k.startswith(TRAIN_HEADS_PREFIX)}
    if to == PADDLENLP:
        sd = official_to_paddlenlp(sd)
    elif to != OFFICIAL:
        raise ValueError(f"unknown layout {to!r}; use {OFFICIAL} or {PADDLENLP}")
    save_state_dict(sd, dst)
    return layout, len(sd)

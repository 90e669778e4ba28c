"""timm's `tf_efficientnet_lite0` weights -> this project's EfficientNet-Lite0 (no torch needed).

timm nests the MBConv blocks by stage (`blocks.STAGE.INDEX`); this project numbers them flat
(`blocks.N`). A stage starts at every block without a skip connection (stride 2 or a new width),
so the flat index follows from the model itself. timm's first stage is a depthwise-separable
block (conv_dw, bn1, conv_pw, bn2: no expansion); the others are inverted residuals (conv_pw,
bn1, conv_dw, bn2, conv_pwl, bn3). Both ported from the same TF release: "same" padding, BN eps
1e-3, so the numbers carry over; torch's Linear is [out, in], Paddle's [in, out].
"""
import numpy as np

# timm module -> this project's module, per place; BN leaves renamed as Paddle names them.
_TOP = {"conv_stem": "conv_stem", "bn1": "bn_stem", "conv_head": "conv_head", "bn2": "bn_head",
        "classifier": "classifier"}
_SEPARABLE = {"conv_dw": "depthwise_conv", "bn1": "bn_depthwise", "conv_pw": "project_conv",
              "bn2": "bn_project"}
_INVERTED = {"conv_pw": "expand_conv", "bn1": "bn_expand", "conv_dw": "depthwise_conv",
             "bn2": "bn_depthwise", "conv_pwl": "project_conv", "bn3": "bn_project"}
_BN_LEAF = {"weight": "weight", "bias": "bias", "running_mean": "_mean", "running_var": "_variance"}
IGNORED_SUFFIX = ".num_batches_tracked"  # a torch BatchNorm counter, no weight
# The ImageNet head in a tower checkpoint: under the name the official ERNIE-ViL files give theirs,
# which loading a dual encoder drops (checkpoint.DROPPED_PREFIXES); the tagger reads it.
HEAD_PREFIX = "visual.classfy."


def _invert(table):
    return {v: k for k, v in table.items()}


_TOP_INV, _SEPARABLE_INV, _INVERTED_INV, _BN_LEAF_INV = map(
    _invert, (_TOP, _SEPARABLE, _INVERTED, _BN_LEAF))


def timm_names(model):
    """{timm name: this model's name} for every tensor of `model` (an EfficientNet-Lite)."""
    blocks, stage, index = [], -1, 0
    for block in model.blocks:
        if not block.has_skip:
            stage, index = stage + 1, 0
        blocks.append((f"blocks.{stage}.{index}.",
                       _SEPARABLE_INV if block.expand_conv is None else _INVERTED_INV))
        index += 1
    names = {}
    for ours in model.state_dict():
        parts = ours.split(".")
        if parts[0] == "blocks":
            prefix, table = blocks[int(parts[1])]
            module = table[parts[2]]
            theirs = prefix + module
        else:
            module = theirs = _TOP_INV[parts[0]]
        leaf = _BN_LEAF_INV[parts[-1]] if module.startswith("bn") else parts[-1]
        names[f"{theirs}.{leaf}"] = ours
    return names


def from_timm(tensors, model):
    """timm-named arrays -> {this model's name: float32 array}, the classifier transposed to
    Paddle's [in, out]. Names it does not know are kept as they are, for the caller's strict
    check (names and shapes against the model) to report."""
    names = timm_names(model)
    state = {}
    for theirs, arr in tensors.items():
        if theirs.endswith(IGNORED_SUFFIX):
            continue
        ours = names.get(theirs, theirs)
        arr = np.asarray(arr)
        if ours == "classifier.weight" and arr.ndim == 2:
            arr = arr.T
        state[ours] = np.ascontiguousarray(arr, dtype=np.float32)
    return state


def tower_checkpoint(state):
    """The cache file's dict: the tower under `visual.` (what init_image_tower loads) and the
    ImageNet classifier under HEAD_PREFIX."""
    return {(HEAD_PREFIX + k[len("classifier."):] if k.startswith("classifier.") else "visual." + k): v
            for k, v in state.items()}


def classifier_from_checkpoint(path):
    """The ImageNet EfficientNet-Lite0 classifier (eval mode) from a tower checkpoint with its head."""
    import paddle

    from .efficientnet import build_efficientnet

    saved = paddle.load(str(path), return_numpy=True)
    model = build_efficientnet("lite0", with_classifier=True)
    model.set_state_dict({("classifier." + k[len(HEAD_PREFIX):] if k.startswith(HEAD_PREFIX)
                           else k[len("visual."):]): v for k, v in saved.items()})
    model.eval()
    return model

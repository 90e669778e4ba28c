"""Port the ImageNet EfficientNet-Lite0 weights (lukemelas EfficientNet-PyTorch names, as an npz)
into this project's EfficientNet (efficientnet.py)."""
import numpy as np
import paddle

_BN_SUFFIX = {"weight": "weight", "bias": "bias", "running_mean": "_mean",
              "running_var": "_variance"}
# lukemelas EfficientNet-PyTorch module names -> this module's names.
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn_stem", "_conv_head": "conv_head",
              "_bn1": "bn_head", "_fc": "classifier"}
_IN_BLOCK = {"_expand_conv": "expand_conv", "_bn0": "bn_expand",
             "_depthwise_conv": "depthwise_conv", "_bn1": "bn_depthwise",
             "_project_conv": "project_conv", "_bn2": "bn_project",
             "_se_reduce": "se.reduce", "_se_expand": "se.expand"}


def lukemelas_to_paddle_name(name):
    """'_blocks.3._bn1.running_var' -> 'blocks.3.bn_depthwise._variance'; None if unknown."""
    parts = name.split(".")
    if parts[0] == "_blocks" and len(parts) == 4 and parts[1].isdigit() and parts[2] in _IN_BLOCK:
        module, leaf, prefix = _IN_BLOCK[parts[2]], parts[3], f"blocks.{parts[1]}."
    elif len(parts) == 2 and parts[0] in _TOP_LEVEL:
        module, leaf, prefix = _TOP_LEVEL[parts[0]], parts[1], ""
    else:
        return None
    if "bn" in module:
        if leaf not in _BN_SUFFIX:
            return None
        leaf = _BN_SUFFIX[leaf]
    elif leaf not in ("weight", "bias"):
        return None
    return f"{prefix}{module}.{leaf}"


def lite0_state_from_npz(npz_path, model):
    """{paddle name: array} for `model` from a lukemelas-style npz, strictly checked.

    Linear weights: the npz holds torch's [out, in]; Paddle's Linear is [in, out], so they are
    transposed. The `_fc.*` classifier arrays are skipped when the model has no classifier."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state, unexpected, misshaped = {}, [], []
    with np.load(npz_path) as npz:
        for src in npz.files:
            dst = lukemelas_to_paddle_name(src)
            if dst is not None and dst.startswith("classifier.") and model.classifier is None:
                continue
            if dst is None or dst not in expected:
                unexpected.append(src)
                continue
            arr = npz[src]
            if dst == "classifier.weight" and arr.ndim == 2:
                arr = arr.T
            if tuple(arr.shape) != expected[dst]:
                misshaped.append(f"{src} {tuple(npz[src].shape)} -> {dst} {expected[dst]}")
                continue
            state[dst] = np.ascontiguousarray(arr, dtype=np.float32)
    missing = sorted(set(expected) - set(state) - {m.split(" -> ")[1].split(" ")[0]
                                                  for m in misshaped})
    problems = []
    if missing:
        problems.append(f"missing (in the model, not in the file): {missing}")
    if unexpected:
        problems.append(f"unexpected (in the file, not in the model): {unexpected}")
    if misshaped:
        problems.append(f"shape mismatch: {misshaped}")
    if problems:
        raise ValueError(f"{npz_path}: does not fit this EfficientNet: " + "; ".join(problems))
    return state


def load_lite0_npz(model, npz_path):
    """Load the lukemelas-style EfficientNet-Lite0 npz into `model` (strict; see
    lite0_state_from_npz). Returns the list of Paddle names loaded."""
    state = lite0_state_from_npz(npz_path, model)
    model.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
    return sorted(state)

"""Parameter counting with one meaning everywhere (logs, tools/model_info.py, tests)."""
import math

import paddle.nn as nn


def batchnorm_statistics(layer):
    """ids of the BatchNorm running mean/variance tensors, which Paddle keeps as parameters."""
    ids = set()
    for m in layer.sublayers(include_self=True):
        if isinstance(m, (nn.layer.norm._BatchNormBase, nn.BatchNorm)):
            ids.update(id(p) for p in (m._mean, m._variance))
    return ids


def count_parameters(layer):
    """Learned weights: every parameter, frozen or not, except BatchNorm running statistics
    (so the published counts: TF trainable variables, torch parameters). Works on layers built
    under paddle.LazyGuard()."""
    stats = batchnorm_statistics(layer)
    return int(sum(math.prod(p.shape) for p in layer.parameters() if id(p) not in stats))

"""EfficientNet image towers (B0-B7, L2, Lite0-Lite4) from one coefficient-driven builder.

Follows the TF reference (tensorflow/tpu models/official/efficientnet: efficientnet_builder.py,
efficientnet_model.py, lite/efficientnet_lite_builder.py): the B0 stage list is scaled by a width
coefficient (channels, `round_filters`, divisor 8) and a depth coefficient (repeats,
`round_repeats`, ceil). Convolutions use TF "same" padding (asymmetric, from the input size: Paddle's padding="SAME") so
TF-trained weights give the same numbers. Lite variants drop squeeze-excite, use ReLU6 and keep
the stem (32), the head (1280) and the first/last stage repeats fixed (`fix_head_stem`).

The ImageNet EfficientNet-Lite0 weight port (lukemelas-style names) is in lite0_port.py.
"""
import math
from dataclasses import dataclass, replace

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

# --- Architecture constants (tensorflow/tpu models/official/efficientnet) -------------------------

# B0 stages (efficientnet_builder.py `blocks_args`, e.g. 'r1_k3_s11_e1_i32_o16_se0.25'):
# (expand_ratio, kernel, stride, out_filters, repeats, se_ratio). Each stage's input is the
# previous stage's output; the first stage's input is the stem.
B0_STAGES = (
    (1, 3, 1, 16, 1, 0.25),
    (6, 3, 2, 24, 2, 0.25),
    (6, 5, 2, 40, 2, 0.25),
    (6, 3, 2, 80, 3, 0.25),
    (6, 5, 1, 112, 3, 0.25),
    (6, 5, 2, 192, 4, 0.25),
    (6, 3, 1, 320, 1, 0.25),
)
STEM_FILTERS = 32  # efficientnet_model.py Model._build: round_filters(32, ...) for _conv_stem
HEAD_FILTERS = 1280  # efficientnet_model.py Model._build: round_filters(1280, ...) for _conv_head
DEPTH_DIVISOR = 8  # efficientnet_builder.py / efficientnet_lite_builder.py: depth_divisor=8
BN_EPSILON = 1e-3  # both builders: batch_norm_epsilon=1e-3
# Both builders: batch_norm_momentum=0.99 (TF: moving = 0.99 * moving + 0.01 * batch). Paddle's
# BatchNorm momentum has the same meaning, so 0.99 here (torch would say 0.01).
BN_MOMENTUM = 0.99
DROP_CONNECT_RATE = 0.2  # efficientnet_builder.py drop_connect_rate=0.2; lite: survival_prob=0.8


@dataclass(frozen=True)
class VariantParams:
    width_coefficient: float
    depth_coefficient: float
    image_size: int
    dropout_rate: float
    lite: bool = False  # no squeeze-excite, ReLU6, fixed stem/head (efficientnet_lite_builder.py)


VARIANTS = {
    # efficientnet_builder.py efficientnet_params: (width, depth, resolution, dropout).
    "b0": VariantParams(1.0, 1.0, 224, 0.2),
    "b1": VariantParams(1.0, 1.1, 240, 0.2),
    "b2": VariantParams(1.1, 1.2, 260, 0.3),
    "b3": VariantParams(1.2, 1.4, 300, 0.3),
    "b4": VariantParams(1.4, 1.8, 380, 0.4),
    "b5": VariantParams(1.6, 2.2, 456, 0.4),
    "b6": VariantParams(1.8, 2.6, 528, 0.5),
    "b7": VariantParams(2.0, 3.1, 600, 0.5),
    # Noisy Student (Xie et al. 2020); 'efficientnet-l2': (4.3, 5.3, 800, 0.5) in the later
    # efficientnet_builder.py params_dict.
    "l2": VariantParams(4.3, 5.3, 800, 0.5),
    # lite/efficientnet_lite_builder.py efficientnet_lite_params: (width, depth, res, dropout).
    "lite0": VariantParams(1.0, 1.0, 224, 0.2, lite=True),
    "lite1": VariantParams(1.0, 1.1, 240, 0.2, lite=True),
    "lite2": VariantParams(1.1, 1.2, 260, 0.3, lite=True),
    "lite3": VariantParams(1.2, 1.4, 280, 0.3, lite=True),
    "lite4": VariantParams(1.4, 1.8, 300, 0.3, lite=True),
}


def _variant(name):
    key = str(name).lower().replace("efficientnet", "").strip("-_")
    if key not in VARIANTS:
        raise ValueError(f"unknown EfficientNet variant {name!r}; known: {sorted(VARIANTS)}")
    return VARIANTS[key]


def default_image_size(name):
    """The variant's published training/eval resolution (e.g. 224 for b0/lite0, 456 for b5)."""
    return _variant(name).image_size


def round_filters(filters, width_coefficient, divisor=DEPTH_DIVISOR, skip=False):
    """Channels scaled by the width coefficient, rounded to a multiple of `divisor`
    (efficientnet_model.py round_filters, min_depth = divisor, never more than 10% below)."""
    if skip or not width_coefficient:
        return filters
    scaled = filters * width_coefficient
    new_filters = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new_filters < 0.9 * scaled:
        new_filters += divisor
    return int(new_filters)


def round_repeats(repeats, depth_coefficient, skip=False):
    """Stage repeats scaled by the depth coefficient, rounded up (efficientnet_model.py)."""
    if skip or not depth_coefficient:
        return repeats
    return int(math.ceil(depth_coefficient * repeats))


@dataclass(frozen=True)
class BlockSpec:
    in_filters: int
    out_filters: int
    expand_ratio: int
    kernel_size: int
    stride: int
    se_ratio: float  # 0 = no squeeze-excite


def block_specs(width_coefficient, depth_coefficient, fix_head_stem=False, use_se=True,
                stages=B0_STAGES, stem_filters=None):
    """The flat list of MBConv blocks, as efficientnet_model.py Model._build lays them out.

    With `fix_head_stem` (lite) the first and last stages keep their B0 repeats. The first block's
    input is the actual stem width (TF infers it from the tensor; with a fixed stem it can differ
    from round_filters(32))."""
    in_filters = stem_filters or round_filters(STEM_FILTERS, width_coefficient, skip=fix_head_stem)
    specs = []
    for i, (expand, kernel, stride, out, repeats, se_ratio) in enumerate(stages):
        out_filters = round_filters(out, width_coefficient)
        keep = fix_head_stem and i in (0, len(stages) - 1)
        for r in range(round_repeats(repeats, depth_coefficient, skip=keep)):
            specs.append(BlockSpec(in_filters, out_filters, expand, kernel,
                                   stride if r == 0 else 1, se_ratio if use_se else 0.0))
            in_filters = out_filters
    return specs


# --- Layers ---------------------------------------------------------------------------------------

def _tf_conv_init(out_channels, kernel_size, groups):
    # efficientnet_model.py conv_kernel_initializer: normal(0, sqrt(2 / fan_out)), fan_out =
    # kh * kw * output filters per group (TF depthwise kernels have 1 output per input channel).
    fan_out = kernel_size * kernel_size * (out_channels // groups)
    return nn.initializer.Normal(0.0, math.sqrt(2.0 / fan_out))


class Conv2DSame(nn.Conv2D):
    """Conv2D with TF "same" padding: Paddle's padding="SAME" pads from the input size at run time
    with any odd total after (bottom/right), as TF does. Stride-1 odd kernels pad symmetrically, so
    they take a plain static padding. (An explicit F.pad is avoided: paddle2onnx 2.1 exports its
    pad value as uninitialised memory, which corrupts the image borders in ONNX.)"""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1, bias=False):
        static = stride == 1 and kernel_size % 2 == 1
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=(kernel_size - 1) // 2 if static else "SAME",
                         groups=groups,
                         weight_attr=paddle.ParamAttr(
                             initializer=_tf_conv_init(out_channels, kernel_size, groups)),
                         bias_attr=None if bias else False)


def _batch_norm(channels):
    return nn.BatchNorm2D(channels, momentum=BN_MOMENTUM, epsilon=BN_EPSILON)


def _activation(lite):
    # efficientnet_builder.py relu_fn=tf.nn.swish; efficientnet_lite_builder.py relu_fn=relu6.
    return nn.ReLU6() if lite else nn.Silu()


def drop_connect(x, survival_prob, training):
    """Per-sample stochastic depth (efficientnet utils.drop_connect): keep with `survival_prob`,
    rescale the kept samples by 1 / survival_prob."""
    if not training or survival_prob >= 1.0:
        return x
    mask = paddle.floor(survival_prob + paddle.rand([x.shape[0], 1, 1, 1], dtype=x.dtype))
    return x / survival_prob * mask


class SqueezeExcite(nn.Layer):
    """Squeeze-excite with biases; reduced width = int(block input filters * se_ratio)."""

    def __init__(self, channels, reduced, lite):
        super().__init__()
        self.reduce = Conv2DSame(channels, reduced, 1, bias=True)
        self.expand = Conv2DSame(reduced, channels, 1, bias=True)
        self.act = _activation(lite)

    def forward(self, x):
        s = x.mean(axis=[2, 3], keepdim=True)
        return x * F.sigmoid(self.expand(self.act(self.reduce(s))))


class MBConvBlock(nn.Layer):
    """Inverted residual: [1x1 expand] -> depthwise kxk -> [squeeze-excite] -> 1x1 project,
    identity skip (with stochastic depth) when stride 1 and in == out."""

    def __init__(self, spec, lite, survival_prob=1.0):
        super().__init__()
        mid = spec.in_filters * spec.expand_ratio
        self.expand_conv = self.bn_expand = None
        if spec.expand_ratio != 1:
            self.expand_conv = Conv2DSame(spec.in_filters, mid, 1)
            self.bn_expand = _batch_norm(mid)
        self.depthwise_conv = Conv2DSame(mid, mid, spec.kernel_size, spec.stride, groups=mid)
        self.bn_depthwise = _batch_norm(mid)
        self.se = None
        if spec.se_ratio and 0 < spec.se_ratio <= 1:
            self.se = SqueezeExcite(mid, max(1, int(spec.in_filters * spec.se_ratio)), lite)
        self.project_conv = Conv2DSame(mid, spec.out_filters, 1)
        self.bn_project = _batch_norm(spec.out_filters)
        self.act = _activation(lite)
        self.has_skip = spec.stride == 1 and spec.in_filters == spec.out_filters
        self.survival_prob = survival_prob

    def forward(self, inputs):
        x = inputs
        if self.expand_conv is not None:
            x = self.act(self.bn_expand(self.expand_conv(x)))
        x = self.act(self.bn_depthwise(self.depthwise_conv(x)))
        if self.se is not None:
            x = self.se(x)
        x = self.bn_project(self.project_conv(x))
        if self.has_skip:
            x = drop_connect(x, self.survival_prob, self.training) + inputs
        return x


class EfficientNet(nn.Layer):
    """EfficientNet image tower.

    `forward_features(x)` -> [B, num_features] globally pooled head activations;
    `forward(x)` -> logits when the classifier exists, else the pooled features.
    `variant` names a published model ("b0".."b7", "l2", "lite0".."lite4"); any coefficient given
    explicitly overrides the variant's (or defines the net when `variant` is None)."""

    def __init__(self, variant=None, *, width_coefficient=None, depth_coefficient=None,
                 image_size=None, dropout_rate=None, lite=None, num_classes=1000,
                 with_classifier=True, drop_connect_rate=DROP_CONNECT_RATE, in_chans=3,
                 stages=B0_STAGES):
        super().__init__()
        base = _variant(variant) if variant is not None else VariantParams(1.0, 1.0, 224, 0.2)
        params = replace(base, **{k: v for k, v in dict(
            width_coefficient=width_coefficient, depth_coefficient=depth_coefficient,
            image_size=image_size, dropout_rate=dropout_rate, lite=lite).items() if v is not None})
        self.params = params
        self.image_size = int(params.image_size)
        lite = params.lite
        fix = lite  # efficientnet_lite_builder.py: fix_head_stem=True ("Don't scale stem and head")
        width = params.width_coefficient

        stem = round_filters(STEM_FILTERS, width, skip=fix)
        self.conv_stem = Conv2DSame(in_chans, stem, 3, stride=2)  # model.py: 3x3 stride 2
        self.bn_stem = _batch_norm(stem)
        specs = block_specs(width, params.depth_coefficient, fix_head_stem=fix, use_se=not lite,
                            stages=stages, stem_filters=stem)
        # model.py Model.call: survival_prob = 1 - drop_rate * idx / num_blocks.
        self.blocks = nn.LayerList([
            MBConvBlock(s, lite, 1.0 - drop_connect_rate * i / len(specs))
            for i, s in enumerate(specs)])
        # index of each stage's last block: hierarchical alignment pools the stage outputs
        self.stage_ends, self.stage_widths, n = [], [], 0
        for i, stage in enumerate(stages):
            n += round_repeats(stage[4], params.depth_coefficient, skip=fix and i in (0, len(stages) - 1))
            self.stage_ends.append(n - 1)
            self.stage_widths.append(specs[n - 1].out_filters)
        self.num_features = round_filters(HEAD_FILTERS, width, skip=fix)
        self.conv_head = Conv2DSame(specs[-1].out_filters, self.num_features, 1)
        self.bn_head = _batch_norm(self.num_features)
        self.act = _activation(lite)
        self.num_classes = num_classes if with_classifier else 0
        self.dropout = nn.Dropout(params.dropout_rate) if params.dropout_rate > 0 else None
        self.classifier = None
        if self.num_classes:
            # model.py dense_kernel_initializer: uniform(+-1/sqrt(num_classes)); bias zero.
            bound = 1.0 / math.sqrt(self.num_classes)
            self.classifier = nn.Linear(
                self.num_features, self.num_classes,
                weight_attr=paddle.ParamAttr(initializer=nn.initializer.Uniform(-bound, bound)),
                bias_attr=paddle.ParamAttr(initializer=nn.initializer.Constant(0.0)))
        self.grad_checkpointing = False

    def forward_features(self, x):
        return self.forward_head(self.forward_trunk(x))

    def forward_trunk(self, x):
        """Stem and MBConv blocks: [B, C, H/32, W/32] maps (what a trainable head reads)."""
        x = self.act(self.bn_stem(self.conv_stem(x)))
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = paddle.distributed.fleet.utils.recompute(block, x)
            else:
                x = block(x)
        return x

    @property
    def depth(self):
        """How many levels `forward_levels` can return (the head, then each stage)."""
        return 1 + len(self.stage_ends)

    def level_widths(self, levels):
        return [self.num_features] + self.stage_widths[::-1][:levels - 1]

    def forward_levels(self, x, levels):
        """[forward_features, then the globally pooled outputs of the last `levels` - 1 stages,
        from the top down] (hierarchical alignment)."""
        keep = set(self.stage_ends[len(self.stage_ends) - (levels - 1):]) if levels > 1 else set()
        x = self.act(self.bn_stem(self.conv_stem(x)))
        below = []
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training:
                x = paddle.distributed.fleet.utils.recompute(block, x)
            else:
                x = block(x)
            if i in keep:
                below.append(x.mean(axis=[2, 3]))
        return [self.forward_head(x)] + below[::-1]

    def forward_head(self, x):
        """1x1 head convolution, BN, activation, global average pool -> [B, num_features]."""
        x = self.act(self.bn_head(self.conv_head(x)))
        return x.mean(axis=[2, 3])

    def forward(self, x):
        x = self.forward_features(x)
        if self.classifier is None:
            return x
        if self.dropout is not None:
            x = self.dropout(x)
        return self.classifier(x)


def build_efficientnet(name, with_classifier=False, **overrides):
    """A published variant by name ("b0".."b7", "l2", "lite0".."lite4", "efficientnet-b5" too);
    `overrides` go to EfficientNet (image_size, width_coefficient, drop_connect_rate, ...)."""
    return EfficientNet(name, with_classifier=with_classifier, **overrides)

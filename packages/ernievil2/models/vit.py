"""Vision Transformer image tower, laid out exactly as the official ERNIE-ViL 2.0 ViT.

Pre-norm blocks with a fused q|k|v projection, QuickGELU, LayerNorm eps 1e-6, a `norm_pre`
before the blocks (as in CLIP's ln_pre) and `norm_post` on the class token. Parameter names
match the official checkpoint (`visual.*` without the prefix), so official files load as they are.
"""
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

LN_EPS = 1e-6  # official ViT LayerNorm epsilon


class QuickGELU(nn.Layer):
    """x * sigmoid(1.702 x): the activation CLIP and the official ViT use."""

    def forward(self, x):
        return x * F.sigmoid(1.702 * x)


class PatchEmbed(nn.Layer):
    def __init__(self, patch_size, in_chans, width):
        super().__init__()
        self.proj = nn.Conv2D(in_chans, width, patch_size, stride=patch_size, bias_attr=False)

    def forward(self, x):
        x = self.proj(x)  # [B, W, H/p, W/p]
        return x.flatten(2).transpose([0, 2, 1])  # [B, N, W]


class Attention(nn.Layer):
    def __init__(self, width, heads, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"ViT width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = width // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(width, width * 3)  # output laid out q|k|v, as the official
        self.proj = nn.Linear(width, width)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape([b, n, 3, self.heads, self.head_dim])
        if not self.training:
            # Paddle's fused attention where it has one (flash attention on GPUs in fp16/bf16);
            # on CPU it runs the same ops as below, with the same result.
            q, k, v = qkv.unbind(axis=2)  # [B, N, heads, head_dim] each
            out = F.scaled_dot_product_attention(q, k, v, training=False)
            return self.proj(out.reshape([b, n, c]))
        qkv = qkv.transpose([2, 0, 3, 1, 4])
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = F.softmax(paddle.matmul(q * self.scale, k, transpose_y=True), axis=-1)
        out = paddle.matmul(self.attn_drop(attn), v).transpose([0, 2, 1, 3]).reshape([b, n, c])
        return self.proj_drop(self.proj(out))


class Mlp(nn.Layer):
    def __init__(self, width, hidden, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = QuickGELU()
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Layer):
    def __init__(self, width, heads, mlp_ratio, drop=0.0, attn_drop=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, epsilon=LN_EPS)
        self.attn = Attention(width, heads, attn_drop, drop)
        self.norm2 = nn.LayerNorm(width, epsilon=LN_EPS)
        self.mlp = Mlp(width, int(width * mlp_ratio), drop)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Layer):
    """Returns the normalised class token, [B, width] (no projection, as the official)."""

    def __init__(self, image_size=224, patch_size=16, width=768, layers=12, heads=12,
                 mlp_ratio=4.0, in_chans=3, drop_rate=0.0, attn_drop_rate=0.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size = image_size
        self.num_features = width
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size, in_chans, width)
        init = nn.initializer.TruncatedNormal(std=0.02)
        self.class_embedding = self.create_parameter([1, 1, width], default_initializer=init)
        self.positional_embedding = self.create_parameter(
            [1, num_patches + 1, width], default_initializer=init)
        self.norm_pre = nn.LayerNorm(width, epsilon=LN_EPS)
        self.blocks = nn.LayerList(
            [Block(width, heads, mlp_ratio, drop_rate, attn_drop_rate) for _ in range(layers)])
        self.norm_post = nn.LayerNorm(width, epsilon=LN_EPS)
        self.grad_checkpointing = False

    @property
    def depth(self):
        """How many levels `forward_levels` can return (one per block)."""
        return len(self.blocks)

    def level_widths(self, levels):
        return [self.num_features] * levels

    def forward(self, images, cls_add=None):
        return self.forward_levels(images, 1, cls_add)[0]

    def forward_levels(self, images, levels, cls_add=None):
        """[the output of forward, then the class token after each of the `levels` - 1 blocks
        below the last, from the top down] (hierarchical alignment). cls_add: [B, width] added
        to the class token at the input (visual-concept embedding)."""
        x = self.patch_embed(images)
        cls = self.class_embedding.expand([x.shape[0], 1, x.shape[2]])
        if cls_add is not None:
            cls = cls + cls_add.unsqueeze(1)
        x = paddle.concat([cls, x], axis=1) + self.positional_embedding
        x = self.norm_pre(x)
        below = []
        first_kept = len(self.blocks) - levels
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and self.training:
                x = paddle.distributed.fleet.utils.recompute(blk, x)
            else:
                x = blk(x)
            if first_kept <= i < len(self.blocks) - 1:
                below.append(x[:, 0])
        return [self.norm_post(x[:, 0])] + below[::-1]

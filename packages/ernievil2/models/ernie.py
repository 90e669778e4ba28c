"""ERNIE text tower (ERNIE 3.0 / 2.0 Base and Large), laid out as the official ERNIE-ViL 2.0 one.

Word + position (+ sentence-type, ERNIE 2.0) embeddings -> LayerNorm -> post-norm transformer
blocks (attention q/k/v/o, exact erf GELU FFN i/o) -> tanh pooler on [CLS]. The official code uses
LayerNorm eps 1e-5 here (PaddleNLP's port uses 1e-12; we follow the official model) and an additive
-10000 mask on padding (id 0). Built from an ERNIE json config of any depth and width.

`"pooling": "mean"` in the json (a project option, not in the release) averages the last hidden
states over the non-padding tokens instead: a small tower trained from scratch on a few thousand
captions learns faster and generalises better that way. With `"num_hidden_layers": 0` the tower is
the mean of the normalised token + position embeddings (configs/text/ernie_embed_mean.json, the
Flickr8k-CN recipe's). The pooler weights stay in the model either way, so checkpoints keep one
layout.
"""
import json

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ..config import ConfigError

LN_EPS = 1e-5  # official text-tower LayerNorm epsilon
MASK_VALUE = -10000.0  # official additive attention bias on padding keys

# Keys of an ERNIE json config we read, with their meaning.
ERNIE_CONFIG_KEYS = {
    "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
    "max_position_embeddings", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
    "initializer_range", "sent_type_vocab_size", "task_type_vocab_size", "type_vocab_size",
    "intermediate_size", "use_sent_emb", "pad_token_id", "model_type", "pooling",
}
POOLINGS = ("cls", "mean")


def load_ernie_config(path):
    """Read an ERNIE json config and return the dict, rejecting keys we would silently ignore
    (ConfigError naming the file)."""
    with open(path, encoding="utf-8") as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: an ERNIE config is a JSON object, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - ERNIE_CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown ERNIE config keys {unknown}")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
               if k not in cfg]
    if missing:
        raise ConfigError(f"{path}: missing required ERNIE config key(s) {missing}")
    return cfg


class ErnieAttention(nn.Layer):
    def __init__(self, hidden, heads, attn_drop):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"ERNIE hidden_size {hidden} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, hidden // heads
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.o = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(attn_drop)

    def _split(self, x):
        b, n, _ = x.shape
        return x.reshape([b, n, self.heads, self.head_dim]).transpose([0, 2, 1, 3])

    def forward(self, x, attn_bias):
        q = self._split(self.q(x)) * (self.head_dim ** -0.5)
        k, v = self._split(self.k(x)), self._split(self.v(x))
        scores = paddle.matmul(q, k, transpose_y=True) + attn_bias
        out = paddle.matmul(self.drop(F.softmax(scores, axis=-1)), v)
        b, _, n, _ = out.shape
        return self.o(out.transpose([0, 2, 1, 3]).reshape([b, n, self.heads * self.head_dim]))


class ErnieFFN(nn.Layer):
    def __init__(self, hidden, inner, act, drop):
        super().__init__()
        self.i = nn.Linear(hidden, inner)
        self.o = nn.Linear(inner, hidden)
        self.act = act
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.o(self.drop(self.act(self.i(x))))


class ErnieBlock(nn.Layer):
    def __init__(self, hidden, heads, inner, act, drop, attn_drop):
        super().__init__()
        self.attn = ErnieAttention(hidden, heads, attn_drop)
        self.ln1 = nn.LayerNorm(hidden, epsilon=LN_EPS)
        self.ffn = ErnieFFN(hidden, inner, act, drop)
        self.ln2 = nn.LayerNorm(hidden, epsilon=LN_EPS)
        self.drop = nn.Dropout(drop)

    def forward(self, x, attn_bias):
        x = self.ln1(x + self.drop(self.attn(x, attn_bias)))
        return self.ln2(x + self.drop(self.ffn(x)))


class ErnieEncoderStack(nn.Layer):
    def __init__(self, layers, **block_kw):
        super().__init__()
        self.block = nn.LayerList([ErnieBlock(**block_kw) for _ in range(layers)])


_ACTIVATIONS = {"gelu": lambda x: F.gelu(x, approximate=False), "relu": F.relu}


class ErnieTextModel(nn.Layer):
    """input_ids [B, L] int64 (0 = padding) -> pooled features [B, hidden] ([CLS] or mean)."""

    def __init__(self, vocab_size, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=None, max_position_embeddings=2048, hidden_act="gelu",
                 hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                 use_sent_emb=False, sent_type_vocab_size=4, pad_token_id=0, pooling="cls",
                 **_unused):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unsupported pooling {pooling!r}; known: {list(POOLINGS)}")
        self.pooling = pooling
        if hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {hidden_act!r}; known: {sorted(_ACTIVATIONS)}")
        self.num_features = hidden_size
        self.pad_token_id = pad_token_id
        self.max_position_embeddings = max_position_embeddings
        self.word_emb = nn.Embedding(vocab_size, hidden_size)
        self.pos_emb = nn.Embedding(max_position_embeddings, hidden_size)
        # ERNIE 2.0 adds a sentence-type embedding; the official ERNIE 3.0 tower disables it.
        self.sent_emb = nn.Embedding(sent_type_vocab_size, hidden_size) if use_sent_emb else None
        self.ln = nn.LayerNorm(hidden_size, epsilon=LN_EPS)
        self.dropout = nn.Dropout(hidden_dropout_prob)
        self.encoder_stack = ErnieEncoderStack(
            num_hidden_layers, hidden=hidden_size, heads=num_attention_heads,
            inner=intermediate_size or 4 * hidden_size, act=_ACTIVATIONS[hidden_act],
            drop=hidden_dropout_prob, attn_drop=attention_probs_dropout_prob)
        self.pooler = nn.Linear(hidden_size, hidden_size)
        self.grad_checkpointing = False

    @classmethod
    def from_config_file(cls, path, **overrides):
        cfg = load_ernie_config(path)
        cfg.update(overrides)
        return cls(**cfg)

    @property
    def depth(self):
        """How many levels `forward_levels` can return (one per block; the bare embeddings of a
        tower without blocks are its one level)."""
        return max(1, len(self.encoder_stack.block))

    def level_widths(self, levels):
        return [self.num_features] * levels

    def forward(self, input_ids):
        return self.forward_levels(input_ids, 1)[0]

    def forward_levels(self, input_ids, levels):
        """[the output of forward, then the pooled ([CLS] or mean) hidden states after each of the
        `levels` - 1 blocks below the last, from the top down] (hierarchical alignment)."""
        seq_len = input_ids.shape[1]
        # Under paddle.jit.to_static with a dynamic length, seq_len is a graph value, not an int:
        # the check can only run eagerly (an exported model gets the length from its caller).
        if isinstance(seq_len, int) and seq_len > self.max_position_embeddings:
            raise ValueError(f"text length {seq_len} exceeds max_position_embeddings "
                             f"{self.max_position_embeddings}")
        pos = paddle.arange(seq_len, dtype="int64").unsqueeze(0)
        x = self.word_emb(input_ids) + self.pos_emb(pos)
        if self.sent_emb is not None:
            x = x + self.sent_emb(paddle.zeros_like(input_ids))
        x = self.dropout(self.ln(x))
        keep = (input_ids != self.pad_token_id).astype(x.dtype)  # [B, L]
        attn_bias = ((1.0 - keep) * MASK_VALUE).unsqueeze([1, 2])  # [B, 1, 1, L] over keys
        blocks = self.encoder_stack.block
        below = []
        for i, blk in enumerate(blocks):
            if self.grad_checkpointing and self.training:
                x = paddle.distributed.fleet.utils.recompute(blk, x, attn_bias)
            else:
                x = blk(x, attn_bias)
            if len(blocks) - levels <= i < len(blocks) - 1:
                below.append(self._pool(x, keep, final=False))
        return [self._pool(x, keep, final=True)] + below[::-1]

    def _pool(self, x, keep, final):
        if self.pooling == "mean":
            w = keep.unsqueeze(-1)
            return (x * w).sum(1) / paddle.clip(w.sum(1), min=1.0)
        # the tanh pooler belongs to the last layer; lower levels take their raw [CLS]
        return paddle.tanh(self.pooler(x[:, 0])) if final else x[:, 0]

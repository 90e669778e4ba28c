"""GradCache (Gao et al. 2021): a contrastive step on a batch larger than fits in memory, keeping
every in-batch negative, by splitting the ENCODERS' work into micro-batches but not the loss.

Step:
1. Embed every micro-batch of every view under paddle.no_grad(), recording the RNG state
   (paddle, numpy, python `random`) just before each call.
2. Turn the cached embeddings into leaf tensors (stop_gradient=False), compute the loss on the
   full batch (the loss may gather other ranks' features), backward: this gives d loss / d
   embedding for every row, and the gradients of what the loss reads besides the embeddings
   (the model's temperatures, through the logit scales).
3. Re-run each micro-batch with gradient after restoring its recorded RNG state, and backpropagate
   the cached embedding gradient through it; parameter gradients accumulate in `.grad`.
Afterwards the RNG is set to where pass 1 left it, so later draws are as if each encoder ran once.

What equality means: the parameter gradients equal those of one backward through
loss(concat of encoder(micro-batch) in the same order, same RNG states). Stochastic layers draw
their randomness per micro-batch, so with dropout the result equals the one-graph computation over
the same micro-batches (not a single call on the whole batch, which would draw other masks); a
deterministic encoder (eval-mode dropout, per-row-keyed masks) gives the whole-batch gradient.
BatchNorm with batch statistics can never be exact (statistics of a micro-batch are not those of
the batch, and pass 1 would also update the running statistics twice): use
`freeze_batchnorm_stats(model)` so BN uses its running statistics while everything else trains.

Gradients are accumulated into `.grad`: clear them before the step (optimizer.clear_grad()).
Several backward passes run per step, so under paddle.DataParallel wrap the step in
`model.no_sync()` and sync once afterwards, or skip DataParallel and call
`ernievil2.distributed.all_reduce_gradients(params)` after the step.
"""
import random

import numpy as np
import paddle
import paddle.nn as nn


def _rows(n_rows, size):
    return [(s, min(s + size, n_rows)) for s in range(0, n_rows, size)]


def _slice(x, start, stop):
    """Slice a tensor / array, or a dict / list / tuple of them, along axis 0."""
    if isinstance(x, dict):
        return {k: _slice(v, start, stop) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_slice(v, start, stop) for v in x)
    return x[start:stop]


def _num_rows(x, view):
    if isinstance(x, dict):
        sizes = {_num_rows(v, view) for v in x.values()}
    elif isinstance(x, (list, tuple)):
        sizes = {_num_rows(v, view) for v in x}
    else:
        return int(x.shape[0])
    if len(sizes) != 1:
        raise ValueError(f"gradcache: inputs of view {view!r} have different row counts {sizes}")
    return sizes.pop()


def _named(view, out):
    """An encoder's output as {feature name: tensor} (a bare tensor is the view's own)."""
    return dict(out) if isinstance(out, dict) else {view: out}


def get_rng_states():
    return paddle.get_rng_state(), np.random.get_state(), random.getstate()


def set_rng_states(states):
    paddle_state, numpy_state, python_state = states
    paddle.set_rng_state(paddle_state)
    np.random.set_state(numpy_state)
    random.setstate(python_state)


def gradcache_step(encode_fns, loss_fn, batch, micro_batch_size, loss_kwargs=None,
                   replay_rng=True):
    """One GradCache step; returns {'loss': float, **float(info)} from loss_fn.

    encode_fns: view name -> callable(micro-batch of batch[view]) -> [m, D] Tensor (in train mode),
        or a dict feature name -> [m, D] Tensor (several features from one encoder call, e.g. the
        levels of hierarchical alignment; the loss sees them under those names).
    loss_fn: callable(features: dict name -> [N, D] Tensor, **loss_kwargs) -> total loss Tensor or
        (total, info dict). E.g. lambda f: loss(f, model.logit_scales(pairs), ids=ids) with a
        MultiViewContrastiveLoss `loss`.
    batch: view name -> that view's encoder input for the whole (local) batch: a tensor / array, or
        a dict / list / tuple of them, sliced along axis 0. All views must have the same N.
    micro_batch_size: rows per encoder call (the last micro-batch may be smaller).
    replay_rng: restore the recorded RNG state before each re-run (turn off only to show why it
        is needed).
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    missing = [v for v in encode_fns if v not in batch]
    if missing:
        raise KeyError(f"gradcache: batch has no input for views {missing} (got {sorted(batch)})")
    sizes = {v: _num_rows(batch[v], v) for v in encode_fns}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"gradcache: views have different batch sizes {sizes}")
    chunks = _rows(next(iter(sizes.values())), micro_batch_size)

    # Pass 1: embeddings without a graph; remember the RNG state of each encoder call.
    rng, cached, names = {}, {}, {}
    with paddle.no_grad():
        for view, encode in encode_fns.items():
            parts = []
            for start, stop in chunks:
                rng[view, start] = get_rng_states()
                parts.append(_named(view, encode(_slice(batch[view], start, stop))))
            names[view] = list(parts[0])
            for name in names[view]:
                if name in cached:
                    raise ValueError(f"gradcache: two encoders return the feature {name!r}")
                cached[name] = paddle.concat([p[name].detach() for p in parts], axis=0)
    after_pass1 = get_rng_states()

    # Pass 2: the full-batch loss on leaf embeddings -> their gradients (+ the temperatures').
    leaves = {}
    for view, emb in cached.items():
        leaf = emb.detach()
        leaf.stop_gradient = False
        leaves[view] = leaf
    out = loss_fn(leaves, **(loss_kwargs or {}))
    total, info = out if isinstance(out, tuple) else (out, {})
    total.backward()

    # Pass 3: replay each encoder call with gradient, chaining in the cached embedding gradient.
    for view, encode in encode_fns.items():
        grads = {name: leaves[name].grad for name in names[view]}
        unused = [name for name, g in grads.items() if g is None]
        if unused:
            raise RuntimeError(f"gradcache: the loss does not depend on {', '.join(map(repr, unused))}")
        for start, stop in chunks:
            if replay_rng:
                set_rng_states(rng[view, start])
            emb = _named(view, encode(_slice(batch[view], start, stop)))
            paddle.autograd.backward([emb[n] for n in names[view]],
                                     [grads[n][start:stop].detach() for n in names[view]])
    set_rng_states(after_pass1)

    result = {"loss": float(total)}
    for k, v in info.items():
        result[k] = float(v) if isinstance(v, paddle.Tensor) and v.size == 1 else v
    return result


_BN_TYPES = (nn.layer.norm._BatchNormBase, nn.BatchNorm)


def freeze_batchnorm_stats(layer):
    """Put every BatchNorm sublayer of `layer` in eval mode (normalise with the running statistics,
    never update them) while the rest keeps its mode; the BN affine weights still train. Call it
    AFTER layer.train(), which would switch BN back. Returns the frozen sublayers."""
    frozen = [m for m in layer.sublayers(include_self=True) if isinstance(m, _BN_TYPES)]
    for m in frozen:
        m.eval()
    return frozen

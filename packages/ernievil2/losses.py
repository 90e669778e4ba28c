"""Multi-view contrastive loss (ERNIE-ViL 2.0): symmetric InfoNCE over several view pairs, e.g.
image-text, image-image_aug, text-text_aug, image-tags, each with its own temperature.

The loss has no parameters: features and logit scales in, loss out (like open_clip's ClipLoss).
The model owns the temperatures and their clamp (`ErnieViL2.logit_scales`,
`ErnieViL2.clamp_temperatures_` in models/dual_encoder.py, which also fix the official clamp that
changed nothing).

Fixes a bug of the official utils/loss.py (see ../shared/docs/official_release.md): negatives
really come from every rank, with gradient: rows of this rank are scored against the features of
ALL ranks (gathered by `ernievil2.distributed.gather_features`), never against the local ones only.

Conventions
- Pair key: 'view_a-view_b' as configured; `logit_scales` is keyed by it.
- Loss value: each pair's loss is (CE(a->b) + CE(b->a)) / 2 averaged over this rank's rows
  (local_loss=True) or over the global batch (local_loss=False); total = sum(weight * pair loss).
  With all-reduce-averaged gradients (DataParallel or distributed.all_reduce_gradients) both modes
  give the gradient of the global-batch mean loss, the number one process gets on the whole batch.
- targets='clip': the positive of global row i is column i only.
  targets='unicl': every pair of the GLOBAL batch sharing an id (image id / class index) is a
  positive; the target of a row is the row-normalised id-equality row, and the loss is the
  soft-label cross-entropy -sum_j T_ij log softmax(logits)_ij (UniCL). With all ids distinct it is
  the clip loss; otherwise it is bounded below by the mean entropy of the target rows,
  mean_i log(#rows sharing row i's id).
"""
from typing import NamedTuple

import paddle

from ernievil2 import distributed


class ContrastivePair(NamedTuple):
    view_a: str
    view_b: str
    weight: float = 1.0

    @property
    def key(self):
        return f"{self.view_a}-{self.view_b}"


def log_softmax(logits):
    """Row log-softmax via logsumexp. Paddle's CPU softmax kernels (F.log_softmax,
    F.cross_entropy) clip log-probabilities at -64, which corrupts loss and gradient exactly when
    the logit scale is large (100) and a row is badly wrong; logsumexp has no such floor."""
    return logits - paddle.logsumexp(logits, axis=-1, keepdim=True)


def hard_cross_entropy(logits, labels):
    """mean_i -log_softmax(logits)_i,labels_i."""
    picked = paddle.take_along_axis(log_softmax(logits), labels.unsqueeze(1), axis=1)
    return -picked.mean()


def soft_cross_entropy(logits, targets):
    """mean_i -sum_j targets_ij * log_softmax(logits)_ij (targets rows sum to 1)."""
    return -(targets * log_softmax(logits)).sum(axis=-1).mean()


def id_targets(row_ids, col_ids):
    """Row-normalised equality matrix: T_ij = [row_ids_i == col_ids_j] / #matches in row i."""
    eq = (row_ids.unsqueeze(1) == col_ids.unsqueeze(0)).astype("float32")
    count = eq.sum(axis=1, keepdim=True)
    if bool((count == 0).any()):
        raise ValueError("unicl targets: a row's id does not occur among the columns' ids "
                         "(the gathered ids must include this rank's own)")
    return eq / count


class MultiViewContrastiveLoss:
    """Weighted sum of symmetric contrastive losses over view pairs (see module docstring).

    pairs: iterable of ContrastivePair or (view_a, view_b[, weight]) tuples; an unordered pair may
        appear once.
    targets: 'clip' or 'unicl' (needs `ids`).
    local_loss: score local rows against all ranks' columns (True, cheaper) or the full global
        logit matrix on every rank (False). gather_with_grad: exact gradients through the other
        ranks' features (True) or treat them as constants (False, cheaper, not exact).
    """

    def __init__(self, pairs, targets="clip", local_loss=True, gather_with_grad=True):
        if targets not in ("clip", "unicl"):
            raise ValueError(f"targets must be 'clip' or 'unicl', got {targets!r}")
        self.pairs = [p if isinstance(p, ContrastivePair) else ContrastivePair(*p) for p in pairs]
        if not self.pairs:
            raise ValueError("MultiViewContrastiveLoss needs at least one view pair")
        seen = set()
        for p in self.pairs:
            if p.view_a == p.view_b:
                raise ValueError(f"pair {p.key}: the two views must differ")
            if frozenset((p.view_a, p.view_b)) in seen:
                raise ValueError(f"pair {p.key} given twice")
            seen.add(frozenset((p.view_a, p.view_b)))
        self.targets = targets
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    def forward(self, features, logit_scales, ids=None, rank=None, world_size=None):
        """features: view name -> this rank's L2-normalised [b, D] features (same b for all).
        logit_scales: pair key -> that pair's multiplier of the cosine similarities, a [1] or
            scalar Tensor (e.g. ErnieViL2.logit_scales(pairs)); its gradient reaches the temperature.
        ids: this rank's int64 [b] ids (needed for targets='unicl').
        rank / world_size: default to the running process group (0 / 1 single-process).
        Returns (total_loss, info) with info['loss/<pair>'] (tensor with grad) and
        info['logit_scale/<pair>'] (detached)."""
        if rank is None:
            rank = distributed.get_rank()
        if world_size is None:
            world_size = distributed.get_world_size()
        views = sorted({v for p in self.pairs for v in (p.view_a, p.view_b)})
        missing = [v for v in views if v not in features]
        if missing:
            raise KeyError(f"contrastive loss: features missing views {missing} "
                           f"(got {sorted(features)})")
        local = {v: features[v] for v in views}
        sizes = {v: x.shape[0] for v, x in local.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"contrastive loss: views have different batch sizes {sizes}")
        b = next(iter(sizes.values()))
        absent = [p.key for p in self.pairs if p.key not in logit_scales]
        if absent:
            raise KeyError(f"contrastive loss: no logit scale for pairs {absent}")

        gathered = (distributed.gather_features(local, self.local_loss, self.gather_with_grad)
                    if world_size > 1 else local)
        targets = self._targets(ids, b, rank, world_size)

        total, info = 0.0, {}
        for p in self.pairs:
            scale = logit_scales[p.key]
            if self.local_loss:
                ab = scale * paddle.matmul(local[p.view_a], gathered[p.view_b], transpose_y=True)
                ba = scale * paddle.matmul(local[p.view_b], gathered[p.view_a], transpose_y=True)
            else:
                ab = scale * paddle.matmul(gathered[p.view_a], gathered[p.view_b], transpose_y=True)
                ba = ab.T
            loss = 0.5 * (self._ce(ab, targets) + self._ce(ba, targets))
            total = total + p.weight * loss
            info[f"loss/{p.key}"] = loss
            info[f"logit_scale/{p.key}"] = scale.detach().reshape([])
        return total, info

    __call__ = forward

    def _targets(self, ids, b, rank, world_size):
        """clip: int64 labels of the positive columns; unicl: soft target matrix."""
        offset = rank * b if self.local_loss else 0
        rows = b if self.local_loss else b * world_size
        if self.targets == "clip":
            return paddle.arange(offset, offset + rows, dtype="int64")
        if ids is None:
            raise ValueError("targets='unicl' needs ids (image id / label index per row)")
        if not isinstance(ids, paddle.Tensor):
            ids = paddle.to_tensor(ids)
        ids = ids.astype("int64").reshape([-1])
        if ids.shape[0] != b:
            raise ValueError(f"ids has {ids.shape[0]} entries for a batch of {b} rows")
        all_ids = distributed.all_gather_no_grad(ids) if world_size > 1 else ids
        return id_targets(ids if self.local_loss else all_ids, all_ids)

    def _ce(self, logits, targets):
        if self.targets == "clip":
            return hard_cross_entropy(logits, targets)
        return soft_cross_entropy(logits, targets)

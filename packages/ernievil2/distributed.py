"""Data-parallel plumbing: process-group start-up, barriers and object gathers (inference and
training), and for contrastive training gathers that keep gradients and gradient all-reduce.

Launch: `python -m paddle.distributed.launch --nproc_per_node N script.py` (on a machine without a
GPU this starts N CPU processes that talk over gloo; `--devices` fails there). Without the launcher
everything here degrades to the single-process identity, so the same training code runs both ways.

Gradient convention (used by the losses and GradCache): every rank computes the loss on its LOCAL
rows (the mean over them) against negatives gathered from all ranks. `all_gather_with_grad` sends
each rank's share of the other ranks' gradients back to it, so after backward the gradients of
rank r hold the contribution of r's samples to sum_k L_k. `all_reduce_gradients(average=True)`
(what paddle.DataParallel does) then yields exactly the gradient of the GLOBAL-batch loss,
i.e. the mean over all world_size * b rows -- the same number one process gets on the whole batch.
"""
import os
import uuid

import numpy as np
import paddle
import paddle.distributed as dist
from paddle.autograd import PyLayer

_initialized = False


def launched_world_size():
    """World size the launcher announced (1 when not launched)."""
    return int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))


def init_distributed():
    """Start the process group once when run under paddle.distributed.launch with more than one
    process (gloo on CPU, NCCL on GPU). Returns (rank, world_size); (0, 1) without a launcher."""
    global _initialized
    if launched_world_size() > 1 and not _initialized and not dist.is_initialized():
        dist.init_parallel_env()
    _initialized = _initialized or dist.is_initialized()
    return get_rank(), get_world_size()


def is_distributed():
    return dist.is_initialized() and dist.get_world_size() > 1


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_main():
    return get_rank() == 0


def barrier():
    if is_distributed():
        dist.barrier()


def all_gather_object(obj):
    """List of every rank's `obj` (picklable), in rank order; [obj] single-process."""
    if not is_distributed():
        return [obj]
    out = []
    dist.all_gather_object(out, obj)
    return out


# Rows of one gather_rows round: bounded memory for any number of rows (12 MB at D = 768).
ROWS_PER_ROUND = 4096


def gather_rows(array, dst=0, rows_per_round=ROWS_PER_ROUND):
    """Rank `dst`: every rank's numpy `array` (any number of rows; the same dtype and row shape),
    in rank order; other ranks: None. [array] single-process. The rows travel through the process
    group (gloo on CPU), `rows_per_round` at a time, so the nodes of a job need no shared folder."""
    if not is_distributed():
        return [array]
    rank, counts = get_rank(), all_gather_object(len(array))
    row_shape = array.shape[1:]
    pieces = [[] for _ in counts]
    for start in range(0, max(counts), rows_per_round):
        size = min(rows_per_round, max(counts) - start)
        chunk = np.zeros((size,) + row_shape, array.dtype)
        mine = array[start:start + size]
        chunk[:len(mine)] = mine
        received = [] if rank == dst else None
        dist.gather(paddle.to_tensor(chunk), received, dst=dst)
        for r, t in enumerate(received or []):
            if counts[r] > start:
                pieces[r].append(t.numpy()[:counts[r] - start])
    if rank != dst:
        return None
    return [np.concatenate(p) if p else np.zeros((0,) + row_shape, array.dtype) for p in pieces]


def folder_writer(folder):
    """Whether this process writes `folder`'s shared files: the lowest rank that sees the same
    folder does (a folder every node reaches through a shared filesystem: rank 0 only; a folder on
    each node's own disk: one process per node). All ranks call it; `folder` must exist."""
    if not is_distributed():
        return True
    token = all_gather_object(uuid.uuid4().hex[:12])[0]

    def mark(rank):  # names never looked up before: no client's cache (NFS) can answer for them
        return os.path.join(folder, f".ernievil2-rank-{rank}-{token}")
    open(mark(get_rank()), "w").close()
    barrier()
    seen = [r for r in range(get_world_size()) if os.path.exists(mark(r))]
    barrier()
    os.remove(mark(get_rank()))
    barrier()  # no mark is left when a writer next lists the folder
    return min(seen) == get_rank()


def _check_same_shape(x):
    """all_gather needs equal shapes; a ragged last batch would otherwise hang or garble data."""
    shape = paddle.to_tensor(list(x.shape), dtype="int64")
    shapes = []
    dist.all_gather(shapes, shape)
    shapes = [tuple(s.numpy().tolist()) for s in shapes]
    if any(s != shapes[0] for s in shapes):
        raise ValueError(
            f"all_gather needs the same tensor shape on every rank, got {shapes} (rank order); "
            "use drop_last=True / equal per-rank batch sizes")


def all_gather_no_grad(x):
    """Concatenation (axis 0, rank order) of every rank's `x`, without gradient."""
    if not is_distributed():
        return x
    _check_same_shape(x)
    parts = []
    dist.all_gather(parts, x.detach())
    return paddle.concat(parts, axis=0)


class _AllGatherWithGrad(PyLayer):
    @staticmethod
    def forward(ctx, x):
        _check_same_shape(x)
        parts = []
        dist.all_gather(parts, x)
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return paddle.concat(parts, axis=0)

    @staticmethod
    def backward(ctx, grad):
        # Every rank used every rank's rows; rank r's rows receive the sum of all ranks' grads.
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(x):
    """[world*b, ...] concatenation of every rank's [b, ...] `x` in rank order, differentiable:
    backward all-reduces (SUM) the incoming gradient and returns this rank's slice.
    Single process: identity. Raises ValueError if shapes differ across ranks."""
    if not is_distributed():
        return x
    return _AllGatherWithGrad.apply(x)


def gather_features(features, local_loss=True, gather_with_grad=True):
    """Gather a dict of local [b, D] features into global [world*b, D] ones (open_clip's
    gather_features for any number of views).

    gather_with_grad=True: exact gradients through every rank's copy (see module docstring).
    gather_with_grad=False: other ranks' rows are constants; when `local_loss` is False the local
    slice is replaced by the local tensor so at least the local rows keep their gradient (open_clip).
    With local_loss=True the caller uses its local tensors for the rows, so no replacement is
    needed. Single process: the input dict is returned unchanged.
    """
    if not is_distributed():
        return dict(features)
    out = {}
    for name, x in features.items():
        if gather_with_grad:
            out[name] = all_gather_with_grad(x)
        else:
            g = all_gather_no_grad(x)
            if not local_loss:
                b, r = x.shape[0], get_rank()
                g = paddle.concat([g[:r * b], x, g[(r + 1) * b:]], axis=0)
            out[name] = g
    return out


def all_reduce_gradients(parameters, average=True):
    """All-reduce .grad of `parameters` in place (SUM, divided by world size when `average`).
    Use it instead of paddle.DataParallel when one step runs several backward passes (GradCache),
    or wrap those passes in DataParallel.no_sync(). Parameters without a gradient are skipped
    (the same ones on every rank, or the collective would hang)."""
    if not is_distributed():
        return
    world = get_world_size()
    with paddle.no_grad():  # .grad is shared storage; in-place ops on it need no_grad
        for p in parameters:
            g = p.grad
            if g is None:
                continue
            dist.all_reduce(g, op=dist.ReduceOp.SUM)
            if average:
                g.scale_(1.0 / world)

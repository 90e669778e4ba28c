"""Training checkpoints: one directory per step, written under a temporary name and renamed, so a
crash never leaves a half checkpoint. The model file alone is an inference checkpoint
(official layout) that run_infer.sh loads."""
import glob
import logging
import os
import pickle
import re
import shutil

import paddle

log = logging.getLogger("ernievil2.train")
_STEP_DIR = re.compile(r"step_(\d{8})$")


def step_dir(root, step):
    return os.path.join(root, "checkpoints", f"step_{step:08d}")


def list_checkpoints(root):
    found = []
    for d in glob.glob(os.path.join(root, "checkpoints", "step_*")):
        m = _STEP_DIR.search(d)
        if m and os.path.isfile(os.path.join(d, "COMPLETE")):
            found.append((int(m.group(1)), d))
    return sorted(found)


def save_checkpoint(root, step, model, loss_head, optimizer, state, rank, world, extras=None):
    """All ranks call it: rank 0 writes the shared part (and `extras`: name -> picklable object,
    e.g. the EMA weights), every rank its RNG state."""
    final = step_dir(root, step)
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    from ..distributed import barrier
    barrier()
    with open(os.path.join(tmp, f"rng_rank{rank}.pkl"), "wb") as f:
        pickle.dump(state.pop("rng"), f)
    if rank == 0:
        paddle.save(model.state_dict(), os.path.join(tmp, "model.pdparams"))
        paddle.save(loss_head.state_dict(), os.path.join(tmp, "loss.pdparams"))
        paddle.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pdopt"))
        with open(os.path.join(tmp, "state.pkl"), "wb") as f:
            pickle.dump({**state, "world_size": world}, f)
        for name, obj in (extras or {}).items():
            with open(os.path.join(tmp, f"extra_{name}.pkl"), "wb") as f:
                pickle.dump(obj, f)
    barrier()
    if rank == 0:
        open(os.path.join(tmp, "COMPLETE"), "w").close()
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    barrier()
    return final


def prune_checkpoints(root, keep_last, best_step=None):
    ckpts = list_checkpoints(root)
    for step, d in ckpts[:-keep_last]:
        if step != best_step:
            shutil.rmtree(d, ignore_errors=True)


def load_checkpoint_dir(path, model, loss_head, optimizer, rank, world):
    with open(os.path.join(path, "state.pkl"), "rb") as f:
        state = pickle.load(f)
    if state["world_size"] != world:
        raise RuntimeError(f"{path} was written by {state['world_size']} processes; resume needs "
                           f"the same count (got {world}) for an exact continuation")
    model.set_state_dict(paddle.load(os.path.join(path, "model.pdparams")))
    loss_head.set_state_dict(paddle.load(os.path.join(path, "loss.pdparams")))
    optimizer.set_state_dict(paddle.load(os.path.join(path, "optimizer.pdopt")))
    with open(os.path.join(path, f"rng_rank{rank}.pkl"), "rb") as f:
        state["rng"] = pickle.load(f)
    state["extras"] = {}
    for extra in glob.glob(os.path.join(path, "extra_*.pkl")):
        with open(extra, "rb") as f:
            state["extras"][os.path.basename(extra)[len("extra_"):-len(".pkl")]] = pickle.load(f)
    return state


def resolve_resume(resume, root):
    if not resume:
        return None
    if resume == "auto":
        ckpts = list_checkpoints(root)
        return ckpts[-1][1] if ckpts else None
    if not os.path.isfile(os.path.join(resume, "COMPLETE")):
        raise FileNotFoundError(f"resume: {resume} is not a complete checkpoint directory")
    return resume

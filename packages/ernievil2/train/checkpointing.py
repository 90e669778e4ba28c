"""Training checkpoints: one directory per step, `checkpoints/step_XXXXXXXX`, written whole
through fileio.atomic_dir, so a crash never leaves a half checkpoint. Rank 0 writes it; when the
machines of a job do not share output_dir, the first process of every machine writes the same
directory into its own output_dir (model and optimizer state are the same on every process, and
each copy holds every process's RNG state), so every machine resumes from its own disk.

Files: model.pdparams (the model's state dict, training-only `train_heads.*` included; alone it is
an inference checkpoint: run_infer.sh drops those), optimizer.pdopt (Paddle's optimizer state and
`param_names`, its generated tensor names -> state_dict names), state.pkl (step, best score,
world size, and the model and batch keys of the config it was made with: a resume with other values
stops and names them), rng_rank{r}.pkl (each process's random state), extra_<name>.pkl (e.g. the EMA), and
COMPLETE.

Paddle keys optimizer state by generated tensor names (`linear_3.w_0_moment1_0`), which depend on
the order tensors were created in the process; `param_names` lets a resume map them to this
process's tensors by state_dict name.

An older layout kept the view-pair temperatures in a `loss.pdparams` (`temperature_<a>__<b>`) and
had no `param_names`. Such a directory resumes when its optimizer state matches this process's
generated names (e.g. an image-text-only run); otherwise resuming stops with a CheckpointError
that says how to continue from its weights.
"""
import glob
import logging
import os
import pickle
import re
import shutil

import paddle

from ..checkpoint import CheckpointError, load_file
from ..distributed import all_gather_object, barrier, folder_writer
from ..fileio import atomic_dir
from ..models.dual_encoder import TRAIN_HEADS_PREFIX

log = logging.getLogger("ernievil2.train")
_STEP_DIR = re.compile(r"step_(\d{8})$")
OLD_LOSS_FILE = "loss.pdparams"


def step_dir(root, step):
    return os.path.join(root, "checkpoints", f"step_{step:08d}")


def list_checkpoints(root):
    found = []
    for d in glob.glob(os.path.join(root, "checkpoints", "step_*")):
        m = _STEP_DIR.search(d)
        if m and os.path.isfile(os.path.join(d, "COMPLETE")):
            found.append((int(m.group(1)), d))
    return sorted(found)


def _pickle(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def save_checkpoint(root, step, model, optimizer, state, world, extras=None):
    """All ranks call it (each contributes its RNG state); one process per folder writes the
    directory (distributed.folder_writer). state: {'step', 'best', 'rng'}; extras: name ->
    picklable object (e.g. the EMA weights). Returns (the directory, whether this process wrote it)."""
    rng = all_gather_object(state.pop("rng"))
    final = step_dir(root, step)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    writer = folder_writer(os.path.dirname(final))
    if writer:
        with atomic_dir(final) as tmp:
            for r, states in enumerate(rng):
                _pickle(states, os.path.join(tmp, f"rng_rank{r}.pkl"))
            paddle.save(model.state_dict(), os.path.join(tmp, "model.pdparams"))
            opt = dict(optimizer.state_dict())
            opt["param_names"] = {p.name: n for n, p in model.named_parameters()}
            paddle.save(opt, os.path.join(tmp, "optimizer.pdopt"))
            _pickle({**state, "world_size": world}, os.path.join(tmp, "state.pkl"))
            for name, obj in (extras or {}).items():
                _pickle(obj, os.path.join(tmp, f"extra_{name}.pkl"))
            open(os.path.join(tmp, "COMPLETE"), "w").close()
    barrier()
    return final, writer


def prune_checkpoints(root, keep_last, best_step=None):
    ckpts = list_checkpoints(root)
    for step, d in ckpts[:-keep_last]:
        if step != best_step:
            shutil.rmtree(d, ignore_errors=True)


def _model_state(path, model):
    sd = load_file(os.path.join(path, "model.pdparams"))
    old_loss = os.path.join(path, OLD_LOSS_FILE)
    if os.path.isfile(old_loss):  # older layout: the view-pair temperatures sat in the loss
        sd.update({TRAIN_HEADS_PREFIX + k: v for k, v in load_file(old_loss).items()})
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: resume needs the same model and views (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}); to start a new run from its weights use "
            f"init_from_params={os.path.join(path, 'model.pdparams')}")
    return sd


def _optimizer_state(path, model):
    """The saved optimizer state keyed by this process's generated tensor names."""
    saved = load_file(os.path.join(path, "optimizer.pdopt"))
    names = saved.pop("param_names", None)
    current = {n: p.name for n, p in model.named_parameters()}
    if names is not None:
        rename = {old: current[n] for old, n in names.items() if n in current}
        saved = {_renamed(k, rename): v for k, v in saved.items()}
        if "master_weights" in saved:
            saved["master_weights"] = {rename.get(k, k): v for k, v in saved["master_weights"].items()}
    owners = {_split(k, set(current.values()))[0] for k in saved}
    lacking = [n for n, p in model.named_parameters() if not p.stop_gradient and p.name not in owners]
    if lacking:
        what = ("it was written before the view-pair temperatures moved into the model"
                if names is None else "resume needs the same model, views and frozen towers")
        raise CheckpointError(
            f"{path}: no optimizer state for {len(lacking)} parameter(s) ({lacking[0]}, ...): {what}; "
            f"to start a new run from its weights use "
            f"init_from_params={os.path.join(path, 'model.pdparams')}")
    return saved


def _split(key, names):
    """('linear_3.w_0', '_moment1_0') for an optimizer-state key, the tensor name one of `names`."""
    for i, c in enumerate(key):
        if c == "_" and key[:i] in names:
            return key[:i], key[i:]
    return None, key


def _renamed(key, rename):
    name, suffix = _split(key, rename)
    return rename[name] + suffix if name else key


def _short(value, width=60):
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def check_same_config(path, saved, current):
    """saved/current: key -> value of the model and batch keys; a difference stops the resume."""
    differ = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if differ:
        what = "; ".join(f"{k}: checkpoint {_short(saved.get(k))}, this run {_short(current.get(k))}"
                         for k in differ)
        raise CheckpointError(
            f"{path} was made with another model or batch configuration ({what}); resume with the "
            f"checkpoint's values, or start a new run (another output_dir) from its weights with "
            f"init_from_params={os.path.join(path, 'model.pdparams')}")


def load_checkpoint_dir(path, model, optimizer, rank, world, config=None):
    """Restore model and optimizer from a step directory; returns its state (step, best, rng of
    this rank, extras). config: the run's model and batch keys, compared with the checkpoint's
    (a checkpoint written before they were stored is not compared)."""
    state = load_file(os.path.join(path, "state.pkl"))
    if state["world_size"] != world:
        raise CheckpointError(
            f"{path} was written by {state['world_size']} process(es), this run has {world}: an "
            f"exact resume needs the same count (run_train.sh with {state['world_size']} "
            f"device(s)), or start a new run (another output_dir) from its weights with "
            f"init_from_params={os.path.join(path, 'model.pdparams')}")
    if config is not None and "config" in state:
        check_same_config(path, state["config"], config)
    model.set_state_dict(_model_state(path, model))
    optimizer.set_state_dict(_optimizer_state(path, model))
    state["rng"] = load_file(os.path.join(path, f"rng_rank{rank}.pkl"))
    state["extras"] = {os.path.basename(f)[len("extra_"):-len(".pkl")]: load_file(f)
                       for f in glob.glob(os.path.join(path, "extra_*.pkl"))}
    return state


def resume_candidates(resume, root):
    """The step directories to try, in order: resume=auto gives every complete one of root that
    every process has, newest first (a newer one that turns out unreadable falls back to the
    next). All processes call it."""
    if not resume:
        return []
    if resume == "auto":  # the steps every process has (each machine may keep its own copies)
        steps = [{s for s, _ in found} for found in all_gather_object(list_checkpoints(root))]
        return [step_dir(root, s) for s in sorted(set.intersection(*steps), reverse=True)]
    lacking = [r for r, ok in enumerate(all_gather_object(
        os.path.isfile(os.path.join(resume, "COMPLETE")))) if not ok]
    if lacking:
        where = f" on rank {lacking[0]}'s machine" if lacking != [0] else ""
        raise FileNotFoundError(f"resume: {resume} is not a complete checkpoint directory{where}")
    return [resume]

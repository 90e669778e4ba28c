"""The training run around the loop (train/loop.py): output_dir holds one run, so a new run
refuses a used folder (resume continues it, overwrite=true empties it first); step checkpoints
carry the config keys a resume must match, and `resume_latest` continues from the newest readable
one; `write_final` leaves output_dir/final with the model and the infer.yaml run_infer.sh needs;
SIGINT/SIGTERM save a checkpoint at the end of the current step and exit, and `save_every_minutes`
adds checkpoints by the clock, both decided the same on every process (any process's signal stops
all; rank 0's clock decides the timed saves); `log_estimate` tells once what max_steps will cost."""
import contextlib
import logging
import os
import resource
import shutil
import signal
import time

import paddle
import yaml

from ..checkpoint import UnreadableCheckpoint, inference_state_dict, save_state_dict
from ..config import ConfigError
from ..distributed import all_gather_object, barrier, folder_writer
from ..fileio import atomic_write
from ..keys import INFER_KEYS
from ..launch import launch_log_dir
from ..models.ernie import load_ernie_config
from ..models.params import count_parameters
from . import checkpointing as ckpt
from .gradcache import get_rng_states, set_rng_states

log = logging.getLogger("ernievil2.train")
# Keys of the final infer.yaml that name files: written absolute, so it works from any directory.
PATH_KEYS = ("vocab_file", "text_model_config", "test_file", "output_file", "init_from_params",
             "log_dir", "export_dir", "tag_classifier", "tag_classes")
# The keys a checkpoint's model and optimizer state depend on: a resume must have the same values.
RESUME_KEYS = ("image_model", "image_size", "embed_dim", "text_model_config", "max_text_seqlen",
               "views", "targets", "unicl_key", "batch_size", "freeze_image_tower",
               "freeze_text_tower")
# Model keys added later: in the signature only when set, so older checkpoints still resume.
OPTIONAL_RESUME_KEYS = {"hierarchical_layers": 1, "visual_concepts": "none", "train_files": [],
                        "label_classes": ""}
# A model this size trains for days on a CPU (ViT-B/16 + ERNIE base has 204M parameters).
CPU_HINT_PARAMETERS = 50_000_000
CPU_RECIPE = "packages/configs/flickr8k_cn_lite0.yaml"


# -------------------------------------------------------------------------------------- output_dir
def run_entries(cfg, with_logs=False):
    """What output_dir holds besides the launcher's folder of this run (when log_dir is
    output_dir) and, unless with_logs, the train.log files: a previous run's files."""
    if not os.path.isdir(cfg.output_dir):
        return []
    launcher = os.path.abspath(launch_log_dir(cfg.log_dir))
    same_logs = os.path.abspath(cfg.log_dir or cfg.output_dir) == os.path.abspath(cfg.output_dir)
    return sorted(name for name in os.listdir(cfg.output_dir)
                  if os.path.abspath(os.path.join(cfg.output_dir, name)) != launcher
                  and (with_logs or not (same_logs and name.startswith("train.")
                                         and name.endswith(".log"))))


def prepare_output_dir(cfg):
    """A new run needs an unused output_dir: two runs in one folder would mix their checkpoints,
    final model and train.jsonl (and resume=auto would pick the other run's step). resume
    continues the run there; overwrite=true empties it first (one process per folder: see
    distributed.folder_writer). Every process stops when any process's output_dir is used.
    Returns what was deleted."""
    used = run_entries(cfg)
    problem = None
    if used and not cfg.resume and not cfg.overwrite:
        shown = ", ".join(used[:4]) + (", ..." if len(used) > 4 else "")
        problem = (f"output_dir {cfg.output_dir} is not empty ({shown}): continue its run with "
                   f"resume=auto, replace it with overwrite=true, or choose another output_dir")
    problems = all_gather_object(problem)
    for rank, problem in enumerate(problems):
        if problem:
            raise ConfigError(problem + (f" (on rank {rank}'s machine)" if rank else ""))
    os.makedirs(cfg.output_dir, exist_ok=True)
    writer = folder_writer(cfg.output_dir)  # every process looked before anything is deleted
    if cfg.overwrite and writer:
        used = run_entries(cfg, with_logs=True)  # train.log is not open yet
        for name in used:
            path = os.path.join(cfg.output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    barrier()
    return used if cfg.overwrite else []


# ----------------------------------------------------------------------------- checkpoints, resume
def resume_signature(cfg):
    """The RESUME_KEYS of cfg, the text tower as its json's content (not where the file is)."""
    return {**{k: cfg[k] for k in RESUME_KEYS},
            **{k: cfg[k] for k, default in OPTIONAL_RESUME_KEYS.items() if cfg[k] != default},
            "text_model_config": load_ernie_config(cfg.text_model_config)}


def save_step(run):
    """output_dir/step_N: model, optimizer, EMA, RNG states, the best step so far and the
    RESUME_KEYS; keeps the keep_last newest and the best."""
    state = {"step": run.step, "best": run.best, "rng": get_rng_states(),
             "config": resume_signature(run.cfg)}
    extras = {"ema": run.ema.state_dict()} if run.ema is not None else None
    _, writer = ckpt.save_checkpoint(run.cfg.output_dir, run.step, run.model, run.optimizer, state,
                                     run.world, extras)
    if writer:
        ckpt.prune_checkpoints(run.cfg.output_dir, run.cfg.keep_last, run.best["step"])
    run.last_save = time.time()


def resume(run, path):
    state = ckpt.load_checkpoint_dir(path, run.model, run.optimizer, run.rank, run.world,
                                     resume_signature(run.cfg))
    run.step, run.best = state["step"], state["best"]
    set_rng_states(state["rng"])
    if run.ema is not None:
        if "ema" not in state["extras"]:
            raise ConfigError(f"{path} has no EMA weights: it was written with ema_decay 0")
        run.ema.set_state_dict(state["extras"]["ema"])
    log.info("resumed from %s at step %d", path, run.step)


def resume_latest(run, candidates):
    """Resume from the first step directory every process can load; an unreadable one (e.g. a
    truncated file under its COMPLETE marker, on any machine) falls back to the one before, with
    a warning."""
    for i, path in enumerate(candidates):
        try:
            resume(run, path)
            failed = None
        except UnreadableCheckpoint as e:
            failed = e
        failures = [(r, f) for r, f in enumerate(all_gather_object(failed and str(failed))) if f]
        if not failures:
            return
        rank, why = failures[0]
        if i + 1 == len(candidates):
            raise failed or UnreadableCheckpoint(f"{why} (on rank {rank}'s machine)")
        log.warning("cannot resume from %s (%s); falling back to %s", path, why, candidates[i + 1])


# ------------------------------------------------------------------------------------- final model
def eval_weights(run):
    """The EMA weights when ema_decay is on (validation, final model), else the model's own."""
    return run.ema.applied() if run.ema is not None else contextlib.nullcontext()


def infer_config(cfg, model_path):
    """The inference keys of the run, every path absolute, init_from_params = model_path."""
    out = {k: cfg[k] for k in INFER_KEYS}
    out["init_from_params"] = model_path
    for k in PATH_KEYS:
        if out[k]:
            out[k] = os.path.abspath(out[k])
    return out


def write_final(run):
    """output_dir/final/{model.pdparams, infer.yaml}: what run_infer.sh needs. The model file
    holds the inference names only (no training-only temperatures). Written where checkpoints
    are (by rank 0, and on every machine when output_dir is not shared): embed_file is embedded
    with it by every process."""
    if not folder_writer(run.cfg.output_dir):
        return
    final = os.path.join(run.cfg.output_dir, "final")
    os.makedirs(final, exist_ok=True)
    model_path = os.path.abspath(os.path.join(final, "model.pdparams"))
    with eval_weights(run):
        save_state_dict({k: v.numpy() for k, v in inference_state_dict(run.model).items()},
                        model_path)
    infer_path = os.path.join(final, "infer.yaml")
    with atomic_write(infer_path) as f:
        f.write("# written by run_train.sh: bash run_infer.sh 0 THIS_FILE test_file=...\n")
        yaml.safe_dump(infer_config(run.cfg, model_path), f, allow_unicode=True, sort_keys=False)
    log.info("final model: %s (config for run_infer.sh: %s)", model_path, infer_path)


# ------------------------------------------------------------------------------------ stop signals
class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the checkpoint of the step it ended is saved."""

    def __init__(self, signum, step, path):
        super().__init__(f"interrupted ({signal.Signals(signum).name}) at step {step}: checkpoint "
                         f"{path}; continue with resume=auto")
        self.exit_code = 128 + signum


class StopSignals:
    """While active, SIGINT/SIGTERM only set `signum` (the first one's): the loop stops at the end
    of the step. A second signal of the same kind gets the previous handler (stop at once); the
    multi-process launcher follows a Ctrl-C with SIGTERM, which is not a second Ctrl-C."""

    def __init__(self):
        self.signum, self.previous = 0, {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self.previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        signal.signal(signum, self.previous[signum])
        if not self.signum:
            self.signum = signum
            log.warning("%s: saving a checkpoint at the end of this step, then stopping (once "
                        "more to stop at once, without it)", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def agree(run, signum):
    """(signal to stop on or 0, timed save due) the same on every process: any process's signal
    stops all, rank 0's clock decides the save_every_minutes checkpoints."""
    minutes = run.cfg.save_every_minutes
    timed = run.rank == 0 and minutes > 0 and time.time() - run.last_save >= minutes * 60
    if run.world == 1:
        return signum, timed
    votes = all_gather_object((signum, timed))
    return max(v[0] for v in votes), votes[0][1]


# ----------------------------------------------------------------------------------- time estimate
def peak_memory_gb(device):
    if device == "gpu":
        return paddle.device.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def log_estimate(run, seconds):
    """Once, after the second step of a session (the first warms up): what max_steps will cost."""
    left = run.cfg.max_steps - run.step
    minutes = round(seconds * left / 60)
    total = f"about {minutes // 60} h {minutes % 60} min" if minutes else "under a minute"
    line = (f"step time {seconds:.2f} s, peak memory {peak_memory_gb(run.device):.1f} GB: max_steps "
            f"{run.cfg.max_steps} will take {total} ({left} steps left)")
    if run.device == "cpu" and count_parameters(run.model) > CPU_HINT_PARAMETERS:
        line += f"; on a CPU try the CPU recipe: {CPU_RECIPE}"
    log.info(line)

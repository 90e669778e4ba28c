"""Entry points: each command composes its config schema, and expected user errors end with one
clear line, not a traceback. The library never imports this module, the engine or training.

`python -m ernievil2.cli infer|train CONFIG [key=value ...]` is one worker process (what the
launcher, `ernievil2.launch`, starts once or under paddle.distributed.launch); `eval` is
eval_retri.py's command. Importing this module does not import paddle (the launcher checks the
config with it before starting any process)."""
import errno
import json
import logging
import os
import sys
import time

from .config import ConfigError, compose, load_config
from .data.tsv import DataError
from .fileio import write_text
from .keys import INFER_KEYS, TRAIN_COMMAND, TRAIN_KEYS
from .resources import run_config_path
from .tokenizer import VocabError

TRAIN_SCHEMA = compose(INFER_KEYS, TRAIN_KEYS)
# Set by the launcher for its workers: where a failing process leaves its one-line error.
ERROR_DIR_ENV = "ERNIEVIL2_ERROR_DIR"
# OSErrors that are the machine's state, not a bug: one line, like a missing file.
USER_OS_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS}

log = logging.getLogger("ernievil2")


def _note_foreign(foreign):
    for command, keys in foreign.items():
        log.warning("config: %s used by %s, not by this command: ignored", ", ".join(keys), command)


def _path(path):
    """A YAML path, or the name of a shipped run config (`demo_tiny`)."""
    return run_config_path(path) if path else None


def load_infer_config(path=None, overrides=(), quiet=False):
    """The inference schema; training keys in the same file are named in the log and ignored."""
    return load_config(_path(path), overrides, schema=INFER_KEYS, elsewhere={TRAIN_COMMAND: TRAIN_KEYS},
                       on_elsewhere=None if quiet else _note_foreign)


def load_train_config(path=None, overrides=()):
    return load_config(_path(path), overrides, schema=TRAIN_SCHEMA)


LOADERS = {"infer": load_infer_config, "train": load_train_config}


def check_config(command, path, overrides=()):
    """The launcher's check before it starts processes: the loaded config (raises ConfigError)."""
    if command == "infer":
        return load_infer_config(path, overrides, quiet=True)
    return load_train_config(path, overrides)


def user_error_line(exc):
    """The one line of an expected user error, or None for anything else (a bug: traceback)."""
    from .checkpoint import CheckpointError  # imports paddle, so only once something failed
    from .deploy_encoder import ExportError
    if isinstance(exc, (ConfigError, DataError, CheckpointError, VocabError, ExportError,
                        FileNotFoundError)):
        return f"error: {exc}"
    if isinstance(exc, OSError) and exc.errno in USER_OS_ERRNOS:
        return f"error: {exc}"
    return None


def _rank():
    return int(os.environ.get("PADDLE_TRAINER_ID", "0") or 0)


def error_file(folder, rank):
    return os.path.join(folder, f"error.rank{rank}.json")


def _leave_error(line, user):
    """Under the launcher: this process's error, for the launcher to print once on the console."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder:
        return
    record = {"rank": _rank(), "message": line, "user_error": user, "time": time.time()}
    try:
        write_text(error_file(folder, _rank()), json.dumps(record, ensure_ascii=False) + "\n")
    except OSError:
        pass  # e.g. the disk is full: the error stays in this process's log


def run_main(main, argv=None):
    """Call main(argv); an expected user error prints one line and exits 1."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        # training handles SIGINT itself (it saves a checkpoint); anything else stops here
        line = "interrupted (Ctrl-C): nothing was written under the final names"
        print(line, file=sys.stderr, flush=True)
        _leave_error(line, user=True)
        sys.exit(130)
    except BrokenPipeError:
        # the reader went away (`... | head`): stop quietly, as cat does; the interpreter must not
        # flush into the closed pipe again at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except Exception as e:
        line = user_error_line(e)
        if line is None:
            first = (str(e).strip().splitlines() or [""])[0]
            _leave_error(f"{type(e).__name__}: {first}".rstrip(": "), user=False)
            raise
        print(line, file=sys.stderr, flush=True)
        _leave_error(line, user=True)
        sys.exit(1)


def _config_args(command, argv, description):
    import argparse
    p = argparse.ArgumentParser(prog=f"python -m ernievil2.cli {command}", description=description)
    p.add_argument("config", help="YAML config path, or a shipped config's name (demo_tiny)")
    p.add_argument("overrides", nargs="*", help="key=value pairs overriding config keys")
    args = p.parse_args(argv)
    return LOADERS[command](args.config, args.overrides)


def infer(argv=None):
    """One inference process: embed this rank's share of test_file (rank 0 writes the output)."""
    cfg = _config_args("infer", argv, "Embed a TSV (text \\t image_id \\t base64 image) with "
                       "ERNIE-ViL 2.0: one process (run_infer.sh / ernievil2-infer launch them).")
    from .engine.infer import run
    run(cfg)


def train(argv=None):
    """One training process."""
    cfg = _config_args("train", argv, "Multi-view contrastive training of ERNIE-ViL 2.0: one "
                       "process (run_train.sh / ernievil2-train launch them).")
    from .train.loop import train as run_training
    run_training(cfg)


def evaluate(argv=None):
    """eval_retri.py's command: recall@K of an embeddings file."""
    from .evaluate import main
    return main(argv)


COMMANDS = {"infer": infer, "train": train, "eval": evaluate}


def eval_main(argv=None):
    """Console script ernievil2-eval."""
    sys.exit(run_main(evaluate, argv) or 0)


def main(argv=None):
    """`python -m ernievil2.cli COMMAND ...`: one process of a command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m ernievil2.cli {{{','.join(COMMANDS)}}} ARGS  "
              "(run_infer.sh / run_train.sh / eval_retri.py are the user's commands)",
              file=sys.stderr)
        return 2
    return run_main(COMMANDS[argv[0]], argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())

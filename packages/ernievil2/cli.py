"""Entry points: each command composes its config schema, and expected user errors end with one
clear line, not a traceback. The library never imports this module, the engine or training."""
import logging
import sys

from .checkpoint import CheckpointError
from .config import ConfigError, compose, load_config
from .data.tsv import DataError
from .keys import INFER_KEYS
from .tokenizer import VocabError
from .train.keys import TRAIN_KEYS

USER_ERRORS = (ConfigError, DataError, CheckpointError, VocabError, FileNotFoundError)
INFER_COMMAND = "run_infer.sh (ernievil2-infer)"
TRAIN_COMMAND = "run_train.sh (ernievil2-train)"
TRAIN_SCHEMA = compose(INFER_KEYS, TRAIN_KEYS)

log = logging.getLogger("ernievil2")


def _note_foreign(foreign):
    for command, keys in foreign.items():
        log.warning("config: %s used by %s, not by this command: ignored", ", ".join(keys), command)


def load_infer_config(path=None, overrides=()):
    """The inference schema; training keys in the same file are named in the log and ignored."""
    return load_config(path, overrides, schema=INFER_KEYS, elsewhere={TRAIN_COMMAND: TRAIN_KEYS},
                       on_elsewhere=_note_foreign)


def load_train_config(path=None, overrides=()):
    return load_config(path, overrides, schema=TRAIN_SCHEMA)


def run_main(main, argv=None):
    try:
        main(argv)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

"""Entry-point helper: expected user errors end with one clear line, not a traceback."""
import sys

from .checkpoint import CheckpointError
from .config import ConfigError
from .data.tsv import DataError
from .tokenizer import VocabError

USER_ERRORS = (ConfigError, DataError, CheckpointError, VocabError, FileNotFoundError)


def run_main(main, argv=None):
    try:
        main(argv)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

"""Evaluate cross-modal retrieval from an embeddings file (drop-in for the official eval_retri.py);
see `python eval_retri.py -h` and packages/ernievil2/evaluate.py."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "packages"))

from ernievil2.evaluate import main  # noqa: E402

# Not ernievil2.cli.run_main: cli imports Paddle (~1 s), which evaluation never needs; main
# reports its own user errors as one line and returns the exit code.
if __name__ == "__main__":
    sys.exit(main())

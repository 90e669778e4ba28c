"""Embed a TSV with ERNIE-ViL 2.0 (called by run_infer.sh; see `python run_infer.py -h`)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "packages"))

from ernievil2.cli import run_main  # noqa: E402
from ernievil2.engine.infer import main  # noqa: E402

if __name__ == "__main__":
    run_main(main)

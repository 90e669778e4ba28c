"""One training process: `python run_train.py CONFIG [key=value ...]`.
run_train.sh (ernievil2-train) is the launcher: one process or several."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "packages"))

from ernievil2.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

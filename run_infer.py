"""One inference process, as the official run_infer.py: `python run_infer.py CONFIG [key=value ...]`.
run_infer.sh (ernievil2-infer) is the launcher: one process or several."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "packages"))

from ernievil2.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))

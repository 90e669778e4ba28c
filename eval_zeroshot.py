"""Zero-shot classification accuracy of a model on labelled images (top-1 / top-5 and chance);
see `python eval_zeroshot.py -h` and packages/ernievil2/zeroshot.py."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "packages"))

from ernievil2.zeroshot_cli import main  # noqa: E402

if __name__ == "__main__":
    main()

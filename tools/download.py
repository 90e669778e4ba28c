"""Fetch published weights and vocab by name into the cache (same as `ernievil2-download`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages"))
from ernievil2.download import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "packages"))

SHARED = Path(os.environ.get("ERNIEVIL2_SHARED", ROOT.parent / "shared")).resolve()
GOLDEN = SHARED / "golden"


def need_shared(*parts):
    """Return the path under ../shared, or skip the test saying which file is missing."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"reference data not found: {p} (../shared is absent; see README)")
    return p


@pytest.fixture(scope="session")
def shared_dir():
    return need_shared()

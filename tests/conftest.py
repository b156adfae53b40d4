import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The project's shared media folder (`../shared/data` beside the checkout, or $INFP_SHARED_DATA)."""
    path = Path(os.environ.get("INFP_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not (path / "manifest.csv").is_file():
        pytest.skip(f"shared data not found at {path}; set INFP_SHARED_DATA")
    return path

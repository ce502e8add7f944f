"""Shared fixtures. Real data is read from ../shared/data beside the checkout, never copied here."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data; skips the calling test with a clear reason when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not available: {p} is absent (it lives in ../shared/data beside the checkout)")
    return p


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return shared_path()

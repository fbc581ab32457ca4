"""Where the official-code fixtures live: ../shared/fixtures beside the checkout (see its README)."""

from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
requires_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"official fixtures not found at {FIXTURES}")

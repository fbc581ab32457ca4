"""Where the official-code fixtures live: tests/fixtures, shipped with the tests (see its README.md)."""

from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def requires_fixtures(test):
    """Marks a test that reads FIXTURES. The files ship with the tests, so a missing folder is an error when the
    test module is collected, never a skip."""
    if not FIXTURES.is_dir():
        raise FileNotFoundError(f"the official fixtures folder {FIXTURES} is missing from this checkout")
    return test

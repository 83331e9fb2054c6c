"""Shared fixtures: paths to the committed fixtures and the optional real data set."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
SHARED_DATA = ROOT.parent / "shared" / "data" / "all-aria"
#: Trusted keys for the tests: the fixture bundle is signed with the TEST-ONLY key here (never trust it on a box).
TEST_KEYS = FIXTURES / "keys"
TEST_KEY = TEST_KEYS / "TEST-ONLY-signing-key.pem"


def resign(bundle: Path) -> None:
    """Sign a test bundle's manifest as it is now with the TEST-ONLY key (what the signer does after a rebuild)."""
    from device.signing import sign_bundle

    sign_bundle(bundle, TEST_KEY)


@pytest.fixture(scope="session")
def smear_dir() -> Path:
    """32 real smear images, 8 per class (committed)."""
    return FIXTURES / "smear"


@pytest.fixture(scope="session")
def tiny_bundle_dir() -> Path:
    """A tiny bundle built by the toolchain's test path (committed)."""
    return FIXTURES / "bundle"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real smear set in ../shared/data; tests that need it skip, saying so, when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the real smear set at {SHARED_DATA} (CI has it; a fresh clone does not)")
    return SHARED_DATA

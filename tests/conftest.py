"""Suite-wide guards."""

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _restore_environment() -> Iterator[None]:
    """Give every test the environment the suite started with.

    Some libraries edit os.environ as they load (rpy2 prepends to LD_LIBRARY_PATH, which makes a
    Python started later load the system's libpython and lose its packages); without this, such an
    edit in one test would break the subprocesses of every test after it.
    """
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)

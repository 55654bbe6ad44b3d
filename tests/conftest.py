"""Suite-wide guards, and the fixtures that several test modules share."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from support.sampling import build_sampling_model_dir

# Every worker already collects every test module, and the model tests set these as they load:
# set once here, so that a single module run alone computes what it computes in the suite (two
# threads reduce in another order than a subprocess with one, and the kill tests compare tables).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sampling-job tests' tiny chat Llama, saved once per test module."""
    return build_sampling_model_dir(tmp_path_factory.mktemp("model") / "tiny")

"""Shared start of every workflow script: make the library importable and send logging to the rule's log.

Snakemake puts this directory on ``sys.path`` before running a ``script:``, so each script starts
with ``from script_setup import setup`` followed by ``log = setup(snakemake)``. The library under
``src/`` is used from the checkout even when it is not pip-installed (a conda env built from
``envs/`` holds only third-party packages), so results always come from the code beside the
Snakefile.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

_SRC = Path(__file__).resolve().parents[2] / "src"
# First, even when it is on the path already: an editable install of another checkout (a CI
# clone beside the developer's) would otherwise come before it and run that checkout's library.
while str(_SRC) in sys.path:
    sys.path.remove(str(_SRC))
sys.path.insert(0, str(_SRC))


#: Variables that switch the hub libraries off; they read them when first imported.
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def setup(smk, *, network: bool = False) -> logging.Logger:  # noqa: ANN001 - no importable type
    """Configure logging to the rule's log file (and stderr) and return the rule's logger.

    Only the fetching jobs pass ``network=True``: every other job has the hub switched off, even
    where the user's environment switched it on, so nothing but a fetch can reach the network and
    a job that would need a file that was not fetched fails at once instead of downloading it. A
    fetching job keeps the user's own setting (``HF_HUB_OFFLINE=1`` on an offline node makes it
    fail with the way out rather than hang).
    """
    if not network:
        for variable in OFFLINE_VARIABLES:
            os.environ[variable] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    log_files = list(getattr(smk, "log", []))
    if log_files:
        Path(log_files[0]).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_files[0], mode="w"))
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    # Thread limits through the environment, read when torch/numpy load: importing torch here would
    # cost every figure and statistics job a second for nothing.
    threads = str(int(getattr(smk, "threads", 1) or 1))
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[variable] = threads
    # Library warnings (a high truncation rate, a GLMM that did not converge cleanly) go to the
    # rule's log as well as stderr, where Snakemake's users look for them.
    logging.captureWarnings(True)
    logger = logging.getLogger(f"canopy.rule.{smk.rule}")

    # Without this an uncaught error reaches stderr only, and the rule's log, which Snakemake
    # points users to, would not say why the job failed.
    def log_uncaught(kind, error, trace) -> None:  # noqa: ANN001 - sys.excepthook's signature
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, error, trace)
            return
        logger.error("%s: %s", kind.__name__, error, exc_info=(kind, error, trace))

    sys.excepthook = log_uncaught
    return logger


def render_figure(
    smk,  # noqa: ANN001 - no importable type
    render: Callable[..., object],
    *inputs: object,
    **options: object,
) -> None:
    """Draw the rule's figure: ``render(*inputs, settings, pdf=..., png=..., **options)``, with the
    rule's figure settings (``params.settings``) and outputs, and log the files it wrote.

    Call it after :func:`setup`, with a render function of ``canopy.figures`` imported after it.
    """
    render(*inputs, smk.params.settings, pdf=smk.output.pdf, png=smk.output.png, **options)
    logging.getLogger(f"canopy.rule.{smk.rule}").info(
        "wrote %s and %s", smk.output.pdf, smk.output.png
    )

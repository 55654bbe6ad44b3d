"""A lost node during embedding: Snakemake and the embed_rollouts job are SIGKILLed together
between two tasks' files, the user unlocks and reruns the incomplete jobs, and the embeddings come
out bit-identical to an uninterrupted run's.

embed_rollouts keeps nothing for its next attempt: its output is one folder, which Snakemake
removes as incomplete, so the rerun embeds every task again and no file of the killed job is read
(docs/cluster.md, "What a killed job keeps")."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from support.workflow import REPO, kill_session_when, snakemake, start_snakemake

from canopy.diversity import load_embeddings

pytestmark = [pytest.mark.faults, pytest.mark.slow]

ROLLOUTS = "results/rollouts/default/tinyllama/base"
TARGET = "results/embeddings/default/minilm/tinyllama/base"
# Targets go before --configfile, which takes every argument after it as a config file.


def _config(workdir: Path) -> Path:
    config = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    # The job embeds the tasks in the config's order, completion then math (safe_dump sorts
    # keys): enough math rollouts, one per forward pass, that the job is still embedding them
    # (seconds) when completion's file lands and the kill is sent (in batches of 32 it embeds
    # them between two polls).
    config["tasks"]["math"]["n_prompts"] = 40
    config["embedders"]["minilm"]["batch_size"] = 1
    path = workdir / "faults.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_killed_embedding_job_is_redone_to_the_uninterrupted_embeddings(tmp_path: Path) -> None:
    config = str(_config(tmp_path))
    snakemake(
        tmp_path, "--cores", "2", f"{ROLLOUTS}/math.parquet", f"{ROLLOUTS}/completion.parquet",
        "--configfile", config,
    )  # fmt: skip
    folder = tmp_path / TARGET
    run = ["--cores", "1", TARGET, "--configfile", config]

    job = start_snakemake(tmp_path, *run)
    kill_session_when(job, lambda: any(folder.glob("*.npz")), "the first task's embeddings")
    assert len(list(folder.glob("*.npz"))) == 1, "the job finished before it could be killed"

    snakemake(tmp_path, "--unlock", "--configfile", config)
    rerun = snakemake(tmp_path, "--rerun-incomplete", *run)
    assert "embed_rollouts" in rerun.stderr + rerun.stdout, "the killed job was not rerun"
    log = (tmp_path / "logs/embeddings/default/minilm/tinyllama/base.log").read_text()
    for task in ("math", "completion"):
        assert f"of {ROLLOUTS}/{task}.parquet" in log, log[-2000:]
    assert sorted(p.name for p in folder.glob("*.npz")) == ["completion.npz", "math.npz"]

    # The same job, never interrupted.
    resumed = tmp_path / "resumed"
    shutil.move(folder, resumed)
    snakemake(tmp_path, *run)
    for name in ("math.npz", "completion.npz"):
        a, b = load_embeddings(resumed / name), load_embeddings(folder / name)
        assert np.array_equal(a.prompt_id, b.prompt_id) and np.array_equal(a.sample, b.sample)
        assert a.vectors.dtype == b.vectors.dtype
        assert a.vectors.tobytes() == b.vectors.tobytes(), f"{name}: the embeddings differ"

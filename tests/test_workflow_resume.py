"""Killing a real Snakemake sampling job loses no finished prompt, a shard damaged after the kill
is named in the log and redone, and the rerun's table equals an uninterrupted run's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from support.workflow import REPO, kill_session_when, snakemake, start_snakemake

TARGET = "results/rollouts/default/tinyllama/base/math.parquet"
# Enough prompts that the job is still running when its second shard lands, even when the test's
# polling is slowed by a busy machine (with 12, all shards have landed between two polls).
PROMPTS, ROLLOUTS = 24, 12
# Targets go before --configfile, which takes every argument after it as a config file.


def _config(workdir: Path) -> Path:
    config = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    config["tasks"]["math"]["n_prompts"] = PROMPTS
    # One prompt's rollouts in the batch at a time, so that shards land one after another: with
    # every prompt in one batch they all landed at the end, and the job could finish between two
    # polls (seen in a full suite run).
    config["sampling"]["default"].update(
        rollouts=ROLLOUTS, max_new_tokens=48, max_batch_rows=ROLLOUTS
    )
    path = workdir / "resume.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
@pytest.mark.faults
def test_killed_sampling_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    config = _config(tmp_path)
    snakemake(
        tmp_path, "--cores", "2", "resources/models/tinyllama/base", "--configfile", str(config)
    )
    shards = tmp_path / "results/rollouts/default/tinyllama/base/math.shards"

    job = start_snakemake(tmp_path, "--cores", "1", TARGET, "--configfile", str(config))
    # Lose the node once two shards have landed: SIGKILL snakemake and the job together, no chance
    # to clean up.
    kill_session_when(job, lambda: len(list(shards.glob("*.parquet"))) >= 2, "two shards")
    kept = sorted(shards.glob("*.parquet"))
    assert not (tmp_path / TARGET).exists(), "the job finished before it could be killed"
    assert 2 <= len(kept) < PROMPTS

    # One kept shard is then damaged (a disk error, a copy cut short): the resumed job must name
    # it and sample its prompt again, never read it as rows.
    damaged = kept[0]
    damaged.write_bytes(damaged.read_bytes()[:-100])

    # What a user does after a crash: unlock, rerun. Snakemake reruns the incomplete job, and the
    # job resumes from its intact shards.
    snakemake(tmp_path, "--unlock", "--configfile", str(config))
    snakemake(tmp_path, "--cores", "1", TARGET, "--configfile", str(config))
    log = (tmp_path / "logs/rollouts/default/tinyllama/base/math.log").read_text()
    assert f"resuming: {len(kept) - 1}/{PROMPTS} prompts already sampled" in log, log[-2000:]
    named = f"shard {damaged.relative_to(tmp_path)} is damaged"
    assert named in log and "its prompt is sampled again" in log, log[-2000:]
    assert not shards.exists()

    # The uninterrupted run of the same job: the same table, byte for byte.
    shutil.move(tmp_path / TARGET, tmp_path / "resumed.parquet")
    snakemake(tmp_path, "--cores", "1", TARGET, "--configfile", str(config))
    resumed = pd.read_parquet(tmp_path / "resumed.parquet")
    assert len(resumed) == PROMPTS * ROLLOUTS
    pd.testing.assert_frame_equal(resumed, pd.read_parquet(tmp_path / TARGET), check_exact=True)
    assert (tmp_path / "resumed.parquet").read_bytes() == (tmp_path / TARGET).read_bytes()


@pytest.mark.slow
def test_a_new_chunking_samples_no_finished_prompt_again(tmp_path: Path) -> None:
    """A user who changes `chunks` (more GPUs, or none) reruns the sampling jobs, as Snakemake
    must (the job layout changed), but no prompt is sampled a second time and the table is the
    same."""
    config = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    config["tasks"]["math"]["n_prompts"] = 6
    logs = tmp_path / "logs/rollouts/default/tinyllama/base"

    def run_with(chunks: int) -> pd.DataFrame:
        config["sampling"]["default"]["chunks"] = chunks
        path = tmp_path / f"chunks{chunks}.yaml"
        path.write_text(yaml.safe_dump(config))
        snakemake(tmp_path, "--cores", "2", TARGET, "--configfile", str(path))
        return pd.read_parquet(tmp_path / TARGET)

    first = run_with(2)
    for chunk, prompts in enumerate((3, 3)):
        log = (logs / f"math.chunks/{chunk}-of-2.log").read_text()
        assert log.count(" done: ") == prompts, log[-2000:]

    pd.testing.assert_frame_equal(run_with(3), first)
    for chunk in range(3):
        log = (logs / f"math.chunks/{chunk}-of-3.log").read_text()
        assert "reusing 2/2 prompts" in log and " done: " not in log, log[-2000:]
    chunk_dir = tmp_path / "results/rollouts/default/tinyllama/base/math.chunks"
    assert sorted(p.name for p in chunk_dir.iterdir()) == [f"{k}-of-3.parquet" for k in range(3)]

    pd.testing.assert_frame_equal(run_with(1), first)
    log = (logs / "math.log").read_text()
    assert "reusing 6/6 prompts" in log and " done: " not in log, log[-2000:]
    assert not chunk_dir.exists()

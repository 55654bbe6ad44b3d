"""A lost node during pre-training and during fine-tuning: Snakemake and its job are SIGKILLed
together, the user unlocks and reruns the incomplete jobs, and the models come out bit-identical
to an uninterrupted run's, with each resumed job's log saying what it kept."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from support.workflow import REPO, kill_session_when, snakemake, start_snakemake

pytestmark = [pytest.mark.faults, pytest.mark.slow]

MODELS = "resources/models/tinyllama"
TARGET = f"{MODELS}/finetuned"
# Targets go before --configfile, which takes every argument after it as a config file.


def _config(workdir: Path) -> Path:
    config = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    # Long enough to be killed after a few checkpoints, short enough for the suite.
    config["training"]["recipes"]["llama"].update(
        pretrain_steps=80, sft_steps=160, checkpoint_every=10
    )
    path = workdir / "faults.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _checkpoint(workdir: Path, variant: str, step: int) -> Path:
    return workdir / MODELS / f"{variant}.checkpoint" / f"step-{step:09d}.ckpt"


def _newest_step(workdir: Path, variant: str) -> int:
    """The step of the newest checkpoint a kill left (on a fast machine one more may have landed
    between seeing the awaited one and the kill)."""
    newest = max((workdir / MODELS / f"{variant}.checkpoint").glob("step-*.ckpt"))
    return int(newest.stem.removeprefix("step-"))


def test_killed_training_jobs_resume_to_the_uninterrupted_models(tmp_path: Path) -> None:
    config = str(_config(tmp_path))
    run = ["--cores", "1", TARGET, "--configfile", config]

    # A kill inside pre-training: Snakemake, the job, everything, with no chance to clean up.
    job = start_snakemake(tmp_path, *run)
    kill_session_when(job, _checkpoint(tmp_path, "base", 40).exists, "pre-training step 40")
    assert not (tmp_path / MODELS / "base").exists()
    base_step = _newest_step(tmp_path, "base")

    # What a user does after a crash: unlock, rerun the incomplete jobs. Killed again, this time
    # inside the fine-tune (the resumed pre-training has finished by then).
    snakemake(tmp_path, "--unlock", "--configfile", config)
    job = start_snakemake(tmp_path, "--rerun-incomplete", *run)
    kill_session_when(job, _checkpoint(tmp_path, "finetuned", 100).exists, "fine-tuning step 100")
    assert (tmp_path / MODELS / "base").is_dir() and not (tmp_path / TARGET).exists()
    finetuned_step = _newest_step(tmp_path, "finetuned")
    base_log = (tmp_path / "logs/models/tinyllama/base.log").read_text()
    assert f"pretrain resumed at step {base_step}/80" in base_log, base_log[-3000:]
    assert "kept the weights, optimizer, scheduler, RNG states and data position" in base_log

    snakemake(tmp_path, "--unlock", "--configfile", config)
    snakemake(tmp_path, "--rerun-incomplete", *run)
    finetuned_log = (tmp_path / "logs/models/tinyllama/finetuned.log").read_text()
    assert f"finetune resumed at step {finetuned_step}/160" in finetuned_log, finetuned_log[-3000:]
    for variant in ("base", "finetuned"):
        assert not (tmp_path / MODELS / f"{variant}.checkpoint").exists(), "checkpoint left"

    # The same jobs, never interrupted.
    resumed = tmp_path / "resumed"
    shutil.move(tmp_path / MODELS, resumed)
    snakemake(tmp_path, *run)
    for variant in ("base", "finetuned"):
        weights = Path(variant) / "model.safetensors"
        assert (resumed / weights).read_bytes() == (
            tmp_path / MODELS / weights
        ).read_bytes(), f"the resumed {variant} model differs from the uninterrupted one"

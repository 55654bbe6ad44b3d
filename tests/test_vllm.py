"""The vLLM backend for real: vLLM's CPU build (build/vllm, made by ``setup.sh --test``) samples a
random Llama-style model (head_dim 64) through the workflow's sampling rule.

One workflow run serves most tests (an engine start costs tens of seconds here): a vLLM job is
killed after its first shard and rerun, and a second sampling point with top-k off runs beside
it. The rows are then checked against the canopy code's own recomputation of every step
(teacher-forced: one full forward per rollout on the drawn tokens).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from workflow_helpers import REPO, SNAKEFILE, snakemake

from canopy.modeling import VARIANTS
from canopy.sampling import SamplingSettings
from canopy.sampling.distribution import entropy_from_log, processed_log_distribution
from canopy.sampling.shards import ROLLOUT_SCHEMA
from canopy.sampling.vllm import (
    CANDIDATES_WHEN_TOP_K_OFF,
    ENGINE_ARGS_VARIABLE,
    PYTHON_VARIABLE,
    VllmSampler,
)
from test_modeling import build_llama, build_tokenizer, save_model_dir

pytestmark = pytest.mark.vllm

VLLM_PYTHON = REPO / "build" / "vllm" / "bin" / "python"
# 2048 ids with the specials: more than the K = 1000 candidates of top-k off.
WORDS = [f"w{i}" for i in range(2048 - 7)]
# Every 20th id ends a rollout: about 60 % of the rollouts end before the cap, the rest run to it.
EOS = [2, *range(7, 2048, 20)]
PROMPTS = 6
DEFAULT = dict(rollouts=8, top_k=50, top_p=0.9, temperature=0.8, max_new_tokens=24)
TOP_K_OFF = dict(rollouts=4, top_k=0, max_new_tokens=12)
TABLE = "results/rollouts/{point}/{family}/base/math.parquet"


def engine_env() -> dict[str, str]:
    """Where vLLM is, and an engine that starts in seconds: no torch.compile, and the engine core
    in the worker's process (each process vLLM spawns imports it again, ~10 s here)."""
    assert VLLM_PYTHON.exists(), "no build/vllm: run `bash setup.sh --test` first"
    return {
        PYTHON_VARIABLE: str(VLLM_PYTHON),
        ENGINE_ARGS_VARIABLE: json.dumps({"enforce_eager": True}),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }


def build_vllm_model(path: Path, *, hidden: int = 256, logit_scale: float = 20) -> Path:
    """A random Llama (4 heads, so head_dim = hidden / 4) with a word-level tokenizer; the logit
    scale sets how peaked its rows are."""
    tokenizer = build_tokenizer(WORDS)
    model = build_llama(
        len(tokenizer), hidden=hidden, context=256, seed=3, eos=EOS, logit_scale=logit_scale
    )
    return save_model_dir(path, model, tokenizer)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A vLLM sampling job killed after its first shard, then the rerun of it together with a
    top-k-off point; returns the workdir, the shards that survived the kill and the model."""
    workdir = tmp_path_factory.mktemp("vllm_run")
    model_dir = build_vllm_model(workdir / "model")
    # Top-k off needs flatter rows: this one's tail beyond the top 1000 holds a few % of the mass.
    flat_dir = build_vllm_model(workdir / "flat", logit_scale=2.5)
    config = yaml.safe_load((REPO / "tests/configs/tiny.yaml").read_text())
    config["families"] = {
        family: {variant: {"source": "local", "path": str(path)} for variant in VARIANTS}
        for family, path in (("vl", model_dir), ("flat", flat_dir))
    }
    config["tasks"]["math"]["n_prompts"] = PROMPTS
    common = dict(backend="vllm", device="cpu", seed=11)
    # One prompt's rollouts at a time, so that the kill lands between two prompts' shards.
    config["sampling"] = {
        "default": {**DEFAULT, **common, "max_batch_rows": DEFAULT["rollouts"]},
        "topk0": {**TOP_K_OFF, **common},
    }
    config_path = workdir / "vllm.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = engine_env()
    snakemake(
        workdir, "--cores", "1", "resources/prompts/math.jsonl", "--configfile", str(config_path)
    )

    shards = workdir / "results/rollouts/default/vl/base/math.shards"
    command = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(workdir)]
    job = subprocess.Popen(
        [
            *command,
            "--cores",
            "1",
            TABLE.format(point="default", family="vl"),
            "--configfile",
            str(config_path),
        ],
        # vLLM's own default here: its engine core spawned from the job's worker, as a GPU user
        # runs it (the spawn start method must not re-run the Snakemake script).
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TZ": "UTC",
            **env,
            "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not any(shards.glob("*.parquet")) and time.monotonic() < deadline:
        assert job.poll() is None, "the vLLM sampling job ended before writing a shard"
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # snakemake, the job, the vLLM worker: no clean-up
    job.wait()
    kept = {
        str(shard.prompt_id.iloc[0]): shard
        for shard in map(pd.read_parquet, shards.glob("*.parquet"))
    }

    snakemake(workdir, "--unlock", "--configfile", str(config_path))
    targets = [
        TABLE.format(point="default", family="vl"),
        TABLE.format(point="topk0", family="flat"),
    ]
    snakemake(workdir, "--cores", "1", *targets, "--configfile", str(config_path), env=env)
    return {"workdir": workdir, "kept": kept, "model_dir": model_dir, "flat_dir": flat_dir}


def teacher_forced(model_dir: Path, table: pd.DataFrame, workdir: Path):
    """For every rollout, the model's logits at each of its steps: one forward of the prompt and
    the drawn tokens, in float32 as the canopy backend runs on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from canopy.modeling import format_prompt

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = {
        (record := json.loads(line))["prompt_id"]: record["prompt"]
        for line in (workdir / "resources/prompts/math.jsonl").read_text().splitlines()
    }
    for row in table.itertuples():
        prompt = format_prompt(tokenizer, prompts[row.prompt_id], "base", prompt_id=row.prompt_id)
        tokens = [int(t) for t in row.token_ids]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens])).logits[0].float()
        yield row, tokens, logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]


def test_sampling_rule_with_vllm_resumes_and_keeps_finished_prompts(run: dict) -> None:
    workdir = run["workdir"]
    kept = run["kept"]
    assert 0 < len(kept) < PROMPTS, "the kill did not land between two prompts"
    table = pd.read_parquet(workdir / TABLE.format(point="default", family="vl"))
    assert list(table.columns) == ROLLOUT_SCHEMA.names
    assert len(table) == PROMPTS * DEFAULT["rollouts"]
    assert (
        table.groupby("prompt_id")["sample"].apply(list).map(sorted).tolist()
        == [list(range(DEFAULT["rollouts"]))] * PROMPTS
    )
    for prompt_id, shard in kept.items():
        rows = table[table.prompt_id == prompt_id].reset_index(drop=True)
        pd.testing.assert_frame_equal(rows, shard.reset_index(drop=True)[list(table.columns)])
    log = (workdir / "logs/rollouts/default/vl/base/math.log").read_text()
    assert f"resuming: {len(kept)}/{PROMPTS} prompts" in log, log[-3000:]
    assert log.count(" done: ") == PROMPTS - len(kept), log[-3000:]
    assert "vLLM 0.32.0 on cpu" in log
    assert not (workdir / "results/rollouts/default/vl/base/math.shards").exists()
    # Rows follow the contract: EOS closes exactly the rollouts that end early, text is decoded.
    ended = table.token_ids.map(lambda t: int(t[-1]) in EOS)
    assert (table.hit_eos == ended).all() and (table.truncated == ~ended).all()
    assert (table.n_steps[~ended] == DEFAULT["max_new_tokens"]).all()
    assert ended.any() and (~ended).any(), "no mix of ended and truncated rollouts to check"
    assert (table.text.str.len() > 0).all()


def test_vllm_steps_equal_the_canopy_recomputation_when_top_k_fits(run: dict) -> None:
    table = pd.read_parquet(run["workdir"] / TABLE.format(point="default", family="vl"))
    settings = SamplingSettings(**DEFAULT)
    worst = 0.0
    for row, tokens, logits in teacher_forced(run["model_dir"], table, run["workdir"]):
        log_q, ids = processed_log_distribution(
            logits, settings.temperature, settings.top_k, settings.top_p
        )
        drawn = ids == torch.tensor(tokens).unsqueeze(-1)
        assert bool(drawn.any(-1).all()), f"{row.prompt_id}/{row.sample}: a token outside top-k"
        expected_logprob = log_q[drawn].double().numpy()
        expected_entropy = entropy_from_log(log_q).double().numpy()
        assert np.isfinite(expected_logprob).all(), "a drawn token that top-p removed"
        worst = max(
            worst,
            np.abs(np.asarray(row.step_entropy) - expected_entropy).max(),
            np.abs(np.asarray(row.step_logprob) - expected_logprob).max(),
        )
        assert row.sum_entropy == pytest.approx(math.fsum(row.step_entropy), abs=1e-9)
    assert worst <= 1e-4, worst


def test_top_k_off_warns_and_underestimates_within_the_tail_bound(run: dict) -> None:
    workdir = run["workdir"]
    log = (workdir / "logs/rollouts/topk0/flat/base/math.log").read_text()
    assert "underestimate" in log and "set top_k for exact values" in log
    table = pd.read_parquet(workdir / TABLE.format(point="topk0", family="flat"))
    assert len(table) == PROMPTS * TOP_K_OFF["rollouts"]
    largest_tail = 0.0
    for row, tokens, logits in teacher_forced(run["flat_dir"], table, workdir):
        log_p = torch.log_softmax(logits.double(), dim=-1)
        p = log_p.exp()
        vocab = p.shape[-1]
        kept = torch.zeros_like(p, dtype=torch.bool)
        kept.scatter_(-1, torch.topk(logits, CANDIDATES_WHEN_TOP_K_OFF, dim=-1).indices, True)
        kept[torch.arange(len(tokens)), torch.tensor(tokens)] = True  # the drawn token is sent too
        tail = (1 - (p * kept).sum(-1)).clamp(min=0).numpy()
        truth_h = entropy_from_log(log_p).numpy()
        truth_lq = log_p[torch.arange(len(tokens)), torch.tensor(tokens)].numpy()
        # Renormalising over the candidates raises each kept token's log-probability by exactly
        # -log(1 - tail) ...
        shift = np.asarray(row.step_logprob) - truth_lq
        np.testing.assert_allclose(shift, -np.log1p(-tail), atol=1e-4)
        # ... and loses the tail's share of the entropy, at most its binary entropy plus the
        # tail's mass times the log of its size.
        with np.errstate(divide="ignore", invalid="ignore"):
            binary = -np.where(tail > 0, tail * np.log(tail), 0.0) - (1 - tail) * np.log1p(-tail)
        bound = binary + tail * np.log(vocab - kept.sum(-1).numpy())
        underestimate = truth_h - np.asarray(row.step_entropy)
        assert (underestimate >= -1e-4).all() and (underestimate <= bound + 1e-4).all()
        largest_tail = max(largest_tail, float(tail.max()))
    assert largest_tail > 1e-3, "the tail beyond the candidates is too light to test the bound"


def test_missing_vllm_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert importlib.util.find_spec("vllm") is None, "this tier expects vLLM only in build/vllm"
    settings = SamplingSettings(backend="vllm", device="cpu")
    for python in (sys.executable, str(tmp_path / "no-such-python")):
        monkeypatch.setenv(PYTHON_VARIABLE, python)
        with pytest.raises(ImportError, match="backend 'vllm' needs the vllm package") as error:
            VllmSampler(tmp_path, settings, [2])
        assert python in str(error.value) and "backend: canopy" in str(error.value)


def test_a_model_the_cpu_build_cannot_serve_says_to_use_canopy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in engine_env().items():
        monkeypatch.setenv(name, value)
    model_dir = build_vllm_model(tmp_path / "head16", hidden=64)
    sampler = VllmSampler(
        model_dir, SamplingSettings(backend="vllm", device="cpu", rollouts=2), [2]
    )
    from canopy.sampling.batcher import PromptJob

    with pytest.raises(RuntimeError, match="head size 16") as error:
        sampler.sample_prompts([PromptJob("q0", [1, 9, 10])], lambda index, rows: None)
    assert "Use backend: canopy" in str(error.value)
    assert sampler.worker.process.poll() is not None

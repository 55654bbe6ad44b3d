"""The vLLM backend for real: vLLM's CPU build (build/vllm, made by ``setup.sh --test``) samples a
random Llama-style model (head_dim 64) through the workflow's sampling rule, and Gemma-3-270m's
real weights directly.

One workflow run serves most tests (an engine start costs tens of seconds here): a vLLM job is
killed after its first shard and rerun, and a second sampling point with top-k off runs beside
it. The rows are then checked against the canopy code's own recomputation of every step
(teacher-forced: one full forward per rollout on the drawn tokens). On Gemma-3-270m, every step's
entropy and log q computed inside the engine are checked against float64 from vLLM's own
processed logits of the same steps, at top-k 0, top-k 100, top-p 0.9 and min-p 0.1 (min-p also
in the workflow run's default point: vLLM applies it before top-k and top-p, as the canopy
backend does).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from support.workflow import (
    GEMMA,
    REPO,
    converted,
    kill_session_when,
    snakemake,
    start_snakemake,
)

from canopy.config import VARIANTS
from canopy.sampling import SamplingSettings
from canopy.sampling.distribution import entropy_from_log
from canopy.sampling.transforms import processed_log_distribution, vllm_sampling_params
from canopy.sampling.shards import ROLLOUT_SCHEMA
from canopy.sampling.vllm import ENGINE_ARGS_VARIABLE, PYTHON_VARIABLE, VllmSampler
from support.models import build_llama, build_tokenizer, save_model_dir

pytestmark = pytest.mark.vllm

VLLM_PYTHON = REPO / "build" / "vllm" / "bin" / "python"
# 2048 ids with the specials: more than the K = 1000 candidates of top-k off.
WORDS = [f"w{i}" for i in range(2048 - 7)]
# Every 20th id ends a rollout: about 60 % of the rollouts end before the cap, the rest run to it.
EOS = [2, *range(7, 2048, 20)]
PROMPTS = 6
DEFAULT = dict(rollouts=8, top_k=50, top_p=0.9, min_p=0.05, temperature=0.8, max_new_tokens=24)
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
    job = start_snakemake(
        workdir,
        "--cores",
        "1",
        TABLE.format(point="default", family="vl"),
        "--configfile",
        str(config_path),
        # vLLM's own default here: its engine core spawned from the job's worker, as a GPU user
        # runs it (the spawn start method must not re-run the Snakemake script).
        env={**env, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
    )
    # Snakemake, the job, the vLLM worker and its engine core: no clean-up.
    kill_session_when(job, lambda: any(shards.glob("*.parquet")), "the first shard")
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


@pytest.mark.faults
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


@pytest.mark.parametrize(
    "point, family, settings",
    [("default", "vl", DEFAULT), ("topk0", "flat", TOP_K_OFF)],
    ids=["top-k 50, top-p 0.9, min-p 0.05, T 0.8", "top-k 0 on flat rows"],
)
def test_vllm_steps_equal_the_canopy_recomputation(
    run: dict, point: str, family: str, settings: dict
) -> None:
    """Exact at every setting: with top-k off the old top-K reconstruction fell short by up to the
    tail beyond its 1000 candidates (several % of the mass on the flat model's rows)."""
    table = pd.read_parquet(run["workdir"] / TABLE.format(point=point, family=family))
    model_dir = run["model_dir"] if family == "vl" else run["flat_dir"]
    s = SamplingSettings(**settings)
    worst = 0.0
    for row, tokens, logits in teacher_forced(model_dir, table, run["workdir"]):
        log_q, ids = processed_log_distribution(logits, s)
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
    log = (run["workdir"] / f"logs/rollouts/{point}/{family}/base/math.log").read_text()
    assert "step entropies from its V1 sampler" in log and "underestimate" not in log


# The paper's settings, the two the old top-K reconstruction could not do exactly, and min-p.
GEMMA_SETTINGS = [
    dict(temperature=1.0, top_k=0, top_p=1.0),
    dict(temperature=1.0, top_k=100, top_p=1.0),
    dict(temperature=0.8, top_k=0, top_p=0.9),
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.1),
]


@pytest.mark.real_weights
def test_gemma_step_entropies_in_the_engine_equal_float64_of_its_processed_logits(
    tmp_path: Path,
) -> None:
    """Gemma-3-270m's 262,144-entry rows: each step's entropy and log q from the plugin equal a
    float64 computation from vLLM's own processed logits of the same steps (the same engine and
    seed, ``logprobs=-1``) to 1e-6, and the step-1 entropy the canopy backend's to 1e-4 (the same
    weights through transformers' forward instead of vLLM's)."""
    from transformers import AutoTokenizer

    from canopy.modeling import format_prompt, load_model
    from canopy.sampling import PromptJob, sample_prompts

    model_dir = converted(GEMMA, "gemma-3-270m")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = format_prompt(tokenizer, "The capital of France is", "base", prompt_id="q0")
    request = {
        "model": str(model_dir),
        "prompt": list(map(int, prompt)),
        "rollouts": 2,
        "max_tokens": 8,
        "seed": 5,
        "eos_ids": [int(tokenizer.eos_token_id)],
        "settings": [vllm_sampling_params(SamplingSettings(**s)) for s in GEMMA_SETTINGS],
    }
    (tmp_path / "request.json").write_text(json.dumps(request))
    env = {**os.environ, **engine_env(), "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run(
        [str(VLLM_PYTHON), str(REPO / "tests/support/vllm_truth.py"), "request.json", "result.npz"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = np.load(tmp_path / "result.npz")
    loaded = load_model(model_dir, device="cpu", dtype="float32")
    for i, setting in enumerate(GEMMA_SETTINGS):
        tokens = result[f"tokens_{i}"]
        # Same engine, seed and batch: the second request draws what the first did.
        np.testing.assert_array_equal(tokens, result[f"truth_tokens_{i}"])
        stepped = tokens >= 0
        assert stepped.sum() >= 8, "too few steps to compare"
        log_q = torch.log_softmax(torch.from_numpy(result[f"logits_{i}"]).double(), dim=-1)
        truth_h = entropy_from_log(log_q).numpy()
        drawn = torch.from_numpy(np.maximum(tokens, 0)).unsqueeze(-1)
        truth_log_q = log_q.gather(-1, drawn).squeeze(-1).numpy()
        np.testing.assert_allclose(result[f"entropy_{i}"][stepped], truth_h[stepped], atol=1e-6)
        np.testing.assert_allclose(result[f"log_q_{i}"][stepped], truth_log_q[stepped], atol=1e-6)

        settings = SamplingSettings(**setting, rollouts=1, max_new_tokens=1, seed=5)
        rows: list[dict] = []
        sample_prompts(
            loaded,
            [PromptJob("q0", prompt)],
            settings,
            eos_ids=request["eos_ids"],
            on_done=lambda index, done_rows: rows.extend(done_rows),
        )
        assert rows[0]["step_entropy"][0] == pytest.approx(result[f"entropy_{i}"][0, 0], abs=1e-4)


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

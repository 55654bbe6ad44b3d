"""The sampling transforms (canopy.sampling.transforms): which filters a sampling point turns on,
their order, how vLLM is told them, what they make of logits against the float64 oracle, and
min_p end to end through the workflow's sampling rule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from canopy.config import VARIANTS
from canopy.sampling import SamplingSettings, processed_distribution
from canopy.sampling.transforms import MinP, TopK, TopP, active_filters, vllm_sampling_params
from support.models import build_model_dir
from support.oracle import oracle_distribution
from support.workflow import REPO, snakemake


def test_each_filter_is_off_at_its_neutral_value_and_they_apply_in_vllms_order() -> None:
    assert active_filters(SamplingSettings(top_k=0)) == ()
    assert active_filters(SamplingSettings(top_k=0, top_p=1.0, min_p=0.0)) == ()
    assert active_filters(SamplingSettings(top_k=5, top_p=0.9, min_p=0.1)) == (
        MinP(0.1),
        TopK(5),
        TopP(0.9),
    )
    assert active_filters(SamplingSettings(top_k=0, top_p=0.5)) == (TopP(0.5),)


def test_vllm_is_told_the_temperature_and_exactly_the_filters_that_are_on() -> None:
    assert vllm_sampling_params(SamplingSettings(top_k=0, temperature=0.7)) == {"temperature": 0.7}
    assert vllm_sampling_params(SamplingSettings(top_k=50, top_p=0.9, min_p=0.05)) == {
        "temperature": 1.0,
        "min_p": 0.05,
        "top_k": 50,
        "top_p": 0.9,
    }


def test_min_p_applies_before_top_p() -> None:
    """Probabilities 0.5, 0.3, 0.15, 0.05 (temperature 1). min-p 0.4 drops the last two (below
    0.2), leaving 0.625 and 0.375; top-p 0.6 then keeps only the first (its mass 0.625 reaches
    0.6). transformers' order (top-p first: 0.5 + 0.3 reach it, then min-p drops nothing more)
    would keep two."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    settings = SamplingSettings(top_k=0, top_p=0.6, min_p=0.4)
    q, ids = processed_distribution(logits, settings)
    full = np.zeros(4)
    full[ids[0].numpy()] = q[0].numpy()
    np.testing.assert_allclose(full, [1.0, 0.0, 0.0, 0.0], atol=1e-15)
    only_min_p = processed_distribution(logits, SamplingSettings(top_k=0, min_p=0.4))
    kept = dict(zip(only_min_p[1][0].tolist(), only_min_p[0][0].tolist()))
    assert kept[0] == pytest.approx(0.625) and kept[1] == pytest.approx(0.375)
    assert kept[2] == kept[3] == 0.0


@pytest.mark.parametrize(
    "filters",
    [
        dict(top_k=0),
        dict(top_k=0, temperature=0.7),
        dict(top_k=10),
        dict(top_k=10, top_p=0.6, temperature=1.5),
        dict(top_k=0, top_p=0.3, temperature=0.8),
        dict(top_k=1),
        dict(top_k=0, min_p=0.1),
        dict(top_k=0, min_p=0.3, temperature=0.6),
        dict(top_k=10, min_p=0.05),
        dict(top_k=0, top_p=0.8, min_p=0.02, temperature=1.4),
        dict(top_k=20, top_p=0.9, min_p=0.2, temperature=0.9),
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_filters_equal_the_float64_oracle(filters: dict, dtype: torch.dtype) -> None:
    """From the model's logits in float64: the oracle's distribution to float64 rounding, over
    top-k's k candidates or the whole vocabulary."""
    generator = torch.Generator().manual_seed(5)
    logits = (3 * torch.randn(6, 300, generator=generator)).to(dtype)
    settings = SamplingSettings(**filters)
    q, ids = processed_distribution(logits, settings)
    assert q.dtype == torch.float64 and q.shape == ids.shape == (6, settings.top_k or 300)
    np.testing.assert_allclose(q.sum(1).numpy(), 1.0, atol=1e-12)
    full = np.zeros((6, 300))
    np.put_along_axis(full, ids.numpy(), q.numpy(), axis=1)
    expected, _ = oracle_distribution(logits, settings)
    np.testing.assert_allclose(full, expected, rtol=1e-12, atol=1e-15)
    if settings.min_p:
        without = oracle_distribution(logits, settings.model_copy(update={"min_p": 0.0}))[0]
        assert not np.array_equal(expected, without), "min-p drops nothing here: no test of it"


def test_min_p_off_leaves_the_sampling_keys_and_so_every_fingerprint_as_they_were() -> None:
    """Shard fingerprints and the sampling rule's params are made of to_dict: a run sampled before
    min_p existed must find its shards and finished jobs again; a run with min_p must not."""
    before = {
        "rollouts", "temperature", "top_k", "top_p", "max_new_tokens", "seed", "backend",
        "device", "dtype", "max_batch_rows", "max_batch_tokens", "chunks",
    }  # fmt: skip
    assert set(SamplingSettings().to_dict()) == before
    assert SamplingSettings(min_p=0).to_dict() == SamplingSettings().to_dict()
    assert SamplingSettings(min_p=0.1).to_dict()["min_p"] == 0.1


@pytest.mark.slow
def test_a_min_p_sweep_point_samples_exactly_through_the_workflow(tmp_path: Path) -> None:
    """The sampling rule with a min-p point: every rollout step, recomputed without the KV cache,
    has the oracle's entropy and log q, and no drawn token is one min-p drops."""
    model_dir = build_model_dir(tmp_path / "model", seed=2, logit_scale=4)
    config = yaml.safe_load((REPO / "tests/configs/tiny.yaml").read_text())
    config["families"] = {"mp": {v: {"source": "local", "path": str(model_dir)} for v in VARIANTS}}
    config["tasks"]["math"]["n_prompts"] = 2
    point = dict(rollouts=4, top_k=0, min_p=0.3, temperature=1.2, max_new_tokens=10, device="cpu")
    config["sampling"] = {"minp": point}
    (tmp_path / "minp.yaml").write_text(yaml.safe_dump(config))
    table_path = "results/rollouts/minp/mp/base/math.parquet"
    snakemake(tmp_path, "--cores", "1", table_path, "--configfile", str(tmp_path / "minp.yaml"))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from canopy.modeling import format_prompt

    table = pd.read_parquet(tmp_path / table_path)
    assert len(table) == 2 * point["rollouts"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = {
        (record := json.loads(line))["prompt_id"]: record["prompt"]
        for line in (tmp_path / "resources/prompts/math.jsonl").read_text().splitlines()
    }
    settings = SamplingSettings(**point)
    worst = 0.0
    dropped = 0
    for row in table.itertuples():
        prompt = format_prompt(tokenizer, prompts[row.prompt_id], "base", prompt_id=row.prompt_id)
        tokens = [int(t) for t in row.token_ids]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens])).logits[0]
        q, entropy = oracle_distribution(logits[len(prompt) - 1 : -1], settings)
        drawn_q = q[np.arange(len(tokens)), tokens]
        assert (drawn_q > 0).all(), f"{row.prompt_id}/{row.sample}: a token min-p drops"
        dropped += int((q == 0).sum())
        worst = max(
            worst,
            float(np.abs(np.asarray(row.step_entropy) - entropy).max()),
            float(np.abs(np.asarray(row.step_logprob) - np.log(drawn_q)).max()),
        )
        assert row.sum_logprob == pytest.approx(math.fsum(row.step_logprob), abs=1e-9)
    assert dropped > 0, "min-p dropped nothing: no test of it"
    # The cached, batched forward against one uncached forward: float32 noise in the logits only.
    assert worst < 1e-5, worst

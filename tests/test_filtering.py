"""Reward-model filtering: the top share per prompt, and the scorer against a tiny Llama reward
model built here from a config (random weights, a word-level tokenizer with a chat template)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from canopy.auxiliary_models import load_classifier  # noqa: E402
from canopy.prompts import Prompt, write_prompts  # noqa: E402
from canopy.filtering import (  # noqa: E402
    FilterSettings,
    RewardScorer,
    filter_rollouts,
    kept_count,
    select_top,
    write_filtered_rollouts,
)
from canopy.io import write_parquet  # noqa: E402
from support.models import CHAT_SPECIALS, build_nli_dir, llama_config, word_tokenizer  # noqa: E402

WORDS = "the cat dog sat ran on a mat big small far away and".split()
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <end_turn> "
    "{% endfor %}"
)


def tiny_reward_model(path, seed: int = 0):
    from transformers import LlamaForSequenceClassification

    tokenizer = word_tokenizer(CHAT_SPECIALS, WORDS, add_bos=False, chat_template=TEMPLATE)
    config = llama_config(len(tokenizer), num_labels=1)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_kept_count_rounds_half_up():
    assert kept_count(100, 0.7) == 70
    assert kept_count(16, 0.7) == 11  # 11.2
    assert kept_count(5, 0.7) == 4  # 3.5
    assert kept_count(3, 0.1) == 1  # at least one
    assert kept_count(8, 1.0) == 8 and kept_count(0, 0.7) == 0


def test_select_top_per_prompt_with_deterministic_ties():
    scores = pd.DataFrame(
        {
            "prompt_id": ["a"] * 4 + ["b"] * 3,
            "sample": [0, 1, 2, 3, 0, 1, 2],
            "reward": [0.5, 2.0, 0.5, -1.0, 3.0, 3.0, 3.0],
        }
    )
    # a: keep 3 of 4 (2.8 -> 3): 2.0, then the tie at 0.5 (samples 0 and 2); b: 2 of 3 (2.1 -> 2)
    assert select_top(scores, 0.7).tolist() == [True, True, True, False, True, True, False]


def test_settings_from_config_name_the_key():
    block = {"from": "default", "reward_model": {"model": "org/rm", "revision": "abc"}, "keep": 0.5}
    settings = FilterSettings.from_config(block, where="sampling.rm70.filter")
    assert (settings.source, settings.model, settings.revision, settings.keep) == (
        "default",
        "org/rm",
        "abc",
        0.5,
    )
    with pytest.raises(ValueError, match=r"sampling\.rm70\.filter\.keep"):
        FilterSettings.from_config({**block, "keep": 1.5}, where="sampling.rm70.filter")
    with pytest.raises(ValueError, match=r"sampling\.rm70\.filter\.reward_model"):
        FilterSettings.from_config({"from": "default"}, where="sampling.rm70.filter")
    with pytest.raises(ValueError, match=r"sampling\.rm70\.filter\.top"):
        FilterSettings.from_config({**block, "top": 3}, where="sampling.rm70.filter")


def _rollouts(rng: np.random.Generator, prompts: list[str], m: int) -> pd.DataFrame:
    rows = []
    for prompt in prompts:
        for sample in range(m):
            words = rng.choice(WORDS, size=rng.integers(1, 9))
            rows.append(
                {
                    "prompt_id": prompt,
                    "sample": sample,
                    "text": " ".join(words),
                    "n_steps": len(words) + 1,
                    "sum_logprob": -1.5 * (len(words) + 1),
                }
            )
    return pd.DataFrame(rows)


def test_scorer_batches_agree_with_one_pair_at_a_time(tmp_path):
    path = tiny_reward_model(tmp_path / "rm")
    scorer = RewardScorer(load_classifier(path, device="cpu"), batch_size=3)
    # The conversation as the reward model expects it: user turn, assistant turn, its specials.
    ids = scorer.encode("the cat sat", "a dog ran")
    assert scorer.tokenizer.convert_ids_to_tokens(ids) == [
        "<bos>",
        "<user>",
        "the",
        "cat",
        "sat",
        "<end_turn>",
        "<assistant>",
        "a",
        "dog",
        "ran",
        "<end_turn>",
    ]
    rng = np.random.default_rng(1)
    pairs = [
        (" ".join(rng.choice(WORDS, 3)), " ".join(rng.choice(WORDS, rng.integers(1, 12))))
        for _ in range(11)
    ]
    batched = scorer.score(pairs)
    single = []
    for prompt, answer in pairs:
        with torch.no_grad():
            logits = scorer.model(input_ids=torch.tensor([scorer.encode(prompt, answer)])).logits
        single.append(float(logits[0, 0]))
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-5)
    assert np.unique(np.round(batched, 6)).size > 5  # the scores differ: the check means something


def test_filter_keeps_the_best_scored_share_of_each_prompt(tmp_path):
    path = tiny_reward_model(tmp_path / "rm")
    rollouts = _rollouts(np.random.default_rng(2), ["p0", "p1", "p2"], 10)
    prompts = {"p0": "the cat", "p1": "a big dog", "p2": "the mat"}
    scorer = RewardScorer(load_classifier(path, device="cpu"), batch_size=4)
    kept, scores = filter_rollouts(rollouts, prompts, scorer, keep=0.7)
    assert len(kept) == 21 and (kept.groupby("prompt_id").size() == 7).all()
    for prompt, group in scores.groupby("prompt_id"):
        threshold = np.sort(group["reward"].to_numpy())[::-1][6]
        assert (group.loc[group["kept"], "reward"] >= threshold).all()
        assert (group.loc[~group["kept"], "reward"] <= threshold).all()
    # Kept rows are the original rows, unchanged, in table order.
    merged = rollouts.merge(kept, on=["prompt_id", "sample"], suffixes=("", "_kept"))
    assert (merged["text"] == merged["text_kept"]).all() and len(merged) == 21
    assert kept.equals(kept.sort_values(["prompt_id", "sample"]).reset_index(drop=True))

    # The file-level entry point, as the workflow calls it.
    write_parquet(rollouts, tmp_path / "r.parquet")
    write_prompts(
        [Prompt(p, "math", text, "test") for p, text in prompts.items()], tmp_path / "prompts.jsonl"
    )
    settings = FilterSettings(
        source="default", reward_model={"model": str(path)}, keep=0.7, batch_size=4, device="cpu"
    )
    written = write_filtered_rollouts(
        tmp_path / "r.parquet",
        tmp_path / "prompts.jsonl",
        tmp_path / "kept.parquet",
        tmp_path / "scores.parquet",
        settings,
    )
    np.testing.assert_allclose(written["reward"], scores["reward"], rtol=1e-6)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "kept.parquet"), kept)
    with pytest.raises(ValueError, match="no prompt text"):
        filter_rollouts(rollouts, {"p0": "x"}, scorer, keep=0.7)


# ------------------------------------------------------------------------------ the workflow


@pytest.mark.slow
def test_filter_and_semantic_entropy_rules_run_through_snakemake(tmp_path):
    """A filtered sweep point is made by filter_rollouts (not sampled), from the rollouts of its
    `from` entry, and the semantic-entropy stage runs on it with an NLI model from a directory."""
    import textwrap
    from pathlib import Path

    import yaml
    from support.workflow import snakemake

    repo = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((repo / "tests/configs/tiny.yaml").read_text())
    rm = tiny_reward_model(tmp_path / "rm")
    nli = build_nli_dir(tmp_path)
    config["sampling"]["rm50"] = {
        "filter": {
            "from": "default",
            "reward_model": {"model": str(rm)},
            "keep": 0.5,
            "batch_size": 4,
            "device": "cpu",
        }
    }
    config["diversity"] = {"semantic_entropy": {"model": str(nli), "device": "cpu"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    rollouts = _rollouts(np.random.default_rng(3), ["p0", "p1"], 6)
    write_parquet(rollouts, tmp_path / "results/rollouts/default/tinygpt/base/math.parquet")
    write_prompts(
        [Prompt("p0", "math", "the cat", "t"), Prompt("p1", "math", "a dog", "t")],
        tmp_path / "resources/prompts/math.jsonl",
    )
    (tmp_path / "Snakefile").write_text(textwrap.dedent(f"""
        configfile: "config.yaml"
        include: "{repo / 'workflow/rules/common.smk'}"
        include: "{repo / 'workflow/rules/rollouts.smk'}"
        include: "{repo / 'workflow/rules/filters.smk'}"
        include: "{repo / 'workflow/rules/diversity.smk'}"
        rule all:
            input: "results/semantic_entropy/rm50/tinygpt/base/math.parquet"
        """))
    run = snakemake(
        tmp_path,
        "--cores",
        "1",
        snakefile=tmp_path / "Snakefile",
        env={"PYTHONPATH": str(repo / "src"), "OMP_NUM_THREADS": "1"},
        check=False,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "rule filter_rollouts" in run.stderr and "rule sample_rollouts" not in run.stderr
    kept = pd.read_parquet(tmp_path / "results/rollouts/rm50/tinygpt/base/math.parquet")
    scores = pd.read_parquet(tmp_path / "results/rewards/rm50/tinygpt/base/math.parquet")
    assert len(kept) == 6 and len(scores) == 12 and int(scores["kept"].sum()) == 6
    semantic = pd.read_parquet(tmp_path / "results/semantic_entropy/rm50/tinygpt/base/math.parquet")
    assert sorted(semantic["prompt_id"]) == ["p0", "p1"]
    assert (semantic["n_semantic_clusters"].between(1, 3)).all()

"""Stop sequences (canopy.sampling.stops): a stop is a stopping time.

The canopy backend ends rows at the token that completes a stop string; a backend that cannot
match text (vLLM without detokenisation) returns longer rows, which sample_task cuts with the same
scanner. Checked against the enumerated canopy with the stop as its stopping rule (N and every
entropy exact), and by cutting rows sampled without the stop: same seeds give the same prefixes,
so the cut rows must be the rows sampled with it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from support.enumeration import enumerate_canopy, exact_canopy
from canopy.modeling import LoadedModel
from canopy.sampling import SamplingSettings, sample_prompt, sample_task
from canopy.sampling.shards import shard_dir_for
from canopy.sampling.stops import StopSequences, cut_at_stop
from support.models import build_llama, build_tokenizer
from support.sampling import PROMPTS, InterruptingLogger, Interrupted, write_prompts
from support.oracle import next_distribution_from

# Two words after the seven special tokens: a stop of two words is common enough to be sampled
# often, and the specials between them decode to nothing, so the stop spans 2 to 4 tokens.
STOP_WORDS = ["a", "b"]
STOP = "a b"
EOS = [2]
PROMPT = [1, 7, 8]
MAX_NEW = 4
SAMPLES = 3000


def test_the_sampler_with_a_stop_sequence_draws_the_enumerated_canopy_exactly() -> None:
    tokenizer = build_tokenizer(STOP_WORDS)
    model = build_llama(len(tokenizer), hidden=16, seed=3, eos=EOS)
    settings = SamplingSettings(
        rollouts=SAMPLES, max_new_tokens=MAX_NEW, seed=11, top_k=0, max_batch_rows=1500
    )

    def stop_in(tokens: tuple[int, ...]) -> bool:
        # The definition, on the whole decoded prefix (the scanner decodes incrementally).
        return STOP in tokenizer.decode(list(tokens), skip_special_tokens=True)

    leaves = enumerate_canopy(
        next_distribution_from(model, settings, PROMPT), EOS, MAX_NEW, ends=stop_in
    )
    exact = exact_canopy(leaves)
    by_tokens = {leaf.tokens: leaf for leaf in leaves}
    at_stop = {leaf.tokens for leaf in leaves if leaf.tokens[-1] not in EOS and leaf.hit_eos}
    assert math.isclose(sum(leaf.prob for leaf in leaves), 1.0, abs_tol=1e-9)

    loaded = LoadedModel(
        model=model, tokenizer=tokenizer, device=torch.device("cpu"), dtype=torch.float32
    )
    stops = StopSequences(tokenizer, [STOP])
    rows = sample_prompt(loaded, PROMPT, settings, prompt_id="p", eos_ids=EOS, stops=stops)
    ended_at_stop = spans = 0
    for row in rows:
        leaf = by_tokens[tuple(row["token_ids"])]  # a leaf: no rollout runs past a stop
        assert row["n_steps"] == leaf.length == len(row["step_entropy"])
        assert row["hit_eos"] == leaf.hit_eos and row["truncated"] == (not leaf.hit_eos)
        np.testing.assert_allclose(row["step_entropy"], leaf.step_entropies, rtol=0, atol=1e-5)
        assert row["sum_logprob"] == pytest.approx(math.log(leaf.prob), abs=1e-5)
        if leaf.tokens in at_stop:
            ended_at_stop += 1
            # N counts the token that completes the stop; the stop began some tokens before.
            tokens = row["token_ids"]
            start = max(j for j in range(len(tokens)) if stop_in(tuple(tokens[j:])))
            spans = max(spans, len(tokens) - start)
    assert ended_at_stop > 50, "too few rollouts ended at the stop to test it"
    assert spans >= 3, "no sampled stop spanned three tokens or more"
    # The chain-rule estimator of CE* agrees with the exact canopy under the stop.
    sums = np.array([row["sum_entropy"] for row in rows])
    assert abs(sums.mean() - exact.canopy_entropy) < 4 * sums.std(ddof=1) / math.sqrt(SAMPLES)


# Each spans two words (the space between them comes from the decoder).
TASK_STOPS = ["t s", "n a"]


def test_rows_sampled_past_a_stop_cut_there_are_the_rows_sampled_with_it(
    model_dir: Path, tmp_path: Path
) -> None:
    """The vLLM path's cut, applied to rows the canopy backend sampled without the stop: the same
    seeds draw the same prefixes, so each cut row must be the row sampled with the stop."""
    prompts = write_prompts(tmp_path / "t.jsonl", PROMPTS)
    settings = SamplingSettings(rollouts=6, max_new_tokens=24, top_k=8, seed=5)
    plain = sample_task(model_dir, prompts, "base", settings, tmp_path / "plain.parquet")
    stopped = sample_task(
        model_dir, prompts, "base", settings, tmp_path / "stop.parquet", stop_sequences=TASK_STOPS
    )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stops = StopSequences(tokenizer, TASK_STOPS)
    cut_rows = wasted = 0
    for (_, row), (_, expected) in zip(plain.iterrows(), stopped.iterrows()):
        cut, cut_steps = cut_at_stop(row.to_dict(), stops)
        wasted += cut_steps
        cut_rows += cut_steps > 0
        assert list(cut["token_ids"]) == list(expected["token_ids"])
        assert (cut["n_steps"], cut["hit_eos"], cut["truncated"]) == (
            expected["n_steps"],
            expected["hit_eos"],
            expected["truncated"],
        )
        # Other batch shapes round the model's kernels differently (about 1e-7).
        np.testing.assert_allclose(cut["step_entropy"], expected["step_entropy"], atol=1e-5)
        np.testing.assert_allclose(cut["step_logprob"], expected["step_logprob"], atol=1e-5)
        assert cut["sum_entropy"] == pytest.approx(math.fsum(cut["step_entropy"]), abs=1e-12)
        text = tokenizer.decode(list(expected["token_ids"]), skip_special_tokens=True)
        assert expected["text"] == text
        ends_at_stop = any(stop in text for stop in TASK_STOPS)
        if ends_at_stop:
            # The stop is completed by the last token, not before it.
            before = tokenizer.decode(list(expected["token_ids"])[:-1], skip_special_tokens=True)
            assert not any(stop in before for stop in TASK_STOPS)
            assert expected["hit_eos"] and not expected["truncated"]
    assert cut_rows >= 5 and wasted > cut_rows, "too few rollouts ran past a stop to test the cut"
    assert stopped["n_steps"].sum() < plain["n_steps"].sum()


def test_changed_stop_sequences_never_reuse_a_shard(model_dir: Path, tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "t.jsonl", PROMPTS)
    settings = SamplingSettings(rollouts=3, max_new_tokens=12, top_k=8, seed=5)
    # The same stops resume; fewer stops, or none, sample every prompt again.
    for number, (stops, resumes) in enumerate(
        [(TASK_STOPS, True), (TASK_STOPS[:1], False), ((), False)]
    ):
        output = tmp_path / f"r{number}.parquet"
        with pytest.raises(Interrupted):
            sample_task(
                model_dir,
                prompts,
                "base",
                settings,
                output,
                stop_sequences=TASK_STOPS,
                progress=InterruptingLogger(after=2),
            )
        assert len(list(shard_dir_for(output).iterdir())) == 2
        logger = InterruptingLogger(after=99)
        sample_task(
            model_dir, prompts, "base", settings, output, stop_sequences=stops, progress=logger
        )
        assert any("resuming: 2/" in message for message in logger.messages) == resumes
        assert pq.read_table(output).num_rows == 3 * len(PROMPTS)


def test_stop_sequences_must_be_strings() -> None:
    with pytest.raises(ValueError, match="non-empty strings"):
        StopSequences(build_tokenizer(), [""])

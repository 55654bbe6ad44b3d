"""canopy.sampling: settings, the processed distribution, determinism, resuming and errors.

Exactness against the enumerated canopy lives in test_sampling_exact.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from canopy.modeling import LoadedModel, ModelNotFoundError, load_model
from canopy.sampling import (
    NonFiniteLogitsError,
    PromptTooLongError,
    SamplingSettings,
    prompt_seed,
    sample_prompt,
    step_uniforms,
    sample_task,
    shard_dir_for,
)
from support.models import build_llama, build_model_dir, build_tokenizer, save_model_dir
from support.sampling import (
    PROMPTS,
    Interrupted,
    InterruptingLogger,
    RecordingLogger,
    write_prompts,
)

TESTS = Path(__file__).resolve().parent
SMALL = dict(rollouts=6, max_new_tokens=12, top_k=8, seed=5)


# --------------------------------------------------------------------------------- settings


def test_settings_defaults_are_the_papers() -> None:
    s = SamplingSettings()
    assert (s.rollouts, s.temperature, s.top_k, s.top_p, s.max_new_tokens, s.seed) == (
        100,
        1.0,
        100,
        1.0,
        4000,
        42,
    )
    assert (s.backend, s.device, s.dtype, s.max_batch_rows) == ("canopy", "auto", "auto", "auto")
    assert (s.max_batch_tokens, s.chunks) == (0, 1)


def test_settings_from_config_reads_every_key_and_rejects_unknown_ones() -> None:
    config = dict(
        rollouts=3,
        temperature=0.5,
        top_k=0,
        top_p=0.9,
        max_new_tokens=7,
        seed=1,
        backend="canopy",
        device="cpu",
        dtype="float32",
        max_batch_rows=2,
        max_batch_tokens=4096,
        chunks=3,
    )
    assert SamplingSettings.from_config(config).to_dict() == config
    integral = SamplingSettings.from_config({"temperature": 1, "top_p": 1})
    assert integral == SamplingSettings() and isinstance(integral.temperature, float)
    with pytest.raises(
        ValueError,
        match=r"(?s)sampling\.<name>\.topk = 5: unknown key.*tempreature = 1\.0: unknown",
    ):
        SamplingSettings.from_config({"topk": 5, "tempreature": 1.0})


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(temperature=0.0), "temperature\n  Input should be greater than 0"),
        (dict(top_p=0.0), "top_p\n  Input should be greater than 0"),
        (dict(top_p=1.5), "top_p\n  Input should be less than or equal to 1"),
        (dict(top_k=-1), "top_k\n  Input should be greater than or equal to 0"),
        (dict(rollouts=0), "rollouts\n  Input should be greater than or equal to 1"),
        (dict(max_new_tokens=2.5), "max_new_tokens\n  Input should be a valid integer"),
        (dict(backend="hf"), "backend\n  Input should be 'canopy' or 'vllm'"),
        (dict(dtype="fp8"), "dtype\n  Input should be 'auto'"),
        (
            dict(max_batch_rows=True),
            r"max_batch_rows\S*\n  Input should be a valid integer(?s:.*)Input should be 'auto'",
        ),
        (
            dict(max_batch_tokens=-1),
            "max_batch_tokens\n  Input should be greater than or equal to 0",
        ),
        (dict(chunks=0), "chunks\n  Input should be greater than or equal to 1"),
    ],
)
def test_invalid_settings_are_rejected_with_the_key(bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingSettings(**bad)


# ---------------------------------------------------------------------------- randomness


def test_prompt_seed_and_uniforms_are_pinned_values() -> None:
    # Fixed values: Python's hash() would change between processes (PYTHONHASHSEED), and a change
    # here would silently change every table, so it must be deliberate.
    assert prompt_seed(42, "p0") == 182591360661084812
    assert len({prompt_seed(42, "p0"), prompt_seed(42, "p1"), prompt_seed(43, "p0")}) == 3
    np.testing.assert_array_equal(
        step_uniforms(prompt_seed(42, "p0"), 3, 4),
        [0.5948509732895833, 0.4584255407563098, 0.48304471163638973, 0.4556474823897957],
    )
    # Rollout i's uniform does not depend on how many rollouts there are.
    assert step_uniforms(7, 2, 10)[:4].tolist() == step_uniforms(7, 2, 4).tolist()


# ------------------------------------------------------------------------------ one prompt


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    tokenizer = build_tokenizer()
    # Two EOS ids; a large logit scale gives a mix of short and long rollouts.
    model = build_llama(len(tokenizer), eos=[2, 6], seed=1)
    return LoadedModel(
        model=model, tokenizer=tokenizer, device=torch.device("cpu"), dtype=torch.float32
    )


PROMPT = [1, 7, 8, 9]


def test_rollouts_end_at_their_first_eos_or_at_max_new_tokens(tiny: LoadedModel) -> None:
    settings = SamplingSettings(rollouts=40, max_new_tokens=10, top_k=0, seed=3)
    rows = sample_prompt(tiny, PROMPT, settings, prompt_id="p", eos_ids=[2, 6])
    ended_by = set()
    for row in rows:
        tokens = row["token_ids"]
        assert row["n_steps"] == len(tokens) == len(row["step_entropy"]) == len(row["step_logprob"])
        assert not any(t in (2, 6) for t in tokens[:-1])
        if row["hit_eos"]:
            ended_by.add(tokens[-1])
            assert tokens[-1] in (2, 6) and not row["truncated"]
        else:
            assert row["truncated"] and row["n_steps"] == 10
        assert row["prompt_tokens"] == len(PROMPT)
        assert all(h >= 0 for h in row["step_entropy"]) and all(
            lp <= 0 for lp in row["step_logprob"]
        )
    assert ended_by == {2, 6}, "both EOS ids should end some rollout of this model"
    assert 0 < sum(r["truncated"] for r in rows) < 40


def test_same_seed_gives_identical_rows_and_another_seed_does_not(tiny: LoadedModel) -> None:
    settings = SamplingSettings(**SMALL)
    first = sample_prompt(tiny, PROMPT, settings, prompt_id="p", eos_ids=[2, 6])
    again = sample_prompt(tiny, PROMPT, settings, prompt_id="p", eos_ids=[2, 6])
    assert first == again
    other_seed = SamplingSettings(**{**SMALL, "seed": 6})
    other = sample_prompt(tiny, PROMPT, other_seed, prompt_id="p", eos_ids=[2, 6])
    assert [r["token_ids"] for r in other] != [r["token_ids"] for r in first]
    other_id = sample_prompt(tiny, PROMPT, settings, prompt_id="q", eos_ids=[2, 6])
    assert [r["token_ids"] for r in other_id] != [r["token_ids"] for r in first]


def test_batch_size_does_not_change_the_rollouts(tiny: LoadedModel) -> None:
    """Rollout i draws with a uniform that depends only on (seed, prompt, i, t)."""
    tables = []
    for rows_per_batch in (0, 4, 1):
        settings = SamplingSettings(**{**SMALL, "rollouts": 9, "max_batch_rows": rows_per_batch})
        tables.append(
            pd.DataFrame(sample_prompt(tiny, PROMPT, settings, prompt_id="p", eos_ids=[2, 6]))
        )
    for table in tables[1:]:
        for column in ("sample", "n_steps", "hit_eos", "truncated", "token_ids"):
            assert table[column].tolist() == tables[0][column].tolist()
        # CPU matrix kernels round differently for different batch shapes (~1e-7).
        for column in ("step_entropy", "step_logprob"):
            np.testing.assert_allclose(
                np.concatenate(table[column].tolist()),
                np.concatenate(tables[0][column].tolist()),
                atol=1e-5,
            )


def test_nan_logits_name_the_prompt_and_step() -> None:
    tokenizer = build_tokenizer()
    model = build_llama(len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight[5].fill_(float("nan"))
    loaded = LoadedModel(
        model=model, tokenizer=tokenizer, device=torch.device("cpu"), dtype=torch.float32
    )
    with pytest.raises(NonFiniteLogitsError, match=r"prompt 'p9'.*step 1.*bfloat16 or float32"):
        sample_prompt(loaded, PROMPT, SamplingSettings(**SMALL), prompt_id="p9", eos_ids=[2])


def test_too_long_prompt_names_the_prompt(tiny: LoadedModel) -> None:
    settings = SamplingSettings(**{**SMALL, "max_new_tokens": 100})
    with pytest.raises(PromptTooLongError, match=r"prompt 'long' has 30 tokens.*context of 128"):
        sample_prompt(tiny, [1] * 30, settings, prompt_id="long", eos_ids=[2])


# --------------------------------------------------------------------------------- a task


def test_task_table_has_the_contract_columns_and_decoded_text(
    model_dir: Path, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "t.jsonl", PROMPTS)
    output = tmp_path / "rollouts" / "t.parquet"
    log = RecordingLogger()
    frame = sample_task(
        model_dir, prompts, "finetuned", SamplingSettings(**SMALL), output, progress=log
    )
    stored = pq.read_table(output)
    assert stored.column_names == [
        "prompt_id",
        "sample",
        "prompt_tokens",
        "n_steps",
        "hit_eos",
        "truncated",
        "step_entropy",
        "step_logprob",
        "sum_entropy",
        "sum_logprob",
        "token_ids",
        "text",
    ]
    assert str(stored.schema.field("step_entropy").type) == "list<element: double>"
    assert str(stored.schema.field("token_ids").type) == "list<element: int64>"
    pd.testing.assert_frame_equal(frame, stored.to_pandas())
    assert frame["prompt_id"].tolist() == [pid for pid in PROMPTS for _ in range(6)]
    tokenizer = load_model(model_dir).tokenizer
    for _, row in frame.iterrows():
        assert row["text"] == tokenizer.decode(list(row["token_ids"]), skip_special_tokens=True)
        assert "<eos>" not in row["text"] and "<end_turn>" not in row["text"]
        assert row["sum_entropy"] == pytest.approx(sum(row["step_entropy"]))
    # The finetuned variant saw the chat template: <user> words <assistant>.
    assert frame.groupby("prompt_id")["prompt_tokens"].first().to_dict() == {
        pid: len(text.split()) + 2 for pid, text in PROMPTS.items()
    }
    assert not shard_dir_for(output).exists()
    assert any("prompt 6/6" in m and "tokens/s" in m and "ETA" in m for m in log.messages)


def test_prompt_order_and_subset_do_not_change_a_prompts_rollouts(
    model_dir: Path, tmp_path: Path
) -> None:
    settings = SamplingSettings(**SMALL)
    full = sample_task(
        model_dir,
        write_prompts(tmp_path / "a.jsonl", PROMPTS),
        "base",
        settings,
        tmp_path / "a.parquet",
    )
    subset = {pid: PROMPTS[pid] for pid in ("q4", "q1")}
    part = sample_task(
        model_dir,
        write_prompts(tmp_path / "b.jsonl", subset),
        "base",
        settings,
        tmp_path / "b.parquet",
    )
    for pid in subset:
        pd.testing.assert_frame_equal(
            full[full.prompt_id == pid].reset_index(drop=True),
            part[part.prompt_id == pid].reset_index(drop=True),
        )


def interrupted_run(
    model_dir: Path,
    prompts: Path,
    output: Path,
    settings: SamplingSettings = SamplingSettings(**SMALL),
    after: int = 1,
) -> Path:
    """Stop a base task after ``after`` prompts, as a killed job stops, leaving one shard per
    finished prompt behind; return the shard directory."""
    with pytest.raises(Interrupted):
        sample_task(
            model_dir, prompts, "base", settings, output, progress=InterruptingLogger(after=after)
        )
    shards = shard_dir_for(output)
    assert len(list(shards.glob("*.parquet"))) == after
    return shards


def test_interrupted_run_resumes_to_the_uninterrupted_table(
    model_dir: Path, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "t.jsonl", PROMPTS)
    settings = SamplingSettings(**SMALL)
    reference = tmp_path / "reference.parquet"
    sample_task(model_dir, prompts, "base", settings, reference)

    output = tmp_path / "run" / "t.parquet"
    interrupted_run(model_dir, prompts, output, settings, after=2)
    assert not output.exists()

    log = RecordingLogger()
    sample_task(model_dir, prompts, "base", settings, output, progress=log)
    assert any("resuming: 2/6" in m for m in log.messages)
    assert sum("done" in m for m in log.messages) == 4
    assert pq.read_table(output).equals(pq.read_table(reference))
    assert not shard_dir_for(output).exists()

    # A smaller max_batch_rows (the fix after running out of memory) keeps the finished prompts;
    # the draws are the same, the floats only up to the kernels' rounding for other batch shapes.
    interrupted_run(model_dir, prompts, output, settings, after=2)
    log = RecordingLogger()
    smaller = SamplingSettings(**{**SMALL, "max_batch_rows": 4})
    resumed = sample_task(model_dir, prompts, "base", smaller, output, progress=log)
    assert any("resuming: 2/6" in m for m in log.messages)
    expected = pq.read_table(reference).to_pandas()
    assert resumed["token_ids"].map(list).tolist() == expected["token_ids"].map(list).tolist()
    np.testing.assert_allclose(resumed["sum_entropy"], expected["sum_entropy"], rtol=1e-6)


def test_stale_shards_from_other_settings_or_prompt_text_are_not_reused(
    model_dir: Path, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "t.jsonl", PROMPTS)
    output = tmp_path / "t.parquet"
    interrupted_run(model_dir, prompts, output, after=3)
    hotter = SamplingSettings(**{**SMALL, "temperature": 1.7})
    log = RecordingLogger()
    table = sample_task(model_dir, prompts, "base", hotter, output, progress=log)
    assert not any("resuming" in m for m in log.messages)
    reference = sample_task(model_dir, prompts, "base", hotter, tmp_path / "reference.parquet")
    pd.testing.assert_frame_equal(table, reference)

    # Same settings but an edited prompt: only that prompt is resampled.
    interrupted_run(model_dir, prompts, output, hotter, after=3)
    edited = write_prompts(tmp_path / "edited.jsonl", {**PROMPTS, "q0": "a big dog"})
    log = RecordingLogger()
    sample_task(model_dir, edited, "base", hotter, output, progress=log)
    assert any("resuming: 2/6" in m for m in log.messages)


KILL_SCRIPT = textwrap.dedent("""
    import logging, sys, time
    from canopy.sampling import SamplingSettings, sample_task

    class Slow(logging.Handler):  # a slow consumer of progress: leaves time to kill between prompts
        def emit(self, record):
            time.sleep(1.0)

    log = logging.getLogger("progress")
    log.setLevel(logging.INFO)
    log.addHandler(Slow())
    model_dir, prompts, output = sys.argv[1:4]
    settings = SamplingSettings(rollouts=6, max_new_tokens=12, top_k=8, seed=5)
    sample_task(model_dir, prompts, "finetuned", settings, output, progress=log)
    """)


def test_sigkilled_run_resumes_to_the_uninterrupted_table(model_dir: Path, tmp_path: Path) -> None:
    """A real subprocess killed with SIGKILL after its first shard, then a rerun."""
    prompts = write_prompts(tmp_path / "t.jsonl", PROMPTS)
    output = tmp_path / "killed" / "t.parquet"
    shards = shard_dir_for(output)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(model_dir), str(prompts), str(output)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(shards.glob("*.parquet")) if shards.exists() else True:
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no shard appeared"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not output.exists()
    left = len(list(shards.glob("*.parquet")))
    assert 1 <= left < len(PROMPTS)

    settings = SamplingSettings(**SMALL)
    log = RecordingLogger()
    sample_task(model_dir, prompts, "finetuned", settings, output, progress=log)
    assert any(f"resuming: {left}/6" in m for m in log.messages)
    uninterrupted = tmp_path / "uninterrupted.parquet"
    sample_task(model_dir, prompts, "finetuned", settings, uninterrupted)
    assert pq.read_table(output).equals(pq.read_table(uninterrupted))


# ------------------------------------------------------------------------------- task errors


def test_prompt_errors_name_the_prompt_and_keep_the_shards(model_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "t.parquet"
    shards = interrupted_run(model_dir, write_prompts(tmp_path / "t.jsonl", PROMPTS), output)
    settings = SamplingSettings(**SMALL)

    empty = write_prompts(tmp_path / "empty.jsonl", {**PROMPTS, "q5": "  "})
    with pytest.raises(ValueError, match="prompt 'q5' is empty"):
        sample_task(model_dir, empty, "base", settings, output)

    too_long = write_prompts(tmp_path / "long.jsonl", {**PROMPTS, "q3": " ".join(["cat"] * 120)})
    with pytest.raises(PromptTooLongError, match="prompt 'q3' has 121 tokens"):
        sample_task(model_dir, too_long, "base", settings, output)

    duplicated = tmp_path / "dup.jsonl"
    duplicated.write_text(
        (tmp_path / "t.jsonl").read_text() + json.dumps({"prompt_id": "q0", "prompt": "a"})
    )
    with pytest.raises(ValueError, match=r"dup.jsonl:7: duplicate prompt_id 'q0'"):
        sample_task(model_dir, duplicated, "base", settings, output)

    assert len(list(shards.glob("*.parquet"))) == 1 and not output.exists()


def test_model_errors_name_the_path_and_keep_the_shards(tmp_path: Path) -> None:
    model_dir = build_model_dir(tmp_path / "model", chat_template=None)
    prompts = write_prompts(tmp_path / "t.jsonl", PROMPTS)
    output = tmp_path / "t.parquet"
    shards = interrupted_run(model_dir, prompts, output)
    settings = SamplingSettings(**SMALL)

    with pytest.raises(ValueError, match=r"prompt 'q0' for a finetuned model.*no chat template"):
        sample_task(model_dir, prompts, "finetuned", settings, output)

    missing = tmp_path / "models" / "fam" / "base"
    with pytest.raises(ModelNotFoundError, match=str(missing)):
        sample_task(missing, prompts, "base", settings, output)

    # The same directory retrained into a broken (NaN) model: the old shard is stale, not lost.
    tokenizer = build_tokenizer(chat_template=None)
    broken = build_llama(len(tokenizer))
    with torch.no_grad():
        broken.lm_head.weight.fill_(float("nan"))
    save_model_dir(model_dir, broken, tokenizer)
    with pytest.raises(NonFiniteLogitsError, match=r"prompt 'q0'.*step 1"):
        sample_task(model_dir, prompts, "base", settings, output)
    assert len(list(shards.glob("*.parquet"))) == 1 and not output.exists()


def test_stop_tokens_end_rollouts_exactly_like_eos_and_the_template_frames_the_base(
    model_dir: Path, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "t.jsonl", PROMPTS)
    settings = SamplingSettings(**{**SMALL, "max_new_tokens": 24})
    plain = sample_task(model_dir, prompts, "base", settings, tmp_path / "plain.parquet")
    framed = sample_task(
        model_dir,
        prompts,
        "base",
        settings,
        tmp_path / "framed.parquet",
        prompt_template="the {text} and",
        stop_tokens_containing=["at"],
    )
    tokenizer = load_model(model_dir).tokenizer
    stops = {tokenizer.convert_tokens_to_ids(word) for word in ("cat", "sat", "mat")}
    eos = {2, 6}
    # The template adds its two words to every prompt.
    assert (framed["prompt_tokens"] - plain["prompt_tokens"]).eq(2).all()
    ended_at_stop = 0
    for _, row in framed.iterrows():
        tokens = list(row["token_ids"])
        # No stop token before the last step; a rollout that ends there counts as ended.
        assert not (set(tokens[:-1]) & (stops | eos))
        if tokens[-1] in stops:
            ended_at_stop += 1
            assert row["hit_eos"] and not row["truncated"]
        assert len(row["step_entropy"]) == row["n_steps"] == len(tokens)
    assert ended_at_stop > 0
    assert framed["hit_eos"].mean() > plain["hit_eos"].mean()
    with pytest.raises(ValueError, match="no token .* contains 'zebra'"):
        sample_task(
            model_dir,
            prompts,
            "base",
            settings,
            tmp_path / "never.parquet",
            stop_tokens_containing=["zebra"],
        )
    with pytest.raises(ValueError, match="prompt_template applies to the base variant only"):
        sample_task(
            model_dir,
            prompts,
            "finetuned",
            settings,
            tmp_path / "chat.parquet",
            prompt_template="the {text}",
        )


def test_a_job_reads_the_tokenizer_and_configs_once(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The canopy backend loads the weights with the tokenizer and configs the job read, so a job
    reads each once; a misspelt framing key is refused rather than dropped."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    reads: dict[str, int] = {}

    def count(owner: type) -> None:
        read = owner.from_pretrained  # the real loader, bound to its class

        def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            reads[owner.__name__] = reads.get(owner.__name__, 0) + 1
            return read(*args, **kwargs)

        monkeypatch.setattr(owner, "from_pretrained", counted)

    for owner in (AutoTokenizer, AutoConfig, GenerationConfig):
        count(owner)
    prompts = write_prompts(tmp_path / "p.jsonl", dict(list(PROMPTS.items())[:2]))
    settings = SamplingSettings(rollouts=2, max_new_tokens=4, top_k=0, device="cpu")
    sample_task(model_dir, prompts, "finetuned", settings, tmp_path / "t.parquet")
    assert reads == {"AutoTokenizer": 1, "AutoConfig": 1, "GenerationConfig": 1}
    with pytest.raises(TypeError, match="stop_sequence"):
        sample_task(
            model_dir, prompts, "base", settings, tmp_path / "x.parquet", stop_sequence=["."]
        )


def test_a_models_identity_is_its_files_not_its_provenance_record(tmp_path) -> None:
    """The same weights made twice (a training record with other wall-clock seconds) have one
    identity, so their rollout tables carry the same fingerprints; any model file changes it."""
    from canopy.sampling.shards import model_identity
    from canopy.sources.record import LEGACY_RECORD_FILES, write_record

    (tmp_path / "config.json").write_text('{"vocab_size": 10}')
    (tmp_path / "tokenizer.json").write_text("{}")
    before = model_identity(tmp_path)
    write_record(tmp_path, "train", {"seconds": 1.0})
    (tmp_path / LEGACY_RECORD_FILES["hub"]).write_text('{"commit": "abc"}')
    assert model_identity(tmp_path) == before
    write_record(tmp_path, "train", {"seconds": 2.0})
    assert model_identity(tmp_path) == before
    (tmp_path / "config.json").write_text('{"vocab_size": 11}')
    assert model_identity(tmp_path) != before

"""Continuous batching and its KV caches, on tiny random models of the paper's architectures.

Every step's entropy and log-probability of the batched, cached sampler is compared with a
cache-free recomputation (a full forward pass of prompt + prefix), for Qwen3, Llama-3.1 (llama3
rope scaling), Gemma-3 with sliding-window layers (the text class and the multimodal
Gemma3ForConditionalGeneration); the tokens must equal the one-prompt-at-a-time sampler's whatever
the row and token budgets; chunked sampling gathered must equal an unchunked run.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from canopy.modeling import LoadedModel
from canopy.sampling import (
    BatchStats,
    PromptJob,
    SamplingSettings,
    chunk_prompts,
    chunk_table_path,
    gather_rollouts,
    processed_log_distribution,
    sample_prompt_dynamic,
    sample_prompts,
    sample_task,
    shard_dir_for,
)
from canopy.sampling import batcher as batcher_module
from canopy.sampling import cache as cache_module
from canopy.sampling.cache import ClassCache
from canopy.sampling.settings import BatchOutOfMemoryError
from support.models import (
    THINKING_TEMPLATE,
    THINKING_WORDS,
    TINY_VISION,
    build_llama,
    build_tokenizer,
    save_model_dir,
)
from support.sampling import (
    PROMPTS,
    Interrupted,
    InterruptingLogger,
    RecordingLogger,
    write_prompts,
)

VOCAB = 24
EOS = [2, 3]
WINDOW = 3


def _init(model, seed: int = 3):
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5 if parameter.ndim > 1 else 0.1)
    return model.eval()


def _common() -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=0,
    )


def _gemma3_text_config(attn: str):
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(
        **_common(),
        num_hidden_layers=3,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )
    config._attn_implementation = attn
    return config


def build(architecture: str, attn: str = "sdpa"):
    """A tiny random model of one of the paper's architectures (fixed seed)."""
    import transformers as tf

    if architecture == "qwen3":
        config = tf.Qwen3Config(**_common(), num_hidden_layers=2)
        config._attn_implementation = attn
        return _init(tf.Qwen3ForCausalLM(config))
    if architecture == "llama3.1":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        }
        config = tf.LlamaConfig(**_common(), num_hidden_layers=2, rope_parameters=rope)
        config._attn_implementation = attn
        return _init(tf.LlamaForCausalLM(config))
    if architecture == "gemma3":
        return _init(tf.Gemma3ForCausalLM(_gemma3_text_config(attn)))
    if architecture == "gemma3-multimodal":
        vision = tf.SiglipVisionConfig(**TINY_VISION, image_size=16, patch_size=8)
        config = tf.Gemma3Config(
            text_config=_gemma3_text_config(attn).to_dict(),
            vision_config=vision.to_dict(),
            mm_tokens_per_image=4,
            image_token_index=VOCAB - 1,
            boi_token_index=VOCAB - 2,
            eoi_token_index=VOCAB - 3,
        )
        config._attn_implementation = attn
        return _init(tf.Gemma3ForConditionalGeneration(config))
    raise ValueError(architecture)


def loaded(model) -> LoadedModel:
    return LoadedModel(model=model, tokenizer=None, device=torch.device("cpu"), dtype=torch.float32)


# Prompts of different lengths, all longer than the sliding window once a few tokens are drawn.
JOBS = [PromptJob(f"p{i}", [1] + [4 + (i * j) % 15 for j in range(3 + i)]) for i in range(3)]


def run(
    model, settings: SamplingSettings, jobs=JOBS, eos=EOS
) -> tuple[dict[str, list[dict]], BatchStats]:
    rows: dict[str, list[dict]] = {}
    stats = sample_prompts(
        loaded(model),
        jobs,
        settings,
        eos_ids=eos,
        on_done=lambda index, done: rows.__setitem__(jobs[index].prompt_id, done),
    )
    return rows, stats


def cache_free_errors(model, rows: dict[str, list[dict]], settings: SamplingSettings) -> tuple:
    """Largest |h_t - recomputed h_t| and |log q_t - recomputed| over every step of every row."""
    prompts = {job.prompt_id: list(job.token_ids) for job in JOBS}
    worst_h = worst_lq = 0.0
    steps = 0
    for prompt_id, prompt_rows in rows.items():
        for row in prompt_rows:
            for t, (h, lq) in enumerate(zip(row["step_entropy"], row["step_logprob"])):
                ids = torch.tensor([prompts[prompt_id] + row["token_ids"][:t]])
                with torch.no_grad():
                    logits = model(input_ids=ids).logits[:, -1, :]
                log_q, token_ids = processed_log_distribution(logits, settings)
                q = log_q.exp()
                truth = float(-torch.where(q > 0, q * log_q, torch.zeros_like(q)).sum())
                drawn = float(log_q[0, token_ids[0] == row["token_ids"][t]][0])
                worst_h, worst_lq = max(worst_h, abs(truth - h)), max(worst_lq, abs(drawn - lq))
                steps += 1
    return worst_h, worst_lq, steps


ARCHITECTURES = [
    ("qwen3", "sdpa"),
    ("llama3.1", "sdpa"),
    ("llama3.1", "eager"),
    ("gemma3", "sdpa"),
    ("gemma3", "eager"),
    ("gemma3-multimodal", "sdpa"),
]


@pytest.mark.parametrize("architecture, attn", ARCHITECTURES)
def test_every_step_matches_a_cache_free_recomputation(architecture: str, attn: str) -> None:
    model = build(architecture, attn)
    # 7 rows for 3 prompts x 5 rollouts: rows of different prompts share steps and are refilled.
    settings = SamplingSettings(rollouts=5, max_new_tokens=10, top_k=0, seed=2, max_batch_rows=7)
    rows, stats = run(model, settings)
    assert set(rows) == {job.prompt_id for job in JOBS}
    worst_h, worst_lq, steps = cache_free_errors(model, rows, settings)
    assert steps > 60
    assert worst_h < 1e-5 and worst_lq < 1e-5, (worst_h, worst_lq)
    # Rows of several prompts were in the batch at once (the 7 rows are refilled across prompts).
    assert max(stats.rows_per_step) == 7 and stats.prefills == len(JOBS)


def test_a_cache_that_ignored_the_sliding_window_would_fail_the_recomputation(monkeypatch) -> None:
    """The check above can fail: attend over every position on Gemma-3's sliding layers."""
    model = build("gemma3")
    monkeypatch.setattr(batcher_module, "sliding_window_of", lambda config: None)
    settings = SamplingSettings(rollouts=3, max_new_tokens=8, top_k=0, seed=2)
    rows, _ = run(model, settings, JOBS[:1])
    worst_h, _, _ = cache_free_errors(model, rows, settings)
    assert worst_h > 1e-3


@pytest.mark.parametrize("architecture", ["qwen3", "llama3.1", "gemma3", "gemma3-multimodal"])
def test_tokens_equal_the_one_prompt_sampler_whatever_the_budget(architecture: str) -> None:
    model = build(architecture)
    base = dict(rollouts=6, max_new_tokens=9, top_k=10, top_p=0.9, seed=7)
    reference = {
        job.prompt_id: sample_prompt_dynamic(
            loaded(model),
            job.token_ids,
            SamplingSettings(**base),
            prompt_id=job.prompt_id,
            eos_ids=EOS,
        )
        for job in JOBS
    }
    # dict(): auto, sized from the machine's memory (every rollout of the job in one batch);
    # auto with max_batch_tokens: as many rows as fit in the positions, here 4.
    budgets = [dict(), dict(max_batch_rows=0), dict(max_batch_rows=1), dict(max_batch_rows=4)]
    budgets += [dict(max_batch_rows=17), dict(max_batch_rows="auto", max_batch_tokens=64)]
    budgets.append(dict(max_batch_rows=0, max_batch_tokens=96))  # 1 row once 65+ long
    for budget in budgets:
        rows, _ = run(model, SamplingSettings(**base, **budget))
        for prompt_id, expected in reference.items():
            got = rows[prompt_id]
            assert [r["token_ids"] for r in got] == [r["token_ids"] for r in expected], budget
            assert [r["hit_eos"] for r in got] == [r["hit_eos"] for r in expected]
            np.testing.assert_allclose(
                np.concatenate([r["step_entropy"] for r in got]),
                np.concatenate([r["step_entropy"] for r in expected]),
                atol=1e-5,
            )


def test_auto_rows_fill_the_memory_left_with_every_row_at_its_longest() -> None:
    """auto: the rows whose keys and values at max_new_tokens (as the classes hold them) and
    logits fit in AUTO_MEMORY_SHARE of the free memory, at most the job's rollouts; with
    max_batch_tokens, the rows that fit in those positions. A job of 3 prompts x M=5 then runs
    rows of several prompts at once, and out of memory names the batch and what to lower."""
    model = build("llama3.1")
    job = loaded(model)
    settings = SamplingSettings(rollouts=5, max_new_tokens=9, top_k=10, seed=7)
    # 2 layers x (K, V) x 2 KV heads x 8 dims x 4 bytes; 4 + 9 positions held as 16 on CPU.
    row = 2 * 2 * 2 * 8 * 4 * 16 + batcher_module.LOGIT_ROW_COPIES * VOCAB * 4
    share = batcher_module.AUTO_MEMORY_SHARE
    for free, expected in [(0, 1), (int(3 * row / share) + 1, 3), (10**12, 15)]:
        assert batcher_module.auto_batch_rows(job, settings, 4, 15, free_bytes=free) == expected
    tokens = SamplingSettings(**{**settings.to_dict(), "max_batch_tokens": 100})
    assert batcher_module.auto_batch_rows(job, tokens, 4, 15) == 100 // 16
    rows, stats = run(model, settings)
    assert stats.row_budget == 15 and max(stats.rows_per_step) > settings.rollouts
    m_rows, m_stats = run(model, SamplingSettings(**{**settings.to_dict(), "max_batch_rows": 0}))
    assert m_rows == rows and m_stats.row_budget == 5


def test_out_of_memory_names_the_batch_and_what_to_lower(monkeypatch) -> None:
    def exhausted(self, on_done) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(batcher_module._Batcher, "step", exhausted)
    settings = SamplingSettings(rollouts=5, max_new_tokens=9, top_k=10, seed=7)
    with pytest.raises(
        BatchOutOfMemoryError,
        match=r"batch of 15 rows \(chosen by max_batch_rows: auto\).*max_batch_rows to fewer "
        r"rows \(e\.g\. 7\)",
    ):
        run(build("llama3.1"), settings)


def test_a_kv_budget_bounds_the_batch_and_rows_wait_without_changing_a_token() -> None:
    """Long rollouts (no EOS in reach): by default all rows run (one forward per step), moving up
    the length classes as they grow; with max_batch_tokens the positions held stay within it,
    rows that need more wait, and the rows are the same; a budget below one rollout's need is
    refused."""
    model = build_llama(VOCAB, context=512, seed=2)
    never = [VOCAB + 5]
    settings = SamplingSettings(rollouts=4, max_new_tokens=300, top_k=5, seed=1, max_batch_rows=0)
    jobs = [PromptJob("long", [1, 5, 6])]
    rows, stats = run(model, settings, jobs, never)
    assert [r["n_steps"] for r in rows["long"]] == [300] * 4
    # 3 + 299 positions: 19 x 16 held per row.
    assert stats.waits == 0 and stats.forwards == 299 and stats.peak_cache_tokens == 4 * 19 * 16
    # Each row was copied into the classes of 64, 128, 256 and 512 positions, once each.
    assert stats.migrations == 4 * 4
    # The default admission budget: 4 rows of 16, + 19 x 16 for one rollout's reserve.
    assert batcher_module.default_kv_budget(4, 3, 300) == (4 + 19) * 16
    tight = SamplingSettings(**{**settings.to_dict(), "max_batch_tokens": (4 + 19) * 16})
    again, stats_tight = run(model, tight, jobs, never)
    assert again == rows
    assert stats_tight.peak_cache_tokens <= (4 + 19) * 16 and stats_tight.waits > 0
    with pytest.raises(ValueError, match="max_batch_tokens=64 .* at least 304"):
        run(model, SamplingSettings(**{**settings.to_dict(), "max_batch_tokens": 64}), jobs, never)


def test_rollouts_hold_their_positions_rounded_to_pages() -> None:
    """A 40-token prompt and 6 rollouts of 5 tokens: at the last forward each row holds 44
    positions, counted as the 48 its pages cover, what the one-prompt sampler's rows hold
    (6 x 44) rounded up per row."""
    model = build_llama(VOCAB, context=512, seed=2)
    settings = SamplingSettings(rollouts=6, max_new_tokens=5, top_k=5, seed=1, max_batch_tokens=512)
    jobs = [PromptJob("forty", [1] + [4 + j % 15 for j in range(39)])]
    rows, stats = run(model, settings, jobs, [VOCAB + 5])
    assert [r["n_steps"] for r in rows["forty"]] == [5] * 6
    assert stats.peak_cache_tokens == 6 * 48
    # 40 prompt positions start in the class of 64: no row moved up, every end compacted or not.
    assert stats.migrations == 0


def test_class_layouts_and_growth_give_the_same_rows(monkeypatch) -> None:
    """The layout used off CPU (ordinary tensors growing by slots, a row holding its class
    length) and memory-mapped classes that start small and grow draw the same rows as mapped
    classes with a slot for every row; the dense one holds more."""
    model = build("gemma3")
    settings = SamplingSettings(rollouts=5, max_new_tokens=70, top_k=8, seed=3, max_batch_rows=9)
    mapped, stats = run(model, settings, eos=[2])
    assert stats.class_growths == 0 and stats.migrations > 0 and stats.compactions > 0
    monkeypatch.setattr(cache_module, "MAPPED_CLASS_BYTES", 1)  # one slot, then doubling
    grown, stats_grown = run(model, settings, eos=[2])
    assert grown == mapped and stats_grown.class_growths > 0
    monkeypatch.setattr(batcher_module, "ClassCache", functools.partial(ClassCache, mapped=False))
    monkeypatch.setattr(cache_module, "DENSE_CLASS_SLOTS", 2)
    dense, stats_dense = run(model, settings, eos=[2])
    assert dense == mapped and stats_dense.class_growths > 0
    assert stats_dense.migrations == stats.migrations
    assert stats_dense.peak_cache_tokens > stats.peak_cache_tokens


def test_the_default_budget_admits_fewer_rows_than_an_unbounded_batch(monkeypatch) -> None:
    """Many prompts with spread lengths, M rows: with max_batch_tokens 0 the batch admits rows
    while the positions held are within what the one-prompt sampler holds (its first step, then
    the most it held on a finished prompt), so it holds less than a batch bounded only by its
    rows, still with rows of several prompts per step, and the same rows; on CPU it admits
    CPU_BUDGET_FACTOR times that."""
    model = build_llama(VOCAB, context=512, seed=2)
    jobs = [PromptJob(f"p{i}", [1] + [4 + (i * j) % 15 for j in range(3 + i)]) for i in range(6)]
    settings = SamplingSettings(rollouts=8, max_new_tokens=120, top_k=8, seed=5, max_batch_rows=0)
    on_cpu, stats_on_cpu = run(model, settings, jobs, [2])
    monkeypatch.setattr(batcher_module, "CPU_BUDGET_FACTOR", 1.0)
    rows, stats = run(model, settings, jobs, [2])
    unbounded = SamplingSettings(**{**settings.to_dict(), "max_batch_tokens": 10**5})
    same, stats_unbounded = run(model, unbounded, jobs, [2])
    assert same == rows == on_cpu
    assert stats.peak_cache_tokens < stats_unbounded.peak_cache_tokens
    assert stats.peak_cache_tokens < stats_on_cpu.peak_cache_tokens
    one_prompt_rows = np.mean([max(r["n_steps"] for r in v) for v in rows.values()])
    assert stats.mean_rows > sum(r["n_steps"] for v in rows.values() for r in v) / (
        len(jobs) * one_prompt_rows
    )


def test_a_prompts_rows_are_bit_identical_whatever_shares_the_batch() -> None:
    """On CPU a prompt's floats, not only its tokens, do not depend on its neighbours, the
    budgets or the length classes its rows pass through, so resumed and chunked tables are equal."""
    model = build_llama(VOCAB, context=512, seed=2)
    eos = [2]  # rare enough that rows reach several length classes
    jobs = [PromptJob(f"p{i}", [1] + [4 + (i * j) % 15 for j in range(3 + i)]) for i in range(4)]
    settings = dict(rollouts=5, max_new_tokens=150, top_k=8, seed=5)
    full, _ = run(model, SamplingSettings(**settings), jobs, eos)
    assert max(r["n_steps"] for rows in full.values() for r in rows) > 64
    for subset, budget in [
        (jobs[2:], {}),
        (jobs[::-1], {"max_batch_rows": 3}),
        (jobs[1:2], {}),
        (jobs, {"max_batch_rows": 13, "max_batch_tokens": 256}),
    ]:
        part, _ = run(model, SamplingSettings(**settings, **budget), subset, eos)
        for prompt_id, rows in part.items():
            assert rows == full[prompt_id], (prompt_id, budget)


# ------------------------------------------------------------------------------------ chunks


def test_chunk_prompts_are_contiguous_slices_covering_every_prompt_once() -> None:
    prompts = list(range(10))
    slices = [chunk_prompts(prompts, k, 4) for k in range(4)]
    assert [len(s) for s in slices] == [2, 3, 2, 3]
    assert sum(slices, []) == prompts
    assert [chunk_prompts([1, 2], k, 3) for k in range(3)] == [[], [1], [2]]
    with pytest.raises(ValueError, match="chunk 4 is not in 0..3"):
        chunk_prompts(prompts, 4, 4)


def test_chunked_run_gathers_to_the_unchunked_table(model_dir: Path, tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "t.jsonl", PROMPTS)
    small = dict(rollouts=6, max_new_tokens=12, top_k=8, seed=5)
    unchunked = tmp_path / "whole.parquet"
    sample_task(model_dir, prompts, "finetuned", SamplingSettings(**small), unchunked)
    chunked = SamplingSettings(**small, chunks=4, max_batch_rows=5)
    gathered = tmp_path / "gathered.parquet"
    paths = [chunk_table_path(gathered, k, 4) for k in range(4)]
    assert paths[1] == tmp_path / "gathered.chunks" / "1-of-4.parquet"
    for k, path in enumerate(paths):
        sample_task(model_dir, prompts, "finetuned", chunked, path, chunk=k)
        assert not shard_dir_for(path).exists()
    assert [pq.read_table(p).num_rows for p in paths] == [6, 12, 6, 12]
    gather_rollouts(paths, prompts, gathered, progress=RecordingLogger())
    assert pq.read_table(gathered).equals(pq.read_table(unchunked))

    # A chunk written under a name that does not say its chunking is refused before sampling.
    with pytest.raises(ValueError, match=r"must be written to \{task\}\.chunks/2-of-4\.parquet"):
        sample_task(model_dir, prompts, "finetuned", chunked, tmp_path / "c" / "2.parquet", chunk=2)

    # Chunk tables of another prompt set (or in the wrong order) are refused.
    with pytest.raises(ValueError, match="resample the chunks"):
        gather_rollouts(list(reversed(paths)), prompts, tmp_path / "bad.parquet")
    assert not (tmp_path / "bad.parquet").exists()


def _sampled_and_reused(log: RecordingLogger) -> tuple[int, int]:
    """Prompts a sample_task run sampled, and prompts it took from another chunking."""
    sampled = sum(" done: " in m for m in log.messages)
    reused = [m for m in log.messages if m.startswith("reusing ")]
    return sampled, int(reused[0].split()[1].split("/")[0]) if reused else 0


def test_changing_the_chunking_samples_no_finished_prompt_again(
    model_dir: Path, tmp_path: Path
) -> None:
    """What a Snakemake run does when `chunks` changes, step by step: each job of the new
    chunking takes the finished prompts from what the old one left (the task table is still there
    while the new chunk jobs run; Snakemake deletes it only before the job that rewrites it)."""
    prompts = write_prompts(tmp_path / "t.jsonl", PROMPTS)  # 6 prompts
    settings = dict(rollouts=4, max_new_tokens=10, top_k=8, seed=5)
    task = tmp_path / "math.parquet"

    def run(chunks: int, chunk: int | None, log=None, **changes) -> tuple[int, int]:
        log = log or RecordingLogger()
        output = task if chunk is None else chunk_table_path(task, chunk, chunks)
        sampling = SamplingSettings(**{**settings, **changes}, chunks=chunks)
        sample_task(model_dir, prompts, "base", sampling, output, chunk=chunk, progress=log)
        return _sampled_and_reused(log)

    def gather(chunks: int) -> None:
        paths = [chunk_table_path(task, k, chunks) for k in range(chunks)]
        gather_rollouts(paths, prompts, task, progress=RecordingLogger())

    assert run(1, None) == (6, 0)
    whole = pq.read_table(task)

    # 1 -> 3 chunks: the unchunked table holds every prompt.
    assert [run(3, k) for k in range(3)] == [(0, 2)] * 3
    gather(3)
    assert pq.read_table(task).equals(whole)

    # 3 -> 2 chunks in the middle of a run: the gathered table is gone, chunk 2 of 3 was killed
    # after one of its two prompts; only the other one is sampled again.
    task.unlink()
    chunk_table_path(task, 2, 3).unlink()
    with pytest.raises(Interrupted):
        run(3, 2, log=InterruptingLogger(after=1))
    assert [run(2, k) for k in range(2)] == [(0, 3), (1, 2)]
    gather(2)
    assert pq.read_table(task).equals(whole)
    assert sorted(p.name for p in (tmp_path / "math.chunks").iterdir()) == [
        "0-of-2.parquet",
        "1-of-2.parquet",
    ]

    # Sampling again under the same chunking (a forced rerun) reuses nothing, nor does another
    # chunking with other settings.
    assert run(2, 0) == (3, 0)
    assert run(3, 0, seed=6) == (2, 0)
    chunk_table_path(task, 0, 3).unlink()

    # 2 chunks -> one job: Snakemake has deleted the table; the chunk tables hold every prompt,
    # and the chunk directory goes once the table is written.
    task.unlink()
    assert run(1, None) == (0, 6)
    assert pq.read_table(task).equals(whole)
    assert not (tmp_path / "math.chunks").exists()


# ------------------------------------------------------------------------------ chat options


def test_chat_options_enter_the_prompt_and_the_shard_fingerprint(tmp_path: Path) -> None:
    tokenizer = build_tokenizer(THINKING_WORDS, chat_template=THINKING_TEMPLATE)
    directory = save_model_dir(
        tmp_path / "model", build_llama(len(tokenizer), eos=[2, 6], seed=1), tokenizer
    )
    prompts = write_prompts(tmp_path / "t.jsonl", PROMPTS)
    settings = SamplingSettings(rollouts=6, max_new_tokens=12, top_k=8, seed=5)
    output = tmp_path / "t.parquet"
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    with pytest.raises(Interrupted):
        sample_task(
            directory,
            prompts,
            "finetuned",
            settings,
            output,
            progress=InterruptingLogger(after=2),
            **off,
        )
    # Other chat options: the two finished prompts are not reused.
    log = RecordingLogger()
    on = sample_task(
        directory,
        prompts,
        "finetuned",
        settings,
        output,
        chat_template_kwargs={"enable_thinking": True},
        progress=log,
    )
    assert not any("resuming" in m for m in log.messages)
    without = sample_task(
        directory, prompts, "finetuned", settings, tmp_path / "off.parquet", **off
    )
    lengths = {pid: len(text.split()) + 2 for pid, text in PROMPTS.items()}
    assert on.groupby("prompt_id")["prompt_tokens"].first().to_dict() == lengths
    assert without.groupby("prompt_id")["prompt_tokens"].first().to_dict() == {
        pid: n + 2 for pid, n in lengths.items()  # <think> </think> after <assistant>
    }
    with pytest.raises(ValueError, match="never reads enable_thinkng"):
        sample_task(
            directory,
            prompts,
            "finetuned",
            settings,
            tmp_path / "typo.parquet",
            chat_template_kwargs={"enable_thinkng": False},
        )
    with pytest.raises(ValueError, match="finetuned variant only"):
        sample_task(directory, prompts, "base", settings, tmp_path / "b.parquet", **off)


def test_bfloat16_models_run_through_the_slot_cache() -> None:
    """The dtype GPUs sample in: masks and cache buffers follow the model's dtype, and every step
    still matches the cache-free recomputation (to bfloat16's precision)."""
    model = build("qwen3").to(torch.bfloat16)
    settings = SamplingSettings(rollouts=4, max_new_tokens=8, top_k=0, seed=2, max_batch_rows=6)
    rows, _ = run(model, settings)
    worst_h, worst_lq, steps = cache_free_errors(model, rows, settings)
    assert steps > 30 and worst_h < 0.05 and worst_lq < 0.05, (worst_h, worst_lq)

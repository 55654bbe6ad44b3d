"""Killed training resumes from its checkpoints to the bits of an uninterrupted run.

Real training processes are SIGKILLed once a checkpoint has landed (no chance to clean up), then
run again; the weights must equal an uninterrupted run's byte for byte (the CPU is deterministic
at a fixed thread count). A truncated checkpoint is named in the log and skipped for the one
before it; a checkpoint of another recipe is never resumed.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.models import build_llama, build_turn_tokenizer, save_model_dir
from support.workflow import kill_session_when, start_in_session

from canopy.config.models import FinetuneRecipe
from canopy.sources.record import RECORD_FILE
from canopy.training import Recipe, pretrain_base
from canopy.training.checkpoint import Checkpoints, checkpoint_dir_for
from canopy.training.corpus import (
    pretraining_documents,
    read_documents,
    read_pairs,
    sft_pairs,
    write_documents,
    write_pairs,
)
from canopy.training.sft import finetune

pytestmark = pytest.mark.faults

# Long enough to be killed mid-way after a few checkpoints, short enough for the suite.
PRETRAIN = {
    "architecture": "llama",
    "tokenizer": "sentencepiece_bpe",
    "vocab_size": 512,
    "hidden_size": 32,
    "num_layers": 1,
    "num_heads": 2,
    "context_length": 128,
    "pretrain_steps": 80,
    "sft_steps": 1,
    "batch_size": 4,
    "seed": 3,
    "checkpoint_every": 10,
}
LORA = {"steps": 60, "batch_size": 4, "max_length": 128, "heldout_pairs": 4, "lora_rank": 4,
        "checkpoint_every": 10, "device": "cpu", "seed": 5, "chat_template": "gemma"}  # fmt: skip

# The training a killed subprocess runs: what the workflow's scripts call, on one thread.
_RUN = """
import json, sys
from canopy.config.models import FinetuneRecipe
from canopy.training import Recipe, pretrain_base
from canopy.training.corpus import read_documents, read_pairs
from canopy.training.sft import finetune
kind, recipe, source, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
if kind == "pretrain":
    pretrain_base(read_documents(source), Recipe.from_config(recipe), out, threads=1)
else:
    finetune(sys.argv[5], read_pairs(source), FinetuneRecipe.from_config(recipe), out, threads=1)
"""


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def _assert_identical(resumed: Path, uninterrupted: Path) -> None:
    # Byte equality of the files says everything; the tensors say where, should it fail.
    a, b = _tensors(resumed), _tensors(uninterrupted)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (resumed / "model.safetensors").read_bytes() == (
        uninterrupted / "model.safetensors"
    ).read_bytes()


def _killed_run(args: list[str], out: Path, at_step: int) -> list[tuple[int, Path]]:
    """Run the training of ``args`` in a subprocess and SIGKILL it once the checkpoint after
    ``at_step`` steps is written; returns the checkpoints it left as (step, path), oldest first
    (on a fast machine the next one may have landed before the kill: the caller takes what is
    there, not what it hoped for)."""
    job = start_in_session([sys.executable, "-c", _RUN, *args])
    directory = checkpoint_dir_for(out)
    kill_session_when(
        job,
        lambda: (directory / f"step-{at_step:09d}.ckpt").exists(),
        f"the checkpoint of step {at_step}",
    )
    assert not out.exists(), "the run finished before it was killed"
    kept = sorted(directory.glob("step-*.ckpt"))
    assert 1 <= len(kept) <= 2, "two checkpoints are kept, the newest and the one before"
    return [(int(path.stem.removeprefix("step-")), path) for path in kept]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    write_documents(pretraining_documents(120, seed=3), root / "pretrain.jsonl")
    write_pairs(sft_pairs(60, seed=3), root / "sft.jsonl")
    return root


@pytest.fixture(scope="module")
def uninterrupted(data: Path) -> Path:
    """The base model trained in one go (and the reference for every resumed run)."""
    documents = read_documents(data / "pretrain.jsonl")
    pretrain_base(documents, Recipe.from_config(PRETRAIN), data / "base", threads=1)
    assert not checkpoint_dir_for(data / "base").exists(), "checkpoints outlived the output"
    return data / "base"


def _resume(kind: str, recipe: dict, data: Path, base: Path | None, out: Path, caplog) -> str:
    """Run the training of ``kind`` in this process (to the end) and return its log."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        if kind == "pretrain":
            documents = read_documents(data / "pretrain.jsonl")
            pretrain_base(documents, Recipe.from_config(recipe), out, threads=1)
        else:
            pairs = read_pairs(data / "sft.jsonl")
            finetune(base, pairs, FinetuneRecipe.from_config(recipe), out, threads=1)
    return caplog.text


def test_killed_pretraining_resumes_bit_identically(data, uninterrupted, tmp_path, caplog):
    out = tmp_path / "base"
    args = ["pretrain", json.dumps(PRETRAIN), str(data / "pretrain.jsonl"), str(out)]
    step, _ = _killed_run(args, out, at_step=40)[-1]
    log = _resume("pretrain", PRETRAIN, data, None, out, caplog)
    assert f"pretrain resumed at step {step}/80" in log
    assert "kept the weights, optimizer, scheduler, RNG states and data position" in log
    _assert_identical(out, uninterrupted)
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["resumed_at_steps"] == [step]
    assert record["loss"] == json.loads((uninterrupted / RECORD_FILE).read_text())["loss"]
    assert not checkpoint_dir_for(out).exists(), "the checkpoints outlived the output"


def test_writing_checkpoints_changes_no_weight(data, uninterrupted, tmp_path):
    # The reference wrote 7 checkpoints; a run that writes none must end on the same bytes
    # (writing one reads the state and draws no random number).
    out = tmp_path / "base"
    recipe = Recipe.from_config({**PRETRAIN, "checkpoint_every": PRETRAIN["pretrain_steps"]})
    pretrain_base(read_documents(data / "pretrain.jsonl"), recipe, out, threads=1)
    _assert_identical(out, uninterrupted)


def test_a_truncated_checkpoint_is_named_and_the_one_before_used(
    data, uninterrupted, tmp_path, caplog
):
    out = tmp_path / "base"
    args = ["pretrain", json.dumps(PRETRAIN), str(data / "pretrain.jsonl"), str(out)]
    (before, _), (_, newest) = _killed_run(args, out, at_step=30)
    data_bytes = newest.read_bytes()
    newest.write_bytes(data_bytes[: len(data_bytes) // 2])  # a disk that lost the file's end
    log = _resume("pretrain", PRETRAIN, data, None, out, caplog)
    assert f"checkpoint {newest} is damaged (truncated" in log
    assert f"pretrain resumed at step {before}/80" in log
    _assert_identical(out, uninterrupted)


@pytest.fixture(scope="module")
def turn_base(data: Path) -> Path:
    """A base whose tokenizer holds Gemma's turn tokens, so that the LoRA run also trains their
    embedding rows (peft's trainable tokens) and its checkpoints must carry them."""
    tokenizer = build_turn_tokenizer(read_pairs(data / "sft.jsonl"))
    model = build_llama(len(tokenizer), hidden=32, context=256, seed=4)
    return save_model_dir(data / "turn_base", model, tokenizer)


def test_killed_lora_finetune_resumes_bit_identically(data, turn_base, tmp_path, caplog):
    reference = tmp_path / "uninterrupted"
    _resume("finetune", LORA, data, turn_base, reference, caplog)
    assert json.loads((reference / RECORD_FILE).read_text())["turn_tokens"]
    out = tmp_path / "finetuned"
    args = ["finetune", json.dumps(LORA), str(data / "sft.jsonl"), str(out), str(turn_base)]
    step, _ = _killed_run(args, out, at_step=30)[-1]
    log = _resume("finetune", LORA, data, turn_base, out, caplog)
    assert f"finetune resumed at step {step}/60" in log
    _assert_identical(out, reference)


def test_a_changed_recipe_never_resumes_a_stale_checkpoint(tmp_path, caplog):
    log = logging.getLogger("test")
    old = Checkpoints(tmp_path / "model", {"recipe": {"learning_rate": 1e-3}}, 10, log)
    old.save(10, {"step": torch.tensor(10)})
    assert old.load() is not None
    new = Checkpoints(tmp_path / "model", {"recipe": {"learning_rate": 2e-3}}, 10, log)
    with caplog.at_level(logging.INFO):
        assert new.load() is None
    assert "is of another recipe or input: not resumed, removed" in caplog.text
    assert not list(checkpoint_dir_for(tmp_path / "model").glob("*.ckpt"))


def test_a_corrupt_checkpoint_is_never_unpickled(tmp_path, caplog):
    log = logging.getLogger("test")
    checkpoints = Checkpoints(tmp_path / "model", {"stage": "pretrain"}, 5, log)
    first = checkpoints.save(5, {"weights": torch.arange(4.0)})
    second = checkpoints.save(10, {"weights": torch.arange(4.0) + 1})
    third = checkpoints.save(15, {"weights": torch.arange(4.0) + 2})
    assert not first.exists(), "only the newest two are kept"
    raw = bytearray(third.read_bytes())
    raw[-5] ^= 0xFF  # one flipped byte in the payload: same size, another checksum
    third.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        step, state = checkpoints.load()
    assert f"checkpoint {third} is damaged (checksum mismatch)" in caplog.text
    assert step == 10 and torch.equal(state["weights"], torch.arange(4.0) + 1)
    assert second.exists() and not third.exists()


def test_a_kill_during_a_write_leaves_nothing_that_is_read(tmp_path, caplog):
    log = logging.getLogger("test")
    checkpoints = Checkpoints(tmp_path / "model", {"stage": "pretrain"}, 5, log)
    good = checkpoints.save(5, {"weights": torch.arange(3.0)})
    # What a kill inside a write leaves: the temporary file atomic_path writes to, never renamed.
    partial = checkpoints.directory / ".step-000000010.ckpt.x1y2.tmp"
    partial.write_bytes(good.read_bytes()[:100])
    # And a file under a checkpoint's name that is none (written by something else).
    stranger = checkpoints.directory / "step-000000015.ckpt"
    stranger.write_bytes(b"PK\x03\x04 not ours")
    with caplog.at_level(logging.WARNING):
        step, state = checkpoints.load()
    assert step == 5 and torch.equal(state["weights"], torch.arange(3.0))
    assert f"checkpoint {stranger} is damaged (not a checkpoint file (no header))" in caplog.text
    assert str(partial) not in caplog.text
    checkpoints.clear()
    assert not checkpoints.directory.exists()

"""canopy.training.sft: the one fine-tune path, here for a fine-tuned variant made from any base
model directory (a trained family's fine-tune is tested in test_training).

Real tiny transformers models (random weights, fixed seed), a real word-level tokenizer holding
Gemma's turn tokens, real peft adapters, and the corpus' real instruction pairs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from canopy.config.models import FinetuneRecipe  # noqa: E402
from canopy.modeling import end_of_turn_ids, format_prompt  # noqa: E402
from canopy.training.corpus import sft_pairs  # noqa: E402
from canopy.sources.record import RECORD_FILE  # noqa: E402
from canopy.training.chat import CHAT_TEMPLATES, packaged_chat_template  # noqa: E402
from canopy.training.sft import FinetuneError, finetune  # noqa: E402
from support.models import build_llama, build_turn_tokenizer, save_model_dir  # noqa: E402

PAIRS = sft_pairs(48, seed=3)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = build_turn_tokenizer(PAIRS)
    model = build_llama(len(tokenizer), hidden=32, context=256, seed=4)
    return save_model_dir(tmp_path_factory.mktemp("base") / "base", model, tokenizer)


def recipe(**changes) -> FinetuneRecipe:
    values = dict(
        steps=30,
        learning_rate=1e-2,
        batch_size=4,
        max_length=128,
        lora_rank=8,
        chat_template="gemma",
        heldout_pairs=8,
        warmup_fraction=0.1,
    )
    return FinetuneRecipe(**{**values, **changes})


def test_a_lora_fine_tune_lowers_the_heldout_loss_and_saves_an_ordinary_directory(
    base_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "finetuned"
    record = finetune(base_dir, PAIRS, recipe(), out, threads=1)
    # Rank-8 adapters on a random 32-wide model with its output layer frozen learn little of
    # an 800-word vocabulary, but steadily: 6.71 -> 6.58 nats.
    assert record["heldout_loss_after"] < record["heldout_loss_before"] - 0.1
    assert record["parameters"] < 20_000  # the adapters, not the model
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["source"] == "finetune" and record["heldout_pairs"] == 8
    # Merged: no adapter files, the plain architecture, loadable offline.
    assert not any("adapter" in p.name for p in out.iterdir())
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not any("lora" in name for name, _ in model.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tokenizer.chat_template == packaged_chat_template("gemma")
    end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn_ids(tokenizer) == [end] == [record["end_of_turn_id"]]
    assert end in model.generation_config.eos_token_id
    # The turn tokens' embeddings were trained with the adapters; no other row moved.
    turns = [tokenizer.convert_tokens_to_ids(t) for t in ("<start_of_turn>", "<end_of_turn>")]
    assert record["turn_tokens"] == turns
    base = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True)
    moved = (model.model.embed_tokens.weight != base.model.embed_tokens.weight).any(dim=1)
    assert moved.nonzero().flatten().tolist() == turns
    prompt = tokenizer.decode(format_prompt(tokenizer, "model user", "finetuned"))
    assert prompt == "<bos> <start_of_turn> user model user <end_of_turn> <start_of_turn> model"


def test_a_full_fine_tune_keeps_the_embeddings_frozen_unless_asked(
    base_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True)
    record = finetune(
        base_dir, PAIRS, recipe(lora_rank=0, steps=6, learning_rate=1e-3), tmp_path / "f"
    )
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "f", local_files_only=True)
    assert torch.equal(before.model.embed_tokens.weight, after.model.embed_tokens.weight)
    assert torch.equal(before.lm_head.weight, after.lm_head.weight)
    assert not torch.equal(
        before.model.layers[0].mlp.up_proj.weight, after.model.layers[0].mlp.up_proj.weight
    )
    assert record["heldout_loss_after"] < record["heldout_loss_before"]
    with pytest.raises(ValueError, match="train_embeddings applies to full fine-tuning"):
        recipe(train_embeddings=True)


def test_a_base_without_a_chat_template_needs_a_packaged_one_and_nothing_is_left_behind(
    base_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "finetuned"
    with pytest.raises(FinetuneError, match="has no chat template .* packaged one"):
        finetune(base_dir, PAIRS, recipe(chat_template="model"), out)
    with pytest.raises(FinetuneError, match="none left after holding out"):
        finetune(base_dir, PAIRS[:8], recipe(), out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_the_packaged_chat_templates_are_the_trained_families_and_gemmas() -> None:
    """A fine-tune recipe names a packaged template: a trained family's by its tokenizer kind (what
    a trained family's derived fine-tune uses) or Gemma's turn format; any other name is refused,
    by the config model and by the lookup."""
    for kind in CHAT_TEMPLATES:
        assert packaged_chat_template(kind) == CHAT_TEMPLATES[kind]
        assert recipe(chat_template=kind).chat_template == kind
    assert "<start_of_turn>" in packaged_chat_template("gemma")
    with pytest.raises(ValueError, match="no packaged chat template named 'chatml'"):
        packaged_chat_template("chatml")
    with pytest.raises(ValueError, match="chat_template"):
        recipe(chat_template="chatml")

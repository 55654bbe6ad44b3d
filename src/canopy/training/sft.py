"""Supervised fine-tuning: the one path by which every fine-tuned variant made here is made.

:func:`finetune` fine-tunes a causal LM directory as a :class:`FinetuneRecipe` says. Two kinds
of family use it:

* a family with ``finetuned: {source: finetune, recipe: <name>}`` fine-tunes its base, whatever
  that base's source (hub, local, GGUF or trained here), with ``training.finetunes.<name>``;
* a family with ``source: train`` fine-tunes the base it pre-trained with the recipe its
  :class:`Recipe` derives (:meth:`Recipe.finetune_recipe`): every weight trained, on the CPU,
  with the family's chat template.

The corpus' instruction pairs are rendered through the chat template the result will be sampled
with (the base's own, or a packaged one), and training counts the response tokens and the
template's end-of-turn token only, with LoRA adapters (peft) merged into the weights at the end,
or fully (LoRA rank 0). The result is an ordinary transformers directory, written atomically: an
interrupted run leaves no partial model, and resumes from its last checkpoint
(:mod:`canopy.training.checkpoint`: the adapters or weights, optimizer, scheduler, RNG states and
step).

The directory's record (:mod:`canopy.sources.record`) holds the recipe, the loss curve and the
response loss of held-out pairs before and after training: evidence that the fine-tune changed the
model rather than an assumption that it did. Its generation config ends generation at the template's
end-of-turn token too, so every engine that reads it stops where the sampler does.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from canopy.config.models import FinetuneRecipe, Recipe
from canopy.modeling import as_id_list, end_of_turn_ids, resolve_device, special_token_ids
from canopy.sampling.shards import fingerprint, model_identity
from canopy.training.chat import chat_ids, encode_pairs, packaged_chat_template, response_loss
from canopy.training.loop import (
    count_parameters,
    pair_batches,
    run_checkpoints,
    save_model,
    torch_threads,
    train,
)

__all__ = ["FinetuneError", "finetune", "turn_tokens"]

log = logging.getLogger(__name__)

#: Rows per forward pass of the held-out loss: its logits span the whole vocabulary (262,144
#: columns for Gemma), so a wide batch would cost gigabytes.
_LOSS_BATCH = 2


class FinetuneError(ValueError):
    """A base model or recipe that cannot be fine-tuned as configured."""


def _chat_template(tokenizer, recipe: FinetuneRecipe, base_dir: Path) -> str:
    if recipe.chat_template != "model":
        return packaged_chat_template(recipe.chat_template)
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise FinetuneError(
            f"the base tokenizer in {str(base_dir)!r} has no chat template to fine-tune with: set "
            "chat_template in the fine-tuning recipe to a packaged one (gemma)"
        )
    return template


def _end_of_turn(tokenizer) -> int:
    """The token the template closes an assistant turn with, which the model must learn to emit."""
    ids = end_of_turn_ids(tokenizer)
    if ids:
        return ids[0]
    if tokenizer.eos_token_id is None:
        raise FinetuneError("the chat template closes no turn with a special token, and the "
                            "tokenizer has no EOS token: the model could not learn to end")  # fmt: skip
    return int(tokenizer.eos_token_id)


def turn_tokens(tokenizer) -> list[int]:
    """The special tokens the chat template frames a user and an assistant turn with (BOS, UNK
    and padding left out): Gemma's ``<start_of_turn>`` and ``<end_of_turn>``. A base model never
    saw them in pre-training, so their embeddings sit among other untrained ones; unless they are
    trained, a fine-tune that means to end its turn draws one of those neighbours instead."""
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    ids = chat_ids(tokenizer, messages)
    special = special_token_ids(tokenizer) - {
        tokenizer.bos_token_id,
        tokenizer.unk_token_id,
        tokenizer.pad_token_id,
    }
    return sorted({int(i) for i in ids} & special)


def _prepare(model: torch.nn.Module, recipe: FinetuneRecipe, turns: list[int]) -> torch.nn.Module:
    """The model to train: LoRA adapters on every linear layer of the blocks plus the embedding
    rows of the chat template's ``turns`` tokens, or the model itself with the embeddings frozen
    unless the recipe trains them."""
    if recipe.lora_rank:
        from peft import LoraConfig, get_peft_model

        adapters = LoraConfig(
            r=recipe.lora_rank,
            lora_alpha=recipe.lora_alpha,
            lora_dropout=0.0,
            target_modules="all-linear",
            trainable_token_indices=turns or None,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, adapters)
    if not recipe.train_embeddings:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                module.weight.requires_grad_(False)
    return model


def _chat_generation_config(base_config, tokenizer, end_id: int):
    """The base's generation config, with the end-of-turn token added to its EOS ids."""
    from transformers import GenerationConfig

    config = (
        GenerationConfig.from_dict(base_config.to_dict()) if base_config else GenerationConfig()
    )
    ids = as_id_list(config.eos_token_id)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    if end_id not in ids:
        ids.append(end_id)
    config.eos_token_id = ids if len(ids) > 1 else ids[0]
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    return config


def finetune(
    base_dir: str | os.PathLike[str],
    pairs: Sequence[tuple[str, str]],
    recipe: FinetuneRecipe | Recipe,
    out_dir: str | os.PathLike[str],
    *,
    threads: int | None = None,
    logger: logging.Logger | None = None,
) -> dict[str, Any]:
    """Fine-tune the causal LM in ``base_dir`` on ``pairs`` (instruction, response) as ``recipe``
    says, and save the result to ``out_dir``; returns the record saved with it.

    ``recipe`` is a fine-tuning recipe, or a trained family's :class:`Recipe`, which fine-tunes
    by the recipe it derives and is what the record names (the recipe its family configures).
    The first ``heldout_pairs`` pairs are held out of training: their response loss is measured
    before and after. The saved tokenizer carries the chat template trained with.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plan = recipe.finetune_recipe() if isinstance(recipe, Recipe) else recipe
    logger = logger or log
    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"base model directory {str(base_dir)!r} is missing or incomplete (no config.json)"
        )
    heldout, train_pairs = list(pairs[: plan.heldout_pairs]), list(pairs[plan.heldout_pairs :])
    if not train_pairs:
        raise FinetuneError(
            f"the corpus has {len(pairs)} pairs, none left after holding out heldout_pairs="
            f"{plan.heldout_pairs}: raise training.corpus.sft_pairs"
        )
    dtype = getattr(torch, plan.dtype)
    with torch_threads(threads):
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
        tokenizer.chat_template = _chat_template(tokenizer, plan, base_dir)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        end_id = _end_of_turn(tokenizer)
        device = resolve_device(plan.device)
        model = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True, dtype=dtype)
        model.to(device)
        encoded = encode_pairs(tokenizer, train_pairs, plan.max_length, end_id)
        if not encoded:
            raise FinetuneError(f"none of the {len(train_pairs)} pairs fits max_length="
                                f"{plan.max_length}: raise it in the recipe")  # fmt: skip
        skipped = len(train_pairs) - len(encoded)
        if skipped:
            logger.warning(
                "finetune: %d of %d pairs have prompts longer than max_length=%d; skipped",
                skipped,
                len(train_pairs),
                plan.max_length,
            )

        def heldout_loss() -> float | None:
            if not heldout:
                return None
            return response_loss(
                model,
                tokenizer,
                heldout,
                max_length=plan.max_length,
                batch_size=_LOSS_BATCH,
                end_id=end_id,
            )

        loss_before = heldout_loss()
        torch.manual_seed(plan.seed)
        turns = turn_tokens(tokenizer)
        trained = _prepare(model, plan, turns)
        next_batch = pair_batches(
            encoded, tokenizer.pad_token_id, plan.batch_size, plan.seed, device
        )

        logger.info(
            "finetune %s on %s: %s, %d trainable parameters, %d pairs (%d held out), %d steps, "
            "held-out response loss %.4f",
            base_dir,
            device,
            f"LoRA rank {plan.lora_rank}" if plan.lora_rank else "full",
            count_parameters(trained),
            len(encoded),
            len(heldout),
            plan.steps,
            float("nan") if loss_before is None else loss_before,
        )
        checkpoints = run_checkpoints(
            out_dir,
            plan,
            "finetune",
            logger,
            base=model_identity(base_dir),
            pairs=fingerprint({"encoded": encoded, "heldout": heldout}),
            device=str(device),
        )
        record = train(
            trained,
            tokenizer,
            plan,
            "finetune",
            next_batch,
            logger,
            started,
            steps=plan.steps,
            peak_lr=plan.learning_rate,
            checkpoints=checkpoints,
        )
        model = trained.merge_and_unload() if plan.lora_rank else trained
        loss_after = heldout_loss()
        record.update(
            {
                "recipe": recipe.to_config(),
                "base": str(base_dir),
                "pairs": len(encoded),
                "pairs_skipped": skipped,
                "heldout_pairs": len(heldout),
                "heldout_loss_before": loss_before,
                "heldout_loss_after": loss_after,
                "end_of_turn_id": end_id,
                "turn_tokens": turns,
                "seconds": round(time.perf_counter() - started, 2),
            }
        )
        save_model(
            model,
            tokenizer,
            out_dir,
            record,
            _chat_generation_config(model.generation_config, tokenizer, end_id),
            # A trained family's fine-tune is part of that family's source; any other base's
            # fine-tune is a source of its own.
            source="train" if isinstance(recipe, Recipe) else "finetune",
        )
        checkpoints.clear()
        logger.info(
            "finetune done in %.1f s: final response loss %.3f, held-out response loss %.4f -> "
            "%.4f; saved %s",
            record["seconds"],
            record["final_loss"],
            float("nan") if loss_before is None else loss_before,
            float("nan") if loss_after is None else loss_after,
            out_dir,
        )
        return record

"""The one training loop every training stage runs: pre-training from scratch
(:mod:`canopy.training.pretrain`) and supervised fine-tuning, full or LoRA (:mod:`canopy.training.sft`).

:func:`train` runs AdamW with the recipe's betas and weight decay, transformers' cosine schedule
with linear warm-up and a floor (``warmup_fraction``, ``min_lr_ratio``), gradients clipped to
``max_grad_norm``. It is deterministic for the recipe's seed at a given thread count, logs step,
loss and tokens/s, and returns the loss curve for the record that :func:`save_model` writes into the
model directory (the one record of a made model, :mod:`canopy.sources.record`), itself written
atomically (a temporary sibling renamed into place). Every ``checkpoint_every`` steps it checkpoints
next to the output (:func:`run_checkpoints`, :mod:`canopy.training.checkpoint`), so a killed run
resumes where it was, to the same bits on the CPU. The results are ordinary transformers
directories: they load with ``AutoModelForCausalLM``/``AutoTokenizer`` and
``local_files_only=True``, and their ``generation_config.json`` names the EOS id.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from canopy.config.models import FinetuneRecipe, Recipe
from canopy.io import atomic_dir
from canopy.sources.record import write_record
from canopy.training.chat import response_batches
from canopy.training.checkpoint import Checkpoints, rng_state, set_rng_state

__all__ = [
    "Batch",
    "count_parameters",
    "torch_threads",
    "train",
    "run_checkpoints",
    "pair_batches",
    "save_model",
]


#: One training step's model inputs and the number of tokens it trains on.
Batch = tuple[dict[str, torch.Tensor], int]


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct trainable parameters (tied embeddings counted once)."""
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():
        if id(parameter) not in seen and parameter.requires_grad:
            seen.add(id(parameter))
            total += parameter.numel()
    return total


def _generation_config(tokenizer):
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _optimizer(
    model: torch.nn.Module, recipe: Recipe | FinetuneRecipe, lr: float
) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, parameter in model.named_parameters():
        if id(parameter) in seen or not parameter.requires_grad:
            continue
        seen.add(id(parameter))
        # Norm gains and biases are not decayed (standard practice for transformers).
        (no_decay if parameter.ndim < 2 else decay).append(parameter)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": recipe.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(recipe.adam_beta1, recipe.adam_beta2),
    )


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``torch.set_num_threads(threads)`` and restore the previous setting afterwards."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train(
    model: torch.nn.Module,
    tokenizer,
    recipe: Recipe | FinetuneRecipe,
    stage: str,
    batch: Callable[[int], Batch],
    logger: logging.Logger,
    started: float,
    *,
    steps: int,
    peak_lr: float,
    checkpoints: Checkpoints | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``batch(step)`` for ``steps`` steps of ``stage`` ("pretrain" or
    "finetune") at the peak learning rate ``peak_lr``, with the recipe's optimiser and schedule;
    returns the part of the training record that every stage shares (with the loss and learning
    rate of every step, and the seconds since ``started``).

    With ``checkpoints``, resumes from the newest usable one (and logs it), and writes one every
    ``checkpoints.every`` steps; writing one reads the state and draws no random number, so the
    weights are those of an uninterrupted run. Logs step, loss, learning rate and tokens/s about
    twenty times, and leaves the model in eval mode.
    """
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    optimizer = _optimizer(model, recipe, peak_lr)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=max(1, int(recipe.warmup_fraction * steps)),
        num_training_steps=steps,
        min_lr_rate=recipe.min_lr_ratio,
    )
    log_every = max(1, steps // 20)
    model.train()
    losses: list[float] = []
    rates: list[float] = []
    tokens_seen = 0
    resumed: list[int] = []  # the steps this run resumed at (once per restart)
    first = 0
    restored = checkpoints.load() if checkpoints is not None else None
    if restored is not None:
        first, state = restored
        _restore(model, optimizer, scheduler, state)
        losses, rates, tokens_seen = state["losses"], state["rates"], state["tokens_seen"]
        resumed = [*state["resumed"], first]
        # The data position: the batch functions are seeded closures (a generator, an iterator
        # over permutations), so drawing the batches of the steps done again puts them where
        # they were, without any model computation.
        for step in range(first):
            batch(step)
        set_rng_state(state["rng"])
        logger.info(
            "%s resumed at step %d/%d from %s: kept the weights, optimizer, scheduler, RNG states "
            "and data position (%d steps not redone)",
            stage,
            first,
            steps,
            checkpoints.directory,
            first,
        )
    window_start, window_tokens = time.perf_counter(), 0
    for step in range(first, steps):
        lr = scheduler.get_last_lr()[0]
        rates.append(lr)
        inputs, tokens = batch(step)
        output = model(**inputs)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(output.loss.item())
        tokens_seen += tokens
        window_tokens += tokens
        if (step + 1) % log_every == 0 or step + 1 == steps:
            seconds = time.perf_counter() - window_start
            logger.info(
                "%s step %d/%d loss %.4f lr %.2e %.0f tokens/s",
                stage,
                step + 1,
                steps,
                losses[-1],
                lr,
                window_tokens / max(seconds, 1e-9),
            )
            window_start, window_tokens = time.perf_counter(), 0
        if checkpoints is not None and checkpoints.due(step + 1, steps):
            checkpoints.save(
                step + 1,
                {
                    "model": _trainable(model),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rng_state(),
                    "losses": losses,
                    "rates": rates,
                    "tokens_seen": tokens_seen,
                    "resumed": resumed,
                },
            )
    model.eval()
    return {
        "stage": stage,
        "recipe": recipe.to_config(),
        "parameters": count_parameters(model),
        "vocab_size": len(tokenizer),
        "tokens_seen": tokens_seen,
        "seconds": round(time.perf_counter() - started, 2),
        "threads": torch.get_num_threads(),
        "final_loss": _tail_mean(losses),
        "loss": losses,
        "lr": rates,
        # Only a resumed run says so: an uninterrupted run's record is unchanged.
        **({"resumed_at_steps": resumed} if resumed else {}),
    }


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters training changes (tied ones once): the whole model from scratch, the
    adapters and trained token rows of a LoRA fine-tune; the frozen rest comes from the base."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def _restore(model, optimizer, scheduler, state: dict[str, Any]) -> None:
    """Load a checkpoint's parameters, optimizer and scheduler state into a freshly built run."""
    parameters = dict(model.named_parameters())
    saved = state["model"]
    if set(saved) != set(_trainable(model)):
        raise ValueError("the checkpoint's parameters are not the model's trainable ones")
    with torch.no_grad():
        for name, value in saved.items():
            parameters[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])


def run_checkpoints(
    out_dir: str | os.PathLike[str],
    recipe: Recipe | FinetuneRecipe,
    stage: str,
    logger: logging.Logger,
    **inputs: Any,
) -> Checkpoints:
    """The checkpoints of the run that writes ``out_dir``, keyed by the stage, the recipe (less
    ``checkpoint_every``, which changes no weight) and digests of the run's ``inputs``."""
    recipe_key = {k: v for k, v in recipe.to_config().items() if k != "checkpoint_every"}
    key = {"stage": stage, "recipe": recipe_key, **inputs}
    return Checkpoints(out_dir, key, recipe.checkpoint_every, logger)


def _tail_mean(losses: Sequence[float]) -> float:
    """Mean of the last 10 % of the loss curve (at least one value): a less noisy final loss."""
    tail = losses[-max(1, len(losses) // 10) :]
    return float(sum(tail) / len(tail))


def pair_batches(
    encoded: list[tuple[list[int], int]],
    pad_id: int,
    batch_size: int,
    seed: int,
    device: torch.device | None = None,
) -> Callable[[int], Batch]:
    """``_train``'s batches of chat-rendered pairs (seeded by ``seed + 1``; labels on the responses
    only), at most ``batch_size`` pairs each, on ``device`` when given."""
    generator = torch.Generator().manual_seed(seed + 1)
    batches = response_batches(encoded, pad_id, min(batch_size, len(encoded)), generator)

    def next_batch(step: int) -> Batch:
        input_ids, mask, labels = next(batches)
        inputs = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        if device is not None:
            inputs = {key: value.to(device) for key, value in inputs.items()}
        return inputs, int(mask.sum())

    return next_batch


def save_model(
    model,
    tokenizer,
    out_dir: str | os.PathLike[str],
    record: dict[str, Any],
    generation_config=None,
    *,
    source: str,
) -> None:
    """Model, tokenizer, generation config (by default the tokenizer's BOS, EOS and padding ids)
    and the training record, as one atomic directory; ``source`` is the model source the record
    names (``train`` for a family trained here, ``finetune`` for a fine-tune of another base)."""
    model.generation_config = generation_config or _generation_config(tokenizer)
    with atomic_dir(out_dir) as directory:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        write_record(directory, source, record)

"""Pre-training and fine-tuning the default's small causal LMs: one training loop for both.

1. :func:`pretrain_base` fits the recipe's tokenizer (:mod:`canopy.training.tokenizers`) on the
   pre-training documents and trains a causal LM from scratch (a ``GPT2LMHeadModel`` or a
   ``LlamaForCausalLM`` built from the recipe) on the documents packed into one token stream with
   EOS after every document, so the base model also learns where text ends.
2. :func:`finetune` continues from the base model on instruction pairs rendered through the
   family's chat template (:mod:`canopy.training.chat`), with the loss on the response tokens
   only, and saves the tokenizer with that chat template.

Both run :func:`_train` on the CPU: AdamW with the recipe's betas and weight decay, transformers'
cosine schedule with linear warm-up and a floor (``warmup_fraction``, ``min_lr_ratio``), gradients
clipped to ``max_grad_norm``. They are deterministic for the recipe's seed at a given thread
count, log step, loss and tokens/s, record the loss curve in ``training_log.json`` inside the
model directory, and write the directory atomically (a temporary sibling renamed into place).
Every ``checkpoint_every`` steps they checkpoint next to it (:mod:`canopy.training.checkpoint`),
so a killed run resumes where it was, to the same bits on the CPU.
The results are ordinary transformers directories: they load with
``AutoModelForCausalLM``/``AutoTokenizer`` and ``local_files_only=True``, and their
``generation_config.json`` names the EOS id.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from canopy.io import atomic_dir
from canopy.sampling.shards import fingerprint, model_identity
from canopy.training.chat import CHAT_TEMPLATES, encode_pairs, response_batches
from canopy.training.checkpoint import Checkpoints, rng_state, set_rng_state
from canopy.config.models import FinetuneRecipe, Recipe
from canopy.training.tokenizers import train_tokenizer

__all__ = ["LOG_FILE", "pretrain_base", "finetune", "count_parameters"]

log = logging.getLogger(__name__)

LOG_FILE = "training_log.json"

#: One training step's model inputs and the number of tokens it trains on.
Batch = tuple[dict[str, torch.Tensor], int]


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def _build_model(recipe: Recipe, tokenizer) -> torch.nn.Module:
    """A freshly initialised causal LM of the recipe's architecture (seeded by the caller)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if recipe.architecture == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=recipe.context_length,
            n_embd=recipe.hidden_size,
            n_layer=recipe.num_layers,
            n_head=recipe.num_heads,
            n_inner=4 * recipe.hidden_size,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            **ids,
        )
        return GPT2LMHeadModel(config)
    # SwiGLU width about 8/3 of the hidden size, rounded to a multiple of 16, as Llama does.
    intermediate = 16 * max(1, round(8 * recipe.hidden_size / 3 / 16))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        max_position_embeddings=recipe.context_length,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        **ids,
    )
    return LlamaForCausalLM(config)


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


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------


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
def _threads(threads: int | None) -> Iterator[None]:
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


def _train(
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


def _save(
    model,
    tokenizer,
    out_dir: str | os.PathLike[str],
    record: dict[str, Any],
    generation_config=None,
) -> None:
    """Model, tokenizer, generation config (by default the tokenizer's BOS, EOS and padding ids)
    and the training record, as one atomic directory."""
    model.generation_config = generation_config or _generation_config(tokenizer)
    with atomic_dir(out_dir) as directory:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        (directory / LOG_FILE).write_text(json.dumps(record, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Pre-training
# ---------------------------------------------------------------------------------------------


def _token_stream(documents: Sequence[str], tokenizer) -> torch.Tensor:
    """All documents as one stream: (BOS when the tokenizer adds one) text EOS, ... ."""
    eos = tokenizer.eos_token_id
    # The backend tokenizer directly: no per-text length warnings, and faster on many documents.
    encoded = [
        e.ids
        for e in tokenizer.backend_tokenizer.encode_batch(list(documents), add_special_tokens=True)
    ]
    stream: list[int] = []
    if tokenizer.bos_token_id == eos:  # GPT-2 style: documents separated by <|endoftext|>
        stream.append(eos)
    for ids in encoded:
        stream.extend(ids)
        stream.append(eos)
    return torch.tensor(stream, dtype=torch.long)


def pretrain_base(
    documents: Sequence[str],
    recipe: Recipe,
    out_dir: str | os.PathLike[str],
    *,
    threads: int | None = None,
    logger: logging.Logger | None = None,
) -> dict[str, Any]:
    """Train the tokenizer and a base causal LM from scratch; save both to ``out_dir``.

    Each step draws windows of the packed stream that start at randomly chosen document starts
    (seeded), so the run is reproducible and independent of document order: ``batch_size``
    windows of ``context_length`` tokens on every fourth step, ``2 * batch_size`` windows of half
    that length on the others (the same tokens per step at lower attention cost; the full windows
    train every position). Returns the training record also saved as ``training_log.json``.
    """
    logger = logger or log
    with _threads(threads):
        started = time.perf_counter()
        torch.manual_seed(recipe.seed)
        tokenizer = train_tokenizer(documents, recipe)
        stream = _token_stream(documents, tokenizer)
        block = recipe.context_length
        if len(stream) <= block + 1:
            raise ValueError(
                f"the pre-training corpus has only {len(stream)} tokens, fewer than one window of "
                f"context_length={block}; use more documents or a shorter context"
            )
        torch.manual_seed(recipe.seed)
        model = _build_model(recipe, tokenizer)
        generator = torch.Generator().manual_seed(recipe.seed)
        offsets = torch.arange(block + 1)
        # Windows start where a document starts (at its BOS, or right after the EOS that ends
        # the one before when BOS and EOS are the same token): a model is sampled with the prompt
        # at position 0, and GPT-2's learned position embeddings only learn that if documents
        # begin there in training too (at random offsets its loss stayed about twice Llama's).
        eos = tokenizer.eos_token_id
        if tokenizer.bos_token_id is not None and tokenizer.bos_token_id != eos:
            doc_starts = (stream == tokenizer.bos_token_id).nonzero().flatten()
        else:
            doc_starts = (stream == eos).nonzero().flatten() + 1

        def windows(step: int) -> Batch:
            # Three steps in four use windows of half the context with twice the rows (the same
            # number of tokens, but attention costs half as much); every fourth step uses full
            # windows so that every position of the context is trained (GPT-2's learned position
            # embeddings need it).
            full = step % 4 == 3 or block < 32
            length, rows = (
                (block, recipe.batch_size) if full else (block // 2, 2 * recipe.batch_size)
            )
            usable = doc_starts[doc_starts < len(stream) - length - 1]
            if len(usable) == 0:  # documents longer than the stream allows: any offset
                usable = torch.arange(len(stream) - length - 1)
            starts = usable[torch.randint(0, len(usable), (rows,), generator=generator)]
            batch = stream[starts[:, None] + offsets[: length + 1]]
            inputs = {"input_ids": batch[:, :-1], "labels": batch[:, :-1]}
            return inputs, batch.numel() - batch.shape[0]

        logger.info(
            "pretrain %s/%s: %d parameters, vocabulary %d, corpus %d documents = %d tokens",
            recipe.architecture,
            recipe.tokenizer,
            count_parameters(model),
            len(tokenizer),
            len(documents),
            len(stream),
        )
        checkpoints = run_checkpoints(
            out_dir,
            recipe,
            "pretrain",
            logger,
            stream=hashlib.sha256(stream.numpy().tobytes()).hexdigest(),
        )
        record = {
            **_train(
                model,
                tokenizer,
                recipe,
                "pretrain",
                windows,
                logger,
                started,
                steps=recipe.pretrain_steps,
                peak_lr=recipe.learning_rate,
                checkpoints=checkpoints,
            ),
            "documents": len(documents),
            "corpus_tokens": len(stream),
            "uniform_loss": math.log(len(tokenizer)),
        }
        _save(model, tokenizer, out_dir, record)
        checkpoints.clear()
        logger.info(
            "pretrain done in %.1f s: final loss %.3f (uniform %.3f); saved %s",
            record["seconds"],
            record["final_loss"],
            record["uniform_loss"],
            out_dir,
        )
        return record


# ---------------------------------------------------------------------------------------------
# Supervised fine-tuning
# ---------------------------------------------------------------------------------------------


def finetune(
    base_dir: str | os.PathLike[str],
    pairs: Sequence[tuple[str, str]],
    recipe: Recipe,
    out_dir: str | os.PathLike[str],
    *,
    threads: int | None = None,
    logger: logging.Logger | None = None,
) -> dict[str, Any]:
    """Supervised fine-tuning of the base model in ``base_dir`` on (instruction, response) pairs.

    Pairs are rendered with the family's chat template (:data:`CHAT_TEMPLATES`, chosen by the
    recipe's tokenizer kind), the loss counts the response tokens and the closing EOS only, and
    the saved tokenizer carries the chat template. Returns the record saved as ``training_log.json``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger = logger or log
    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"base model directory {str(base_dir)!r} is missing or incomplete; run pretrain_base first"
        )
    if not pairs:
        raise ValueError("finetune needs at least one (instruction, response) pair")
    with _threads(threads):
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
        tokenizer.chat_template = CHAT_TEMPLATES[recipe.tokenizer]
        model = AutoModelForCausalLM.from_pretrained(
            base_dir, local_files_only=True, dtype=torch.float32
        )
        max_length = recipe.context_length
        encoded = encode_pairs(tokenizer, pairs, max_length)
        if not encoded:
            raise ValueError(f"none of the {len(pairs)} pairs fits context_length={max_length}")
        dropped = len(pairs) - len(encoded)
        if dropped:
            logger.warning(
                "finetune: %d of %d pairs have prompts longer than the context; skipped",
                dropped,
                len(pairs),
            )
        torch.manual_seed(recipe.seed)
        next_batch = pair_batches(encoded, tokenizer.pad_token_id, recipe.batch_size, recipe.seed)

        logger.info("finetune %s: %d pairs, %d steps", base_dir, len(encoded), recipe.sft_steps)
        checkpoints = run_checkpoints(
            out_dir,
            recipe,
            "finetune",
            logger,
            base=model_identity(base_dir),
            pairs=fingerprint({"encoded": encoded}),
        )
        record = {
            **_train(
                model,
                tokenizer,
                recipe,
                "finetune",
                next_batch,
                logger,
                started,
                steps=recipe.sft_steps,
                peak_lr=recipe.sft_learning_rate,
                checkpoints=checkpoints,
            ),
            "base": str(base_dir),
            "pairs": len(encoded),
            "pairs_skipped": dropped,
        }
        _save(model, tokenizer, out_dir, record)
        checkpoints.clear()
        logger.info(
            "finetune done in %.1f s: final response loss %.3f; saved %s",
            record["seconds"],
            record["final_loss"],
            out_dir,
        )
        return record

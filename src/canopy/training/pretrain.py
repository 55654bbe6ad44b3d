"""Pre-training a small causal LM from scratch: the base model of a family with ``source: train``.

:func:`pretrain_base` fits the recipe's tokenizer (:mod:`canopy.training.tokenizers`) on the
pre-training documents and trains a causal LM (a ``GPT2LMHeadModel`` or a ``LlamaForCausalLM``
built from the recipe) with the one training loop (:mod:`canopy.training.loop`) on the documents
packed into one token stream with EOS after every document, so the base model also learns where
text ends.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from canopy.config.models import Recipe
from canopy.training.loop import (
    Batch,
    count_parameters,
    run_checkpoints,
    save_model,
    torch_threads,
    train,
)
from canopy.training.tokenizers import train_tokenizer

__all__ = ["pretrain_base", "token_stream"]

log = logging.getLogger(__name__)


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


def token_stream(documents: Sequence[str], tokenizer) -> torch.Tensor:
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
    train every position). Returns the training record also saved in the model directory.
    """
    logger = logger or log
    with torch_threads(threads):
        started = time.perf_counter()
        torch.manual_seed(recipe.seed)
        tokenizer = train_tokenizer(documents, recipe)
        stream = token_stream(documents, tokenizer)
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
            **train(
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
        save_model(model, tokenizer, out_dir, record, source="train")
        checkpoints.clear()
        logger.info(
            "pretrain done in %.1f s: final loss %.3f (uniform %.3f); saved %s",
            record["seconds"],
            record["final_loss"],
            record["uniform_loss"],
            out_dir,
        )
        return record

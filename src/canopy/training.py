"""The embedded default's own model pairs: small causal LMs pre-trained here, then fine-tuned.

A family is made from a :class:`Recipe` (``training.recipes.<name>`` of config.yaml):

1. :func:`train_tokenizer` fits a tokenizer on the pre-training documents: ``byte_bpe`` is GPT-2
   style (byte-level pre-tokenizer and decoder, one ``<|endoftext|>`` token that is BOS, EOS and
   document separator), ``sentencepiece_bpe`` is Llama style (Metaspace pre-tokenizer, BPE with
   byte fallback over ``<0x00>``..``<0xFF>``, ``<s>`` prepended to every text, ``</s>`` as EOS).
   Both carry a pad token and their family's chat role markers as special tokens.
2. :func:`pretrain_base` trains a causal LM from scratch (a ``GPT2LMHeadModel`` or a
   ``LlamaForCausalLM`` built from the recipe) on the documents packed into one token stream with
   EOS after every document, so the base model also learns where text ends.
3. :func:`finetune` continues from the base model on instruction pairs rendered through the
   family's chat template (one user turn, the generation prompt, the response, EOS), with the loss
   on the response tokens only, and saves the tokenizer with that chat template.

Both steps run on the CPU with AdamW and a warm-up + cosine schedule, are deterministic for the
recipe's seed at a given thread count, log step, loss and tokens/s, record the loss curve in
``training_log.json`` inside the model directory, and write the directory atomically (a temporary
sibling renamed into place). The results are ordinary transformers directories: they load with
``AutoModelForCausalLM``/``AutoTokenizer`` and ``local_files_only=True``, and their
``generation_config.json`` names the EOS id.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from canopy.config.models import ARCHITECTURES, TOKENIZER_KINDS, Recipe

__all__ = [
    "Recipe",
    "ARCHITECTURES",
    "TOKENIZER_KINDS",
    "CHAT_TEMPLATES",
    "ROLE_MARKERS",
    "train_tokenizer",
    "pretrain_base",
    "finetune",
    "response_loss",
    "encode_pair",
    "count_parameters",
]

log = logging.getLogger(__name__)


LOG_FILE = "training_log.json"


# ---------------------------------------------------------------------------------------------
# Tokenizers and chat templates
# ---------------------------------------------------------------------------------------------

# Per tokenizer kind: special tokens (in id order) and the roles of some of them.
_SPECIALS: dict[str, dict[str, Any]] = {
    "byte_bpe": {
        "tokens": ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"],
        "bos": "<|endoftext|>",
        "eos": "<|endoftext|>",
        "pad": "<|pad|>",
        "unk": None,
        "roles": ["<|user|>", "<|assistant|>", "<|system|>"],
    },
    "sentencepiece_bpe": {
        "tokens": ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"],
        "bos": "<s>",
        "eos": "</s>",
        "pad": "<pad>",
        "unk": "<unk>",
        "roles": ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"],
    },
}

#: The chat role markers of each tokenizer kind (single special tokens).
ROLE_MARKERS: dict[str, tuple[str, ...]] = {
    kind: tuple(spec["roles"]) for kind, spec in _SPECIALS.items()
}

#: Chat templates (jinja) per tokenizer kind; every assistant turn ends with the EOS token, and
#: the generation prompt is exactly what precedes an assistant turn, so fine-tuning on rendered
#: pairs teaches the model to answer after the generation prompt and then emit EOS.
CHAT_TEMPLATES: dict[str, str] = {
    "byte_bpe": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] }}\n"
        "{% elif message['role'] == 'user' %}<|user|>\n{{ message['content'] }}\n"
        "{% elif message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}{{ eos_token }}\n"
        "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
    "sentencepiece_bpe": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}<<SYS>>\n{{ message['content'] }}\n<</SYS>>\n"
        "{% elif message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
        "{% elif message['role'] == 'assistant' %} {{ message['content'] }}{{ eos_token }}"
        "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
        "{% endfor %}"
    ),
}
# The Llama-style template's generation prompt is the "[/INST]" that closes every user turn, so
# add_generation_prompt adds nothing further there.


def train_tokenizer(documents: Sequence[str], recipe: Recipe):
    """A ``PreTrainedTokenizerFast`` of the recipe's kind fitted on ``documents``.

    The vocabulary holds the special tokens, then (for ``sentencepiece_bpe``) the 256 byte tokens,
    then learned pieces up to about ``recipe.vocab_size`` in all; ``len(tokenizer)`` is the exact
    size and is what the model is built with.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if not documents:
        raise ValueError("train_tokenizer needs at least one document")
    kind = recipe.tokenizer
    spec = _SPECIALS[kind]
    specials: list[str] = spec["tokens"]
    if kind == "byte_bpe":
        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=max(recipe.vocab_size, 256 + len(specials)),
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        core.train_from_iterator(documents, trainer=trainer)
    else:
        core = _train_sentencepiece_bpe(documents, recipe.vocab_size, specials)
        bos = spec["bos"]
        core.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, core.token_to_id(bos))],
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        pad_token=spec["pad"],
        unk_token=spec["unk"],
        additional_special_tokens=spec["roles"],
        model_max_length=recipe.context_length,
        clean_up_tokenization_spaces=False,
    )
    return tokenizer


def _train_sentencepiece_bpe(documents: Sequence[str], vocab_size: int, specials: list[str]):
    """Llama-style BPE: Metaspace pre-tokenizer, byte fallback over 256 byte tokens placed right
    after the specials (as in Llama's vocabulary), then the learned pieces."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    # Spaces become "▁" as in SentencePiece; a run of them (code indentation) stays one piece
    # that BPE can merge, instead of one token per space, and the last space of a run stays with
    # the word after it.
    metaspace = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False),
            pre_tokenizers.Split(Regex("▁+(?=▁[^▁])|▁?[^▁]+|▁+"), behavior="isolated"),
        ]
    )
    byte_tokens = [f"<0x{value:02X}>" for value in range(256)]
    budget = max(vocab_size - len(specials) - len(byte_tokens), 32)
    # Characters outside the most frequent ones are left to byte fallback, as SentencePiece does
    # with its character coverage, so that the learned pieces are spent on merges.
    draft = Tokenizer(models.BPE(unk_token=None))
    draft.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(
        vocab_size=budget, limit_alphabet=min(budget, 96), special_tokens=[], show_progress=False
    )
    draft.train_from_iterator(documents, trainer=trainer)
    learned = json.loads(draft.to_str())["model"]
    vocab: dict[str, int] = {}
    for token in [*specials, *byte_tokens]:
        vocab[token] = len(vocab)
    for piece, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    core = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    core.pre_tokenizer = metaspace
    # Llama's decoder: pieces back to spaces, byte tokens back to UTF-8, and the space that the
    # pre-tokenizer put in front of the text removed again.
    core.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    core.add_special_tokens(specials)
    return core


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
# Training loop pieces
# ---------------------------------------------------------------------------------------------


def _schedule(step: int, total: int, peak: float) -> float:
    """Linear warm-up over the first 5 % of steps, then cosine decay to 10 % of the peak."""
    warmup = max(1, int(0.05 * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def _optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, parameter in model.named_parameters():
        if id(parameter) in seen or not parameter.requires_grad:
            continue
        seen.add(id(parameter))
        # Norm gains and biases are not decayed (standard practice for transformers).
        (no_decay if parameter.ndim < 2 else decay).append(parameter)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
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


@contextlib.contextmanager
def _atomic_dir(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory next to ``out_dir``; on success it replaces ``out_dir``."""
    target = Path(out_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _step_log(
    logger: logging.Logger,
    stage: str,
    step: int,
    total: int,
    loss: float,
    lr: float,
    tokens: int,
    seconds: float,
) -> None:
    logger.info(
        "%s step %d/%d loss %.4f lr %.2e %.0f tokens/s",
        stage,
        step,
        total,
        loss,
        lr,
        tokens / max(seconds, 1e-9),
    )


def _save(model, tokenizer, directory: Path, record: dict[str, Any]) -> None:
    model.generation_config = _generation_config(tokenizer)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / LOG_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _log_every(total: int) -> int:
    return max(1, total // 20)


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
    windows of ``context_length`` tokens on every fourth step, ``2 * batch_size`` windows of half that length on the others
    (the same tokens per step at lower attention cost; the full windows train every position).
    Returns the training record also saved as ``training_log.json``.
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
        model.train()
        optimizer = _optimizer(model, recipe.learning_rate)
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
        losses: list[float] = []
        tokens_seen = 0
        logger.info(
            "pretrain %s/%s: %d parameters, vocabulary %d, corpus %d documents = %d tokens",
            recipe.architecture,
            recipe.tokenizer,
            count_parameters(model),
            len(tokenizer),
            len(documents),
            len(stream),
        )
        window_start = time.perf_counter()
        window_tokens = 0
        for step in range(recipe.pretrain_steps):
            lr = _schedule(step, recipe.pretrain_steps, recipe.learning_rate)
            for group in optimizer.param_groups:
                group["lr"] = lr
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
            output = model(input_ids=batch[:, :-1], labels=batch[:, :-1])
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(output.loss.item())
            tokens_seen += batch.numel() - batch.shape[0]
            window_tokens += batch.numel() - batch.shape[0]
            if (step + 1) % _log_every(
                recipe.pretrain_steps
            ) == 0 or step + 1 == recipe.pretrain_steps:
                _step_log(
                    logger,
                    "pretrain",
                    step + 1,
                    recipe.pretrain_steps,
                    losses[-1],
                    lr,
                    window_tokens,
                    time.perf_counter() - window_start,
                )
                window_start, window_tokens = time.perf_counter(), 0
        model.eval()
        seconds = time.perf_counter() - started
        record = {
            "stage": "pretrain",
            "recipe": recipe.to_config(),
            "parameters": count_parameters(model),
            "vocab_size": len(tokenizer),
            "documents": len(documents),
            "corpus_tokens": len(stream),
            "tokens_seen": tokens_seen,
            "seconds": round(seconds, 2),
            "threads": torch.get_num_threads(),
            "uniform_loss": math.log(len(tokenizer)),
            "final_loss": _tail_mean(losses),
            "loss": losses,
        }
        with _atomic_dir(out_dir) as tmp:
            _save(model, tokenizer, tmp, record)
        logger.info(
            "pretrain done in %.1f s: final loss %.3f (uniform %.3f); saved %s",
            seconds,
            record["final_loss"],
            record["uniform_loss"],
            out_dir,
        )
        return record


def _tail_mean(losses: Sequence[float]) -> float:
    """Mean of the last 10 % of the loss curve (at least one value): a less noisy final loss."""
    tail = losses[-max(1, len(losses) // 10) :]
    return float(sum(tail) / len(tail))


# ---------------------------------------------------------------------------------------------
# Supervised fine-tuning
# ---------------------------------------------------------------------------------------------


def _chat_ids(tokenizer, messages: list[dict[str, str]], **kwargs) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def encode_pair(
    tokenizer, instruction: str, response: str, max_length: int
) -> tuple[list[int], int] | None:
    """(token ids, number of prompt tokens) of one rendered pair, or None if it does not fit.

    The prompt part is exactly what :func:`canopy.modeling.format_prompt` feeds a fine-tuned model
    (chat template, one user turn, generation prompt); the rest is the response and EOS. A response
    that does not fit is cut (keeping at least 8 tokens) and then has no EOS.
    """
    prompt = _chat_ids(
        tokenizer, [{"role": "user", "content": instruction}], add_generation_prompt=True
    )
    answer = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt) + 8 > max_length:
        return None
    return (prompt + answer)[:max_length], len(prompt)


def _sft_batches(
    encoded: list[tuple[list[int], int]], pad_id: int, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless seeded batches: input ids, attention mask, labels (-100 outside the responses)."""
    while True:
        order = torch.randperm(len(encoded), generator=generator).tolist()
        for first in range(
            0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size
        ):
            chosen = [encoded[i] for i in order[first : first + batch_size]]
            width = max(len(ids) for ids, _ in chosen)
            input_ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chosen), width), dtype=torch.long)
            labels = torch.full((len(chosen), width), -100, dtype=torch.long)
            for row, (ids, n_prompt) in enumerate(chosen):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
                labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
            yield input_ids, mask, labels


def _encode_pairs(
    tokenizer, pairs: Sequence[tuple[str, str]], max_length: int
) -> list[tuple[list[int], int]]:
    encoded = []
    for instruction, response in pairs:
        item = encode_pair(tokenizer, instruction, response, max_length)
        if item is not None:
            encoded.append(item)
    return encoded


@torch.no_grad()
def response_loss(
    model,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    *,
    max_length: int | None = None,
    batch_size: int = 16,
) -> float:
    """Mean cross-entropy (nats per token) of the responses (and their EOS) given the chat-rendered
    instructions; ``tokenizer`` must carry a chat template."""
    max_length = max_length or int(
        getattr(model.config, "max_position_embeddings", 0) or getattr(model.config, "n_positions")
    )
    encoded = _encode_pairs(tokenizer, pairs, max_length)
    if not encoded:
        raise ValueError("no pair fits the model's context")
    model.eval()
    total, count = 0.0, 0
    for first in range(0, len(encoded), batch_size):
        chosen = encoded[first : first + batch_size]
        width = max(len(ids) for ids, _ in chosen)
        input_ids = torch.full((len(chosen), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, -100)
        for row, (ids, n_prompt) in enumerate(chosen):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
            labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
        target = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            target.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += float(losses)
        count += int((target != -100).sum())
    return total / count


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
        encoded = _encode_pairs(tokenizer, pairs, max_length)
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
        generator = torch.Generator().manual_seed(recipe.seed + 1)
        batches = _sft_batches(
            encoded, tokenizer.pad_token_id, min(recipe.batch_size, len(encoded)), generator
        )
        optimizer = _optimizer(model, recipe.sft_learning_rate)
        model.train()
        losses: list[float] = []
        tokens_seen = 0
        window_start, window_tokens = time.perf_counter(), 0
        logger.info("finetune %s: %d pairs, %d steps", base_dir, len(encoded), recipe.sft_steps)
        for step in range(recipe.sft_steps):
            lr = _schedule(step, recipe.sft_steps, recipe.sft_learning_rate)
            for group in optimizer.param_groups:
                group["lr"] = lr
            input_ids, mask, labels = next(batches)
            output = model(input_ids=input_ids, attention_mask=mask, labels=labels)
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(output.loss.item())
            tokens_seen += int(mask.sum())
            window_tokens += int(mask.sum())
            if (step + 1) % _log_every(recipe.sft_steps) == 0 or step + 1 == recipe.sft_steps:
                _step_log(
                    logger,
                    "finetune",
                    step + 1,
                    recipe.sft_steps,
                    losses[-1],
                    lr,
                    window_tokens,
                    time.perf_counter() - window_start,
                )
                window_start, window_tokens = time.perf_counter(), 0
        model.eval()
        seconds = time.perf_counter() - started
        record = {
            "stage": "finetune",
            "base": str(base_dir),
            "recipe": recipe.to_config(),
            "parameters": count_parameters(model),
            "vocab_size": len(tokenizer),
            "pairs": len(encoded),
            "pairs_skipped": dropped,
            "tokens_seen": tokens_seen,
            "seconds": round(seconds, 2),
            "threads": torch.get_num_threads(),
            "final_loss": _tail_mean(losses),
            "loss": losses,
        }
        with _atomic_dir(out_dir) as tmp:
            _save(model, tokenizer, tmp, record)
        logger.info(
            "finetune done in %.1f s: final response loss %.3f; saved %s",
            seconds,
            record["final_loss"],
            out_dir,
        )
        return record

"""The two tokenizer kinds of the default's families, fitted on the pre-training documents.

``byte_bpe`` is GPT-2 style (byte-level pre-tokenizer and decoder, one ``<|endoftext|>`` token that
is BOS, EOS and document separator), ``sentencepiece_bpe`` is Llama style (Metaspace pre-tokenizer,
BPE with byte fallback over ``<0x00>``..``<0xFF>``, ``<s>`` prepended to every text, ``</s>`` as
EOS). Both carry a pad token and their family's chat role markers as special tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from canopy.config.models import Recipe

__all__ = ["ROLE_MARKERS", "train_tokenizer"]

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

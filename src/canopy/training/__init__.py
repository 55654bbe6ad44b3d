"""Models made here: the embedded default's small causal LMs, pre-trained and fine-tuned, and
the fine-tune of any family's base.

* :mod:`~canopy.training.corpus` — the offline training text (documents and instruction pairs);
* :class:`Recipe` and :class:`FinetuneRecipe` (defined with the configuration,
  :mod:`canopy.config.models`) — every hyperparameter of a trained family, of a fine-tune;
* :mod:`~canopy.training.tokenizers` — the GPT-2-style and Llama-style tokenizers;
* :mod:`~canopy.training.chat` — chat templates and chat-rendered pairs;
* :mod:`~canopy.training.loop` — the one training loop every stage runs, and the training record;
* :mod:`~canopy.training.pretrain` — :func:`pretrain_base`: a trained family's base, from scratch;
* :mod:`~canopy.training.sft` — :func:`finetune`: the one fine-tune path, full or LoRA, of a
  trained family's base (its recipe derived from its :class:`Recipe`) or of any family's base
  (hub, local or GGUF; ``training.finetunes``);
* :mod:`~canopy.training.checkpoint` — the loop's checkpoints, from which a killed run resumes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from canopy.config.models import ARCHITECTURES, TOKENIZER_KINDS, FinetuneRecipe, Recipe
    from canopy.training.chat import CHAT_TEMPLATES, encode_pair, response_loss
    from canopy.training.loop import count_parameters
    from canopy.training.pretrain import pretrain_base
    from canopy.training.sft import finetune
    from canopy.training.tokenizers import ROLE_MARKERS, train_tokenizer

#: Where each name is defined. Loaded on first use: the corpus job imports
#: ``canopy.training.corpus``, and through this package it would otherwise load the training
#: loop and torch (1.4 s of start-up) for text generation that needs neither.
_HOMES = {
    **dict.fromkeys(
        ["ARCHITECTURES", "TOKENIZER_KINDS", "FinetuneRecipe", "Recipe"], "canopy.config.models"
    ),
    **dict.fromkeys(["CHAT_TEMPLATES", "encode_pair", "response_loss"], "canopy.training.chat"),
    "count_parameters": "canopy.training.loop",
    **dict.fromkeys(["ROLE_MARKERS", "train_tokenizer"], "canopy.training.tokenizers"),
    "pretrain_base": "canopy.training.pretrain",
    "finetune": "canopy.training.sft",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Recipe",
    "FinetuneRecipe",
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

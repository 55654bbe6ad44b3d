"""The embedded default's own model pairs: small causal LMs pre-trained here, then fine-tuned.

* :mod:`~canopy.training.corpus` — the offline training text (documents and instruction pairs);
* :class:`Recipe` (defined with the configuration, :mod:`canopy.config.models`) — every
  hyperparameter of a family;
* :mod:`~canopy.training.tokenizers` — the GPT-2-style and Llama-style tokenizers;
* :mod:`~canopy.training.chat` — chat templates and chat-rendered pairs;
* :mod:`~canopy.training.loop` — the one training loop, :func:`pretrain_base` and
  :func:`finetune`.
"""

from canopy.training.chat import CHAT_TEMPLATES, encode_pair, response_loss
from canopy.training.loop import LOG_FILE, count_parameters, finetune, pretrain_base
from canopy.config.models import ARCHITECTURES, TOKENIZER_KINDS, Recipe
from canopy.training.tokenizers import ROLE_MARKERS, train_tokenizer

__all__ = [
    "Recipe",
    "ARCHITECTURES",
    "TOKENIZER_KINDS",
    "CHAT_TEMPLATES",
    "ROLE_MARKERS",
    "LOG_FILE",
    "train_tokenizer",
    "pretrain_base",
    "finetune",
    "response_loss",
    "encode_pair",
    "count_parameters",
]

"""A training recipe: how one small model family of the embedded default is made.

``training.recipes.<name>`` of config.yaml; every hyperparameter of tokenizer, model, optimiser and
schedule is a field with the calibrated default of the embedded configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

__all__ = ["Recipe", "RecipeError", "ARCHITECTURES", "TOKENIZER_KINDS"]

ARCHITECTURES: tuple[str, ...] = ("gpt2", "llama")
TOKENIZER_KINDS: tuple[str, ...] = ("byte_bpe", "sentencepiece_bpe")


class RecipeError(ValueError):
    """A training recipe key is unknown or has a bad value (the message names it)."""


@dataclass(frozen=True)
class Recipe:
    """How one small family is made. Defaults are the calibrated values of the embedded default
    (about a minute for base + fine-tune on 2 CPU cores); ``from_config`` fills what a config
    block leaves out and rejects unknown keys."""

    architecture: str
    tokenizer: str
    vocab_size: int = 1024
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    context_length: int = 512
    pretrain_steps: int = 300
    sft_steps: int = 150
    batch_size: int = 8
    learning_rate: float = 5e-3
    sft_learning_rate: float = 1e-3
    seed: int = 42
    # The optimiser and schedule of both stages: AdamW with these betas and weight decay (not on
    # norm gains and biases), linear warm-up over this fraction of the steps, cosine decay to
    # min_lr_ratio times the peak, gradients clipped to this norm.
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        # from_config checks that every number is positive; these are fractions besides.
        for key in ("warmup_fraction", "min_lr_ratio", "adam_beta1", "adam_beta2"):
            value = getattr(self, key)
            if not 0 < value < 1:
                raise RecipeError(
                    f"a recipe's {key} must lie strictly between 0 and 1, got {value}"
                )

    @classmethod
    def from_config(cls, block: dict[str, Any], *, name: str = "<recipe>") -> Recipe:
        """Build from a ``training.recipes.<name>`` block; errors name ``training.recipes.<name>.<key>``."""
        if not isinstance(block, dict):
            raise RecipeError(f"training.recipes.{name} must be a mapping of recipe keys")
        known = {f.name: f for f in fields(cls)}
        for key in block:
            if key not in known:
                raise RecipeError(
                    f"training.recipes.{name}.{key} is not a recipe key; use {', '.join(known)}"
                )
        for key in ("architecture", "tokenizer"):
            if key not in block:
                raise RecipeError(f"training.recipes.{name}.{key} is required")
        if block["architecture"] not in ARCHITECTURES:
            raise RecipeError(
                f"training.recipes.{name}.architecture is {block['architecture']!r}; use one of "
                f"{', '.join(ARCHITECTURES)}"
            )
        if block["tokenizer"] not in TOKENIZER_KINDS:
            raise RecipeError(
                f"training.recipes.{name}.tokenizer is {block['tokenizer']!r}; use one of "
                f"{', '.join(TOKENIZER_KINDS)}"
            )
        values: dict[str, Any] = {}
        for key, value in block.items():
            default = known[key].default
            if isinstance(default, bool) or key in ("architecture", "tokenizer"):
                values[key] = value
            elif isinstance(default, int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise RecipeError(
                        f"training.recipes.{name}.{key} must be an integer, got {value!r}"
                    )
                if key != "seed" and value < 1:
                    raise RecipeError(
                        f"training.recipes.{name}.{key} must be at least 1, got {value}"
                    )
                values[key] = value
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                    raise RecipeError(
                        f"training.recipes.{name}.{key} must be a positive number, got {value!r}"
                    )
                values[key] = float(value)
        recipe = cls(**values)
        if recipe.hidden_size % recipe.num_heads:
            raise RecipeError(
                f"training.recipes.{name}: hidden_size ({recipe.hidden_size}) must be divisible by "
                f"num_heads ({recipe.num_heads})"
            )
        if recipe.architecture == "llama" and (recipe.hidden_size // recipe.num_heads) % 2:
            raise RecipeError(
                f"training.recipes.{name}: a llama recipe needs an even head size (rotary "
                f"embeddings); hidden_size/num_heads is {recipe.hidden_size // recipe.num_heads}"
            )
        if recipe.vocab_size < 64:
            raise RecipeError(f"training.recipes.{name}.vocab_size must be at least 64")
        return recipe

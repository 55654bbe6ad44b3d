"""``training``: how families with ``source: train`` are made and how fine-tunes of a base are
made here (canopy.training and its corpus read these; the families that name them are in
:mod:`canopy.config.families`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from canopy.config.base import Block
from canopy.config.types import Device, NonEmptyStr, PositiveInt, PositiveNumber

__all__ = [
    "ARCHITECTURES",
    "CHAT_TEMPLATE_CHOICES",
    "CorpusSettings",
    "FinetuneRecipe",
    "Recipe",
    "TOKENIZER_KINDS",
    "TrainingSettings",
]

ARCHITECTURES: tuple[str, ...] = ("gpt2", "llama")
TOKENIZER_KINDS: tuple[str, ...] = ("byte_bpe", "sentencepiece_bpe")
#: Where a fine-tune made here takes its chat template: the base tokenizer's own, or one the
#: package ships (canopy/training/data/chat_templates/<name>.jinja, or a trained family's, named
#: by its tokenizer kind).
CHAT_TEMPLATE_CHOICES: tuple[str, ...] = ("model", "gemma", *TOKENIZER_KINDS)


class CorpusSettings(Block):
    """``training.corpus``: how many pre-training documents and fine-tuning pairs, and their seed."""

    where = "training.corpus"

    pretrain_documents: PositiveInt = 4000
    sft_pairs: PositiveInt = 1500
    seed: int = 42


class _Optimiser(Block):
    # The optimiser and schedule every training stage shares: AdamW with these betas and weight
    # decay (not on norm gains and biases), linear warm-up over this fraction of the steps, cosine
    # decay to min_lr_ratio times the peak, gradients clipped to this norm.
    warmup_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.05
    """Share of each stage's steps spent warming the learning rate up from zero."""
    min_lr_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.1
    """Floor of the cosine decay, as a share of the peak learning rate."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    """AdamW weight decay (norm gains and biases are not decayed)."""
    adam_beta1: Annotated[float, Field(gt=0, lt=1)] = 0.9
    adam_beta2: Annotated[float, Field(gt=0, lt=1)] = 0.95
    max_grad_norm: PositiveNumber = 1.0
    """Gradients are clipped to this global norm."""
    checkpoint_every: PositiveInt = 25
    """Steps between training checkpoints (weights or adapters, optimiser, schedule, RNG states,
    data position), kept next to the output until it is written: a killed job resumes from the
    last one and loses at most this many steps. It does not change the trained weights."""


class Recipe(_Optimiser):
    """``training.recipes.<recipe>``: how one small family is made. The defaults are the calibrated
    values of the embedded default (about a minute for base + fine-tune on 2 CPU cores)."""

    where = "training.recipes.<recipe>"

    architecture: Literal["gpt2", "llama"]
    tokenizer: Literal["byte_bpe", "sentencepiece_bpe"]
    vocab_size: Annotated[int, Field(ge=64)] = 1024
    hidden_size: Annotated[int, Field(ge=8)] = 64
    num_layers: PositiveInt = 2
    num_heads: PositiveInt = 4
    context_length: Annotated[int, Field(ge=16)] = 512
    pretrain_steps: PositiveInt = 300
    sft_steps: PositiveInt = 150
    batch_size: PositiveInt = 8
    learning_rate: PositiveNumber = 5e-3
    sft_learning_rate: PositiveNumber = 1e-3
    seed: int = 42

    @model_validator(mode="after")
    def _heads(self) -> Recipe:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.architecture == "llama" and (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                "a llama recipe needs an even head size (rotary embeddings); "
                f"hidden_size/num_heads is {self.hidden_size // self.num_heads}"
            )
        return self

    def finetune_recipe(self) -> FinetuneRecipe:
        """The family's fine-tune as a recipe of the one fine-tune path: sft_steps steps at
        sft_learning_rate, every weight trained (the embeddings too: the base never saw the chat
        template's role markers in a turn), pairs cut to the context, none held out, with the
        family's chat template, in float32 on the CPU (where the recipe's seed fixes the bits)."""
        return FinetuneRecipe(
            **{name: getattr(self, name) for name in _Optimiser.model_fields},
            steps=self.sft_steps,
            learning_rate=self.sft_learning_rate,
            batch_size=self.batch_size,
            max_length=self.context_length,
            lora_rank=0,
            train_embeddings=True,
            chat_template=self.tokenizer,
            heldout_pairs=0,
            dtype="float32",
            device="cpu",
            seed=self.seed,
        )


class FinetuneRecipe(_Optimiser):
    """``training.finetunes.<name>``: supervised fine-tuning of a family's base model here
    (``finetuned: {source: finetune, recipe: <name>}``) on the corpus' instruction pairs
    (training.corpus.sft_pairs) rendered through the chat template the result is sampled with;
    the loss counts the response tokens and the end of the turn only."""

    where = "training.finetunes.<name>"

    steps: PositiveInt = 200
    learning_rate: PositiveNumber = 2e-4
    batch_size: PositiveInt = 4
    max_length: Annotated[int, Field(ge=16)] = 256
    """Tokens per rendered pair (prompt, response, end of turn); longer responses are cut."""
    lora_rank: Annotated[int, Field(ge=0)] = 16
    """Rank of the LoRA adapters on every linear layer of the blocks (peft), trained with the
    embeddings of the chat template's turn tokens and merged into the weights when training
    ends; 0 = full fine-tuning."""
    lora_alpha: PositiveNumber = 32
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_rank)."""
    train_embeddings: bool = False
    """Full fine-tuning only: also train the (usually tied) token embeddings, by far the largest
    matrix of a small model with a large vocabulary (and, for a base that never saw the chat
    template's turn tokens, the only way their embeddings learn)."""
    chat_template: Literal["model", "gemma", "byte_bpe", "sentencepiece_bpe"] = "model"
    """model: the base tokenizer's own chat template (an error if it has none); gemma: the
    package's rendering of Gemma's turn format (for a Gemma base that ships without one);
    byte_bpe, sentencepiece_bpe: the chat template of the trained families with that tokenizer."""
    heldout_pairs: Annotated[int, Field(ge=0)] = 32
    """Pairs held out of training; their response loss before and after is recorded."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """The dtype the model is trained and saved in."""
    device: Device = "auto"
    """auto: CUDA when the job has a GPU, else the CPU."""
    seed: int = 42

    @model_validator(mode="after")
    def _embeddings_need_full(self) -> FinetuneRecipe:
        if self.train_embeddings and self.lora_rank:
            raise ValueError("train_embeddings applies to full fine-tuning (lora_rank: 0) only")
        return self


class TrainingSettings(Block):
    """``training``: how families with ``source: train`` are made (the embedded default), and how
    fine-tuned variants with ``source: finetune`` are made from their family's base."""

    where = "training"

    corpus: CorpusSettings = CorpusSettings()
    recipes: dict[NonEmptyStr, Recipe] = {}
    finetunes: dict[NonEmptyStr, FinetuneRecipe] = {}

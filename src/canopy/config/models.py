"""``families`` (the model pairs) and ``training`` (how families with ``source: train`` are made:
canopy.training and its corpus read these)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationInfo, field_validator, model_validator

from canopy.config.base import Block
from canopy.config.types import (
    Device,
    NonEmptyStr,
    PositiveInt,
    PositiveNumber,
    format_fields,
    one_format_field,
)

__all__ = [
    "ARCHITECTURES",
    "CHAT_TEMPLATE_CHOICES",
    "CorpusSettings",
    "FamilySettings",
    "FinetuneRecipe",
    "ModelSettings",
    "RESERVED_TEMPLATE_ARGUMENTS",
    "Recipe",
    "TaskFraming",
    "TaskStops",
    "TOKENIZER_KINDS",
    "TrainingSettings",
]

ARCHITECTURES: tuple[str, ...] = ("gpt2", "llama")
TOKENIZER_KINDS: tuple[str, ...] = ("byte_bpe", "sentencepiece_bpe")
#: Where a fine-tune made here takes its chat template: the base tokenizer's own, or one the
#: package ships (canopy/training/data/chat_templates/<name>.jinja).
CHAT_TEMPLATE_CHOICES: tuple[str, ...] = ("model", "gemma")

#: apply_chat_template arguments the sampler itself decides.
RESERVED_TEMPLATE_ARGUMENTS = frozenset(
    {"messages", "conversation", "add_generation_prompt", "tokenize", "tools", "documents"}
)


def _not_reserved(kwargs: dict[str, Any]) -> dict[str, Any]:
    reserved = sorted(set(kwargs) & RESERVED_TEMPLATE_ARGUMENTS)
    if reserved:
        raise ValueError(f"may not set {', '.join(reserved)} (the sampler sets it)")
    return kwargs


#: Template variable names (keys of chat_template_kwargs) and their values.
ChatKwargs = Annotated[
    dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], Any],
    AfterValidator(_not_reserved),
]


class TaskStops(Block):
    """``families.<family>.<variant>.per_task.<task>``: where that task's rollouts end."""

    where = "families.<family>.<variant>.per_task.<task>"

    stop_tokens_containing: list[Annotated[str, Field(min_length=1)]] | None = None
    """As the variant's key, for this task."""
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = None
    """As the variant's key, for this task."""

    def to_config(self) -> dict[str, Any]:
        return {key: value for key, value in super().to_config().items() if value is not None}


class TaskFraming(TaskStops):
    """``families.<family>.base.per_task.<task>``: the document the base continues on that task,
    and where its rollouts end."""

    where = "families.<family>.base.per_task.<task>"

    prompt_template: Annotated[str, one_format_field("text", "document")] | None = None
    """As the base's key, for this task (e.g. "{document}": HumanEval's own code prompt, the
    function a base continues as code)."""


class _ModelSource(Block):
    source: Literal["train", "hub", "local", "gguf", "finetune"]
    """train (made by this workflow), hub (downloaded at a pinned revision), local (a
    transformers directory), gguf (a GGUF file, converted once into a transformers directory),
    finetune (finetuned only: fine-tuned here from the family's base, whatever its source)."""
    recipe: NonEmptyStr | None = Field(default=None, validate_default=True)
    """source: train — a key of training.recipes; source: finetune — a key of
    training.finetunes."""
    id: NonEmptyStr | None = Field(default=None, validate_default=True)
    """source: hub — the hub repository id, e.g. Qwen/Qwen3-8B."""
    revision: NonEmptyStr | None = Field(default=None, validate_default=True)
    """source: hub — a commit hash (or tag) that pins the weights."""
    path: NonEmptyStr | None = Field(default=None, validate_default=True)
    """source: local — a transformers model directory."""
    gguf: NonEmptyStr | None = Field(default=None, validate_default=True)
    """source: gguf — a .gguf file, or package:<module> for a Python package that ships one
    (whole, or split into part packages it requires)."""
    sha256: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")] | None = None
    """source: gguf — the sha256 the whole file must have (a package publishes its own)."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """source: gguf — the dtype the weights are dequantised to and stored in (default float32;
    sampling.<name>.dtype still decides the dtype they are sampled in)."""
    stop_tokens_containing: list[Annotated[str, Field(min_length=1)]] | None = None
    """Rollouts of this variant also end at any vocabulary token whose text contains one of these
    strings (e.g. "\n": a base model's answer is the rest of its line), counted like EOS: the
    stop is a token, so N and every entropy stay exact. Unset: EOS (and a chat model's
    end-of-turn token) only."""
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = None
    """Rollouts of this variant also end at the token whose decoded text completes one of these
    strings (as vLLM's `stop`; e.g. "\ndef" for code), however many tokens the string spans.
    The end is decided from the prefix alone, so N (which counts that token) and every entropy
    stay exact. Unset: no stop sequence."""
    per_task: dict[str, TaskStops] | None = None
    """Framing per task, by task name: a task's keys win over this variant's own, key by key (an
    empty list turns the variant's stops off for that task); a change resamples only that
    (variant, task)."""

    @field_validator("recipe", "id", "revision", "path", "gguf")
    @classmethod
    def _fits_source(cls, value: object, info: ValidationInfo) -> object:
        needs = {
            "train": ("recipe",),
            "finetune": ("recipe",),
            "hub": ("id", "revision"),
            "local": ("path",),
            "gguf": ("gguf",),
        }
        source = info.data.get("source")
        if value is None and source is not None and info.field_name in needs[source]:
            raise ValueError(f"required by source {source}")
        return value

    @model_validator(mode="after")
    def _gguf_keys(self) -> _ModelSource:
        stray = [key for key in ("sha256", "dtype") if getattr(self, key) is not None]
        if stray and self.source != "gguf":
            raise ValueError(f"{', '.join(stray)} apply to source gguf only")
        return self

    def to_config(self) -> dict[str, Any]:
        values = {key: value for key, value in super().to_config().items() if value is not None}
        if self.per_task is not None:
            values["per_task"] = {task: spec.to_config() for task, spec in self.per_task.items()}
        return values


class BaseModelSettings(_ModelSource):
    """``families.<family>.base``: the pre-trained model, sampled from the raw prompt text (chat
    options belong to the family or to its finetuned entry)."""

    where = "families.<family>.base"

    source: Literal["train", "hub", "local", "gguf"]
    """train (made by this workflow), hub (downloaded at a pinned revision), local (a
    transformers directory), gguf (a GGUF file, converted once into a transformers directory)."""
    prompt_template: Annotated[str, one_format_field("text", "document")] | None = None
    """The document the base model continues, with {text} for the prompt (e.g.
    "Question: {text}\nAnswer:"), as the finetuned variant gets its chat template, or with
    {document} for the prompt's own document where its source gives one (HumanEval: the code
    prompt, a function signature and docstring). Unset: the raw prompt text."""
    per_task: dict[str, TaskFraming] | None = None
    """Framing per task, by task name: a task's keys (prompt_template and the stops) win over the
    base's own, key by key; a change resamples only that (base, task)."""


class ModelSettings(_ModelSource):
    """``families.<family>.finetuned``: the fine-tuned model, sampled through its chat template."""

    where = "families.<family>.finetuned"

    chat_template_kwargs: ChatKwargs | None = None
    """Keyword arguments of the chat template (tokenizer.apply_chat_template), e.g.
    enable_thinking: false for Qwen3; wins key by key over the family's."""
    system_prompt: NonEmptyStr | None = None
    """A system turn before each prompt (wins over the family's)."""


class FamilySettings(Block):
    """``families.<family>``: a base model and its fine-tuned variant."""

    where = "families.<family>"

    base: BaseModelSettings
    finetuned: ModelSettings
    chat_template_kwargs: ChatKwargs | None = None
    """Keyword arguments of the finetuned variant's chat template; part of what is sampled, so
    changing it resamples that family only."""
    system_prompt: NonEmptyStr | None = None
    """A system turn before each prompt in the finetuned variant's chat template."""

    @model_validator(mode="after")
    def _trained_together(self) -> FamilySettings:
        # A fine-tuned model is made from its own base, so a trained family trains both.
        if (self.base.source == "train") != (self.finetuned.source == "train"):
            raise ValueError(
                "source train must be used for both base and finetuned (the fine-tuned model is "
                "made from the trained base); to fine-tune a downloaded, local or GGUF base here, "
                "give finetuned source finetune"
            )
        return self

    def to_config(self) -> dict[str, Any]:
        return {
            "base": self.base.to_config(),
            "finetuned": self.finetuned.to_config(),
            **{
                key: value
                for key, value in super().to_config().items()
                if key not in ("base", "finetuned") and value is not None
            },
        }


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
    chat_template: Literal["model", "gemma"] = "model"
    """model: the base tokenizer's own chat template (an error if it has none); gemma: the
    package's rendering of Gemma's turn format (for a Gemma base that ships without one)."""
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

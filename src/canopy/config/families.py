"""``families`` (the model pairs): where each model comes from and how its prompts are framed.

A variant's ``source`` picks one of the source blocks below, a discriminated union: each source
takes its own keys (``hub`` an ``id`` and a ``revision``, ``gguf`` a file and its checksum, ...)
and no other source's. The blocks are defined here, with the rest of the configuration, so that
validating a config imports nothing else; :mod:`canopy.sources` gives each kind its rule, its
record and its lock entry, and names the block it reads.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import AfterValidator, Field, model_validator

from canopy.config.base import Block
from canopy.config.types import NonEmptyStr, one_format_field

__all__ = [
    "BASE_SOURCES",
    "BaseModelSettings",
    "FINETUNED_SOURCES",
    "FamilySettings",
    "FinetuneSource",
    "GgufSource",
    "HubSource",
    "LocalSource",
    "ModelSettings",
    "RESERVED_TEMPLATE_ARGUMENTS",
    "SourceKeys",
    "TaskFraming",
    "TaskStops",
    "TrainSource",
]

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
_Stops = list[Annotated[str, Field(min_length=1)]]


class TaskStops(Block):
    """``families.<family>.<variant>.per_task.<task>``: where that task's rollouts end."""

    where = "families.<family>.<variant>.per_task.<task>"

    stop_tokens_containing: _Stops | None = None
    """As the variant's key, for this task."""
    stop_sequences: _Stops | None = None
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


# ------------------------------------------------------------------------------- the sources


class SourceKeys(Block):
    """The keys of one model source; a subclass per kind, whose ``source`` is its one tag."""

    source: str

    #: The variants the source can make: a fine-tune of the family's base is finetuned only.
    variants: ClassVar[tuple[str, ...]] = ("base", "finetuned")

    @classmethod
    def kind(cls) -> str:
        """The ``source`` value that selects this block."""
        (tag,) = cls.model_fields["source"].annotation.__args__
        return str(tag)

    @classmethod
    def own_keys(cls) -> tuple[str, ...]:
        """The keys this source reads besides ``source``, in their order in its block."""
        source = next(klass for klass in cls.__mro__ if klass in SOURCES)
        return tuple(name for name in source.model_fields if name != "source")


class TrainSource(SourceKeys):
    source: Literal["train"]
    """train: made by this workflow from its own corpus (both variants of the family)."""
    recipe: NonEmptyStr
    """A key of training.recipes."""


class HubSource(SourceKeys):
    source: Literal["hub"]
    """hub: downloaded at a pinned revision."""
    id: NonEmptyStr
    """The hub repository id, e.g. Qwen/Qwen3-8B."""
    revision: NonEmptyStr
    """A commit hash (or tag) that pins the weights."""


class LocalSource(SourceKeys):
    source: Literal["local"]
    """local: a transformers directory, used where it is."""
    path: NonEmptyStr
    """A transformers model directory."""


class GgufSource(SourceKeys):
    source: Literal["gguf"]
    """gguf: a GGUF file, converted once into a transformers directory."""
    gguf: NonEmptyStr
    """A .gguf file, or package:<module> for a Python package that ships one (whole, or split
    into part packages it requires)."""
    sha256: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")] | None = None
    """The sha256 the whole file must have (a package publishes its own)."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """The dtype the weights are dequantised to and stored in (default float32;
    sampling.<name>.dtype still decides the dtype they are sampled in)."""


class FinetuneSource(SourceKeys):
    source: Literal["finetune"]
    """finetune (finetuned only): fine-tuned here from the family's base, whatever its source."""
    recipe: NonEmptyStr
    """A key of training.finetunes."""

    variants = ("finetuned",)


#: Every source, in the order the documentation lists them.
SOURCES: tuple[type[SourceKeys], ...] = (
    TrainSource,
    HubSource,
    LocalSource,
    GgufSource,
    FinetuneSource,
)


# ------------------------------------------------------------------------------- the variants


class _Framing(Block):
    # What every variant sets besides its source: where its rollouts end.
    stop_tokens_containing: _Stops | None = None
    """Rollouts of this variant also end at any vocabulary token whose text contains one of these
    strings (e.g. "\n": a base model's answer is the rest of its line), counted like EOS: the
    stop is a token, so N and every entropy stay exact. Unset: EOS (and a chat model's
    end-of-turn token) only."""
    stop_sequences: _Stops | None = None
    """Rollouts of this variant also end at the token whose decoded text completes one of these
    strings (as vLLM's `stop`; e.g. "\ndef" for code), however many tokens the string spans.
    The end is decided from the prefix alone, so N (which counts that token) and every entropy
    stay exact. Unset: no stop sequence."""
    per_task: dict[str, TaskStops] | None = None
    """Framing per task, by task name: a task's keys win over this variant's own, key by key (an
    empty list turns the variant's stops off for that task); a change resamples only that
    (variant, task)."""

    def to_config(self) -> dict[str, Any]:
        # The source's keys first, then the framing, unset keys left out (as in the file).
        assert isinstance(self, SourceKeys)
        values = {key: value for key, value in super().to_config().items() if value is not None}
        first = ["source", *self.own_keys()]
        ordered = {key: values[key] for key in first if key in values}
        ordered.update((key, value) for key, value in values.items() if key not in ordered)
        if self.per_task is not None:
            ordered["per_task"] = {task: spec.to_config() for task, spec in self.per_task.items()}
        return ordered


class _BaseFraming(_Framing):
    where = "families.<family>.base"

    prompt_template: Annotated[str, one_format_field("text", "document")] | None = None
    """The document the base model continues, with {text} for the prompt (e.g.
    "Question: {text}\nAnswer:"), as the finetuned variant gets its chat template, or with
    {document} for the prompt's own document where its source gives one (HumanEval: the code
    prompt, a function signature and docstring). Unset: the raw prompt text."""
    per_task: dict[str, TaskFraming] | None = None
    """Framing per task, by task name: a task's keys (prompt_template and the stops) win over the
    base's own, key by key; a change resamples only that (base, task)."""


class _ChatFraming(_Framing):
    where = "families.<family>.finetuned"

    chat_template_kwargs: ChatKwargs | None = None
    """Keyword arguments of the chat template (tokenizer.apply_chat_template), e.g.
    enable_thinking: false for Qwen3; wins key by key over the family's."""
    system_prompt: NonEmptyStr | None = None
    """A system turn before each prompt (wins over the family's)."""


def _variant(framing: type[_Framing], source: type[SourceKeys], doc: str) -> Any:
    # One member of a variant's union: the source's keys and the variant's framing.
    name = f"{source.kind().title()}{'Base' if framing is _BaseFraming else 'Finetuned'}"
    return type(name, (framing, source), {"__doc__": doc, "__module__": __name__})


_BASE_DOC = """``families.<family>.base``: the pre-trained model, sampled from the raw prompt text
(chat options belong to the family or to its finetuned entry)."""
_FINETUNED_DOC = """``families.<family>.finetuned``: the fine-tuned model, sampled through its chat
template."""

#: The sources a base may come from, and a finetuned variant.
BASE_SOURCES = tuple(s for s in SOURCES if "base" in s.variants)
FINETUNED_SOURCES = tuple(s for s in SOURCES if "finetuned" in s.variants)

_BASES = tuple(_variant(_BaseFraming, source, _BASE_DOC) for source in BASE_SOURCES)
_FINETUNED = tuple(_variant(_ChatFraming, source, _FINETUNED_DOC) for source in FINETUNED_SOURCES)

#: ``families.<family>.base``: one block per source, chosen by its ``source`` key.
BaseModelSettings = Annotated[Union[_BASES], Field(discriminator="source")]  # noqa: UP007
#: ``families.<family>.finetuned``: one block per source, chosen by its ``source`` key.
ModelSettings = Annotated[Union[_FINETUNED], Field(discriminator="source")]  # noqa: UP007


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

"""Loading one member of a model pair and turning a prompt into the token ids it is sampled from.

The same code path serves the tiny models the embedded default trains on a CPU and the 8B hub
models of the paper: both are ordinary transformers model directories under
``resources/models/{family}/{variant}/``. Nothing is ever fetched from a hub here
(``local_files_only=True``); a missing directory is a :class:`ModelNotFoundError` that says how to
make it.

Prompt formatting follows the paper: a ``base`` model gets the raw prompt text (with the BOS token
when its tokenizer adds one), a ``finetuned`` model gets its chat template with one user turn and
``add_generation_prompt=True``. A family may shape that template: ``chat_template_kwargs`` are
passed to ``apply_chat_template`` (Qwen3's ``enable_thinking``) and ``system_prompt`` adds a system
turn; ``chat_options`` resolves them from the config and ``check_chat_options`` rejects a keyword
the template never reads or a system prompt it drops, instead of sampling silently without them.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from canopy.config import CHAT_OPTION_KEYS, VARIANTS
from canopy.config.families import RESERVED_TEMPLATE_ARGUMENTS

if (
    TYPE_CHECKING
):  # torch is imported where it is used: the workflow reads chat_options at parse time
    import torch

__all__ = [
    "ModelNotFoundError",
    "LoadedModel",
    "ModelFiles",
    "resolve_device",
    "visible_cuda_devices",
    "resolve_dtype",
    "read_model_files",
    "load_weights",
    "load_model",
    "format_prompt",
    "chat_options",
    "check_chat_options",
    "special_token_ids",
    "tokens_containing",
    "as_id_list",
    "eos_token_ids",
    "end_of_turn_ids",
    "context_length",
    "check_model_dir",
]


class ModelNotFoundError(FileNotFoundError):
    """A model directory is missing or is not a transformers model directory."""


@dataclass(frozen=True)
class ModelFiles:
    """A model directory's small files, read once per job: the tokenizer, the model config and
    the generation config (None without ``generation_config.json``). They give the EOS ids, the
    context length and the prompts' token ids before any weight is loaded, and are handed on to
    :func:`load_weights` so that no file is read twice."""

    directory: Path
    tokenizer: Any  # a transformers tokenizer
    config: Any  # a transformers PretrainedConfig
    generation_config: Any | None  # a transformers GenerationConfig


@dataclass
class LoadedModel:
    """A causal LM ready for sampling, with the tokenizer, device and dtype it was loaded with."""

    model: Any  # a transformers PreTrainedModel (causal LM), in eval mode
    tokenizer: Any  # the matching transformers tokenizer
    device: torch.device
    dtype: torch.dtype


def visible_cuda_devices() -> int:
    """How many CUDA devices this machine shows (NVIDIA's driver, or ROCm's), without importing
    torch: the workflow asks it when it plans jobs, and torch takes seconds to load.

    ``CUDA_VISIBLE_DEVICES`` set to nothing (or -1) hides them all, as it does from torch.
    """
    import os

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    nvidia = Path("/proc/driver/nvidia/gpus")
    count = len(list(nvidia.iterdir())) if nvidia.is_dir() else 0
    return count or int(Path("/dev/kfd").exists())


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` means CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(
            f"unknown device {device!r}: use auto, cpu, cuda or cuda:<index>"
        ) from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} was requested but CUDA is not available here; use auto or cpu"
        )
    return resolved


_DTYPES = ("float32", "bfloat16", "float16")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a CUDA device that supports it (else float16), float32 on CPU."""
    import torch

    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of auto, {', '.join(_DTYPES)}")
    return getattr(torch, dtype)


def check_model_dir(path: Path) -> None:
    """Raise :class:`ModelNotFoundError` unless ``path`` looks like a transformers model directory."""
    hint = (
        "Run the workflow's model rule for it (e.g. `snakemake resources/models/<family>/<variant>`"
        " through the models stage), or fix `families.<family>.<variant>.path` in the config."
    )
    if not path.is_dir():
        raise ModelNotFoundError(f"model directory {str(path)!r} does not exist. {hint}")
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"model directory {str(path)!r} has no config.json, so it is not a transformers model "
            f"directory (an interrupted download or training run?). {hint}"
        )


def read_model_files(path: str | Path) -> ModelFiles:
    """Read the tokenizer and configs of a local transformers model directory (no weights)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    model_dir = Path(path)
    check_model_dir(model_dir)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    # Given the config, the tokenizer does not read config.json again to find its class.
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, config=config)
    try:
        generation_config = GenerationConfig.from_pretrained(model_dir, local_files_only=True)
    except OSError:  # no generation_config.json: the model config's eos is used
        generation_config = None
    return ModelFiles(model_dir, tokenizer, config, generation_config)


def load_weights(files: ModelFiles, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load the causal LM whose small files ``files`` holds; ``device`` and ``dtype`` as for
    :func:`load_model`."""
    from transformers import AutoModelForCausalLM

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    # Handing on what was read keeps each file read once per job; without a generation config
    # transformers derives one from config.json, as it does when it reads the directory itself.
    read: dict[str, Any] = {"config": files.config}
    if files.generation_config is not None:
        read["generation_config"] = files.generation_config
    model = AutoModelForCausalLM.from_pretrained(
        files.directory, local_files_only=True, dtype=torch_dtype, **read
    )
    model.to(torch_device)
    model.eval()
    return LoadedModel(
        model=model, tokenizer=files.tokenizer, device=torch_device, dtype=torch_dtype
    )


def load_model(path: str | Path, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load a causal LM and its tokenizer from a local transformers model directory.

    ``device``: ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda``, ``cuda:1``...
    ``dtype``: ``auto`` (bfloat16 on CUDA when supported, else float16; float32 on CPU),
    ``float32``, ``bfloat16`` or ``float16``. The model is returned in eval mode.
    """
    return load_weights(read_model_files(path), device, dtype)


def chat_options(family: Mapping[str, Any], variant: str, *, name: str = "?") -> dict[str, Any]:
    """The chat options a variant is sampled with: the family's ``chat_template_kwargs`` and
    ``system_prompt``, overridden key by key by the finetuned variant's own; none for ``base``
    (sampled from the raw text), where setting them is an error."""
    base = family.get("base") or {}
    stray = [key for key in CHAT_OPTION_KEYS if key in base]
    if stray:
        raise ValueError(
            f"families.{name}.base sets {', '.join(stray)}, but the base variant is sampled from "
            f"the raw prompt text: move them to families.{name} or families.{name}.finetuned"
        )
    if variant == "base":
        return {}
    if variant != "finetuned":
        raise ValueError(f"unknown variant {variant!r}: use one of {', '.join(VARIANTS)}")
    own = family.get(variant) or {}
    kwargs = {
        **(family.get("chat_template_kwargs") or {}),
        **(own.get("chat_template_kwargs") or {}),
    }
    options: dict[str, Any] = {}
    if kwargs:
        options["chat_template_kwargs"] = kwargs
    system_prompt = own.get("system_prompt", family.get("system_prompt"))
    if system_prompt is not None:
        options["system_prompt"] = system_prompt
    for key, value in kwargs.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(
                f"families.{name}: chat_template_kwargs key {key!r} is not a template variable name"
            )
        if key in RESERVED_TEMPLATE_ARGUMENTS:
            raise ValueError(
                f"families.{name}: chat_template_kwargs may not set {key!r} (the sampler sets it)"
            )
    if system_prompt is not None and (not isinstance(system_prompt, str) or not system_prompt):
        raise ValueError(f"families.{name}: system_prompt must be a non-empty string")
    return options


def _messages(text: str, system_prompt: str | None) -> list[dict[str, str]]:
    user = {"role": "user", "content": text}
    return [{"role": "system", "content": system_prompt}, user] if system_prompt else [user]


def _template_ids(tokenizer: Any, messages: list[dict[str, str]], kwargs: Mapping) -> list[int]:
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, **dict(kwargs)
    )
    # transformers 5 returns a BatchEncoding here; older versions a plain list.
    if not isinstance(ids, list):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def _require_template(tokenizer: Any, name: str) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(
            f"cannot format {name} for a finetuned model: its tokenizer "
            f"({getattr(tokenizer, 'name_or_path', '?')!r}) has no chat template. Fine-tuned "
            "(instruct) models must ship one (chat_template in tokenizer_config.json or "
            "chat_template.jinja); use variant 'base' for a model without one."
        )
    if isinstance(template, dict):  # several named templates: apply_chat_template uses "default"
        template = template.get("default") or next(iter(template.values()))
    return template


def check_chat_options(
    tokenizer: Any,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    system_prompt: str | None = None,
) -> None:
    """Raise ValueError if the tokenizer's chat template never reads one of the keyword arguments
    (a misspelt ``enable_thinking`` would otherwise be ignored silently) or drops the system
    prompt."""
    if not chat_template_kwargs and system_prompt is None:
        return
    from jinja2 import Environment, meta

    template = _require_template(tokenizer, "the prompts")
    read = meta.find_undeclared_variables(Environment().parse(template))
    unread = sorted(key for key in (chat_template_kwargs or {}) if key not in read)
    owner = getattr(tokenizer, "name_or_path", "?")
    if unread:
        raise ValueError(
            f"the chat template of {owner!r} never reads {', '.join(unread)} (it reads "
            f"{', '.join(sorted(read)) or 'no variables'}): fix chat_template_kwargs in the "
            "family's config"
        )
    if system_prompt is not None:
        probe = "canopy probe"
        with_system = _template_ids(
            tokenizer, _messages(probe, system_prompt), chat_template_kwargs or {}
        )
        without = _template_ids(tokenizer, _messages(probe, None), chat_template_kwargs or {})
        if with_system == without:
            raise ValueError(
                f"the chat template of {owner!r} ignores the system turn, so system_prompt would "
                "have no effect: remove it from the family's config"
            )


def format_prompt(
    tokenizer: Any,
    text: str,
    variant: str,
    *,
    prompt_id: str | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    system_prompt: str | None = None,
    prompt_template: str | None = None,
    document: str | None = None,
) -> list[int]:
    """Token ids a model of ``variant`` is sampled from for the prompt ``text``.

    ``base``: the raw text, or ``prompt_template`` with the text in its ``{text}`` field (or the
    prompt's ``document`` in its ``{document}`` field), with the BOS token when the tokenizer adds
    special tokens by default.
    ``finetuned``: the tokenizer's chat template applied to one user turn (after a system turn
    when ``system_prompt`` is given), with the generation prompt and ``chat_template_kwargs``.
    """
    name = f"prompt {prompt_id!r}" if prompt_id is not None else "the prompt"
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{name} is empty: every prompt needs text (check resources/prompts/)")
    if prompt_template is not None and variant != "base":
        raise ValueError(f"{name}: prompt_template applies to the base variant only")
    if variant == "base":
        if chat_template_kwargs or system_prompt is not None:
            raise ValueError(f"{name}: chat options apply to the finetuned variant only")
        fields = {f for _, f, _, _ in string.Formatter().parse(prompt_template or "") if f}
        if "document" in fields and not document:
            raise ValueError(
                f"{name}: prompt_template uses {{document}}, but the prompt has no document "
                "(only some sources give one: humaneval)"
            )
        if prompt_template is not None:
            text = prompt_template.format(text=text, document=document)
        ids = [int(i) for i in tokenizer(text)["input_ids"]]
    elif variant == "finetuned":
        _require_template(tokenizer, name)
        ids = _template_ids(tokenizer, _messages(text, system_prompt), chat_template_kwargs or {})
    else:
        raise ValueError(
            f"unknown variant {variant!r} for {name}: use one of {', '.join(VARIANTS)}"
        )
    if not ids:
        raise ValueError(f"{name} formats to zero tokens for variant {variant!r}")
    return ids


def as_id_list(value: Any) -> list[int]:
    """A config's token id field (None, one id or several) as a list of ids."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, Iterable):
        return [int(v) for v in value if v is not None]
    return []


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token id that ends a rollout: the union of the generation config's ``eos_token_id``
    (an int or a list: Llama 3.1 and Gemma 3 name several), the model config's and the tokenizer's.
    """
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        ids.update(as_id_list(getattr(generation_config, "eos_token_id", None)))
    config = getattr(model, "config", None)
    if config is not None:
        ids.update(as_id_list(getattr(config, "eos_token_id", None)))
        get_text_config = getattr(config, "get_text_config", None)
        if callable(get_text_config):
            ids.update(as_id_list(getattr(get_text_config(), "eos_token_id", None)))
    ids.update(as_id_list(getattr(tokenizer, "eos_token_id", None)))
    if not ids:
        raise ValueError(
            f"model {getattr(config, 'name_or_path', '?')!r} names no end-of-sequence token (none in "
            "generation_config.json, config.json or the tokenizer): set eos_token_id in its "
            "generation_config.json"
        )
    return sorted(ids)


def end_of_turn_ids(
    tokenizer: Any,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    system_prompt: str | None = None,
) -> list[int]:
    """The special token the chat template closes an assistant turn with (ChatML's
    ``<|im_end|>``, Gemma's ``<end_of_turn>``, Llama 3's ``<|eot_id|>``), as a list of at most one
    id: a fine-tuned model ends its answer with it, and not every generation config names it as
    an end-of-sequence token. Empty when the template has none (it renders no assistant turn, or
    ends one with plain text)."""
    probe = "canopy probe answer"
    messages = _messages("canopy probe", system_prompt) + [{"role": "assistant", "content": probe}]
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=False, **dict(chat_template_kwargs or {})
        )
    except Exception:  # noqa: BLE001 - a template may refuse a closing assistant turn
        return []
    if not isinstance(text, str) or probe not in text:
        return []
    after = text[text.rindex(probe) + len(probe) :]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    return [int(ids[0])] if ids and int(ids[0]) in special_token_ids(tokenizer) else []


def special_token_ids(tokenizer: Any) -> set[int]:
    """The tokenizer's special tokens: its named ones (BOS, EOS, ...) and every added token marked
    special (a GGUF tokenizer's ``<start_of_turn>`` is one, without being named)."""
    return set(getattr(tokenizer, "all_special_ids", []) or []) | {
        int(i) for i, token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items()
        if getattr(token, "special", False)
    }


def tokens_containing(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Every id of the tokenizer's vocabulary whose decoded text contains one of ``texts`` (special
    tokens left out): where a variant with ``stop_tokens_containing`` ends its rollouts. Raises
    ValueError for a text no token contains."""
    special = special_token_ids(tokenizer)
    vocabulary = [i for i in range(len(tokenizer)) if i not in special]
    decoded = tokenizer.batch_decode([[i] for i in vocabulary], clean_up_tokenization_spaces=False)
    found: set[int] = set()
    for text in texts:
        matches = [i for i, piece in zip(vocabulary, decoded) if text in piece]
        if not matches:
            raise ValueError(
                f"no token of {getattr(tokenizer, 'name_or_path', '?')!r} contains {text!r}, so "
                "no rollout could stop there: correct stop_tokens_containing"
            )
        found.update(matches)
    return sorted(found)


def context_length(model: Any) -> int | None:
    """The model's maximum sequence length (``max_position_embeddings``), or None if it names none."""
    config = model.config
    get_text_config = getattr(config, "get_text_config", None)
    text_config = get_text_config() if callable(get_text_config) else config
    for candidate in (text_config, config):
        value = getattr(candidate, "max_position_embeddings", None)
        if isinstance(value, int) and value > 0:
            return value
    return None

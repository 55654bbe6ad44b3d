"""Sampling backends behind one small registry: a name of ``SamplingSettings.backend`` -> factory.

A backend is built from (model directory, settings, EOS ids) and samples a list of formatted
prompts, handing each prompt's rows to ``on_done(index, rows)`` as soon as they are complete (so
the caller can write its shard). Factories import their engine lazily: choosing ``canopy`` never
imports vLLM, and the vLLM module imports nothing from here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from canopy.sampling.batcher import PromptJob
from canopy.sampling.settings import BACKENDS, SamplingSettings

__all__ = ["Backend", "register_backend", "make_backend", "registered_backends"]

OnDone = Callable[[int, list[dict[str, Any]]], None]


class Backend(Protocol):
    def sample_prompts(self, jobs: Sequence[PromptJob], on_done: OnDone) -> None: ...


Factory = Callable[[Path, SamplingSettings, list[int]], Backend]
_REGISTRY: dict[str, Factory] = {}


def register_backend(name: str, factory: Factory) -> None:
    _REGISTRY[name] = factory


def registered_backends() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def make_backend(
    name: str, model_dir: Path, settings: SamplingSettings, eos_ids: list[int]
) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"unknown sampling backend {name!r}: use one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name](model_dir, settings, eos_ids)


class CanopyBackend:
    """Our sampler: the model loaded with transformers, prompts through the continuous batcher."""

    def __init__(self, model_dir: Path, settings: SamplingSettings, eos_ids: list[int]) -> None:
        from canopy.modeling import load_model

        self.loaded = load_model(model_dir, device=settings.device, dtype=settings.dtype)
        self.settings = settings
        self.eos_ids = eos_ids

    def sample_prompts(self, jobs: Sequence[PromptJob], on_done: OnDone) -> None:
        from canopy.sampling.batcher import sample_prompts

        sample_prompts(self.loaded, jobs, self.settings, eos_ids=self.eos_ids, on_done=on_done)


def _vllm_backend(model_dir: Path, settings: SamplingSettings, eos_ids: list[int]) -> Backend:
    from canopy.sampling.vllm import VllmSampler

    return VllmSampler(model_dir, settings, eos_ids)


register_backend("canopy", CanopyBackend)
register_backend("vllm", _vllm_backend)
if set(_REGISTRY) != set(BACKENDS):  # one list of names for the settings' check and the registry
    raise RuntimeError(f"backend registry {sorted(_REGISTRY)} differs from BACKENDS {BACKENDS}")

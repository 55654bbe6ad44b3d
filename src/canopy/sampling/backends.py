"""Sampling backends behind one small registry: a name of ``SamplingSettings.backend`` -> factory.

A backend is built from (the model's files as the job read them, settings, EOS ids, stop
sequences) and samples a list of formatted prompts, handing each prompt's rows to ``on_done(index, rows)`` as soon as they are complete (so
the caller can write its shard). Factories import their engine lazily: choosing ``canopy`` never
imports vLLM, and the vLLM module imports nothing from here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from canopy.modeling import ModelFiles, load_weights
from canopy.sampling.batcher import PromptJob
from canopy.sampling.settings import BACKENDS, SamplingSettings
from canopy.sampling.stops import StopSequences

__all__ = ["Backend", "register_backend", "make_backend", "registered_backends"]

OnDone = Callable[[int, list[dict[str, Any]]], None]


class Backend(Protocol):
    def sample_prompts(self, jobs: Sequence[PromptJob], on_done: OnDone) -> None: ...


#: (the model's files, settings, EOS ids, stop sequences or None).
Factory = Callable[[ModelFiles, SamplingSettings, list[int], "StopSequences | None"], Backend]
_REGISTRY: dict[str, Factory] = {}


def register_backend(name: str, factory: Factory) -> None:
    _REGISTRY[name] = factory


def registered_backends() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def make_backend(
    name: str,
    files: ModelFiles,
    settings: SamplingSettings,
    eos_ids: list[int],
    stops: StopSequences | None = None,
) -> Backend:
    """A backend that ends rollouts at ``eos_ids`` and, where it can, at ``stops``; rows a
    backend returns past a stop are cut by the caller (sample_task, stops.cut_at_stop)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown sampling backend {name!r}: use one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name](files, settings, eos_ids, stops)


class CanopyBackend:
    """Our sampler: the model loaded with transformers, prompts through the continuous batcher.
    Its weights are loaded with the tokenizer and configs the job read already."""

    def __init__(
        self,
        files: ModelFiles,
        settings: SamplingSettings,
        eos_ids: list[int],
        stops: StopSequences | None = None,
    ) -> None:
        self.loaded = load_weights(files, device=settings.device, dtype=settings.dtype)
        self.settings = settings
        self.eos_ids = eos_ids
        self.stops = stops  # rows end at a stop sequence during generation

    def sample_prompts(self, jobs: Sequence[PromptJob], on_done: OnDone) -> None:
        from canopy.sampling.batcher import sample_prompts

        sample_prompts(
            self.loaded,
            jobs,
            self.settings,
            eos_ids=self.eos_ids,
            on_done=on_done,
            stops=self.stops,
        )


def _vllm_backend(
    files: ModelFiles,
    settings: SamplingSettings,
    eos_ids: list[int],
    stops: StopSequences | None = None,
) -> Backend:
    from canopy.sampling.vllm import VllmSampler

    # The engine runs without detokenisation, so it cannot match text: its rows run on to EOS or
    # max_new_tokens and sample_task cuts them at the first stop (the steps past it are wasted).
    del stops

    return VllmSampler(files.directory, settings, eos_ids)


register_backend("canopy", CanopyBackend)
register_backend("vllm", _vllm_backend)
if set(_REGISTRY) != set(BACKENDS):  # one list of names for the settings' check and the registry
    raise RuntimeError(f"backend registry {sorted(_REGISTRY)} differs from BACKENDS {BACKENDS}")

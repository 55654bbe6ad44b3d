"""Optional vLLM backend (GPU): vLLM samples, we rebuild q_t from its top-K log-probabilities.

vLLM returns, per step, the log-probabilities of the K most likely tokens of the *raw* model
distribution (``logprobs_mode="raw_logprobs"``) plus the drawn token. Raw log-probabilities differ
from the logits by one constant per step, which cancels in a softmax, so applying temperature,
top-k and top-p to the K candidates and renormalising gives exactly the
distribution vLLM sampled from whenever top_k <= K. With top-k off the tail beyond the K
candidates is lost and the entropies are a (slight) underestimate: we warn.

vLLM is imported lazily; without it, choosing ``backend: vllm`` fails with a clear message. Only
the renormalisation is pure Python and tested here; the engine calls run on a GPU machine.
Unlike the ``canopy`` backend, vLLM's draws depend on its batching, so reruns match only when the
engine schedules the same way (each prompt gets a stable seed from (seed, prompt_id)).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from canopy.sampling.distribution import processed_log_distribution, prompt_seed
from canopy.sampling.kernel import rollout_row
from canopy.sampling.settings import SamplingSettings

__all__ = ["CANDIDATES_WHEN_TOP_K_OFF", "candidate_count", "renormalised_step", "VllmSampler"]

#: How many log-probabilities to request per step when top-k is off (then not exact).
CANDIDATES_WHEN_TOP_K_OFF = 1000


def candidate_count(settings: SamplingSettings) -> int:
    """K, the number of top log-probabilities to request: top_k itself (exact), or a default."""
    if settings.top_k > 0:
        return settings.top_k
    warnings.warn(
        f"backend vllm with top_k=0: q_t is renormalised over the top {CANDIDATES_WHEN_TOP_K_OFF} "
        "candidates only, so step entropies slightly underestimate the truth; set top_k for "
        "exact values",
        stacklevel=2,
    )
    return CANDIDATES_WHEN_TOP_K_OFF


def _as_float(value: Any) -> float:
    # vLLM gives Logprob objects (with .logprob); tests give plain floats.
    return float(getattr(value, "logprob", value))


def renormalised_step(
    candidates: Mapping[int, Any], drawn: int, settings: SamplingSettings, *, where: str = ""
) -> tuple[float, float]:
    """(h_t, log q_t(drawn)) from one step's candidate log-probabilities {token id: raw logprob}.

    The candidates must include the K >= top_k most likely tokens; their raw log-probabilities
    are treated as logits (same softmax) and processed exactly like the canopy backend does.
    """
    if settings.top_k > 0 and len(candidates) < settings.top_k:
        raise ValueError(
            f"{where}: vLLM returned {len(candidates)} candidates but top_k={settings.top_k}; "
            "request at least top_k log-probabilities (max_logprobs >= top_k)"
        )
    ids = torch.tensor(list(candidates), dtype=torch.long)
    raw = torch.tensor([_as_float(v) for v in candidates.values()], dtype=torch.float32)
    log_q, order = processed_log_distribution(
        raw.unsqueeze(0), settings.temperature, settings.top_k, settings.top_p
    )
    log_q, token_ids = log_q[0], ids[order[0]]
    q = log_q.exp()
    entropy = float(-torch.where(q > 0, q * log_q, torch.zeros_like(q)).sum())
    match = torch.nonzero(token_ids == int(drawn)).flatten()
    if len(match) == 0 or not torch.isfinite(log_q[match[0]]):
        raise ValueError(f"{where}: drawn token {drawn} lies outside the processed distribution")
    return entropy, float(log_q[match[0]])


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as error:
        raise ImportError(
            "sampling backend 'vllm' needs the vllm package (GPU only), which is not installed "
            "here: `pip install vllm` on a CUDA machine, or set backend: canopy"
        ) from error
    return vllm


class VllmSampler:
    """Per-prompt sampling with a vLLM engine; rows have the canopy backend's columns."""

    def __init__(
        self, model_dir: str | Path, settings: SamplingSettings, eos_ids: Sequence[int]
    ) -> None:
        vllm = _import_vllm()
        self.settings = settings
        self.eos_ids = sorted(set(int(e) for e in eos_ids))
        self.candidates = candidate_count(settings)
        self.vllm = vllm
        self.engine = vllm.LLM(
            model=str(model_dir),
            dtype="auto" if settings.dtype == "auto" else settings.dtype,
            seed=settings.seed,
            max_logprobs=self.candidates,
            logprobs_mode="raw_logprobs",
        )

    def sample_prompts(
        self, jobs: Sequence[Any], on_done: Callable[[int, list[dict[str, Any]]], None]
    ) -> None:
        """One engine call per prompt, so that each prompt's shard is written when it ends."""
        for index, job in enumerate(jobs):
            on_done(index, self.sample_prompt(list(job.token_ids), job.prompt_id))

    def sample_prompt(self, prompt_ids: list[int], prompt_id: str) -> list[dict[str, Any]]:
        s = self.settings
        params = self.vllm.SamplingParams(
            n=s.rollouts,
            temperature=s.temperature,
            top_k=s.top_k if s.top_k > 0 else -1,
            top_p=s.top_p,
            max_tokens=s.max_new_tokens,
            seed=prompt_seed(s.seed, prompt_id) % 2**31,
            logprobs=self.candidates,
            stop_token_ids=self.eos_ids,
        )
        request = {"prompt_token_ids": list(prompt_ids)}
        (result,) = self.engine.generate([request], params, use_tqdm=False)
        rows = []
        for sample, completion in enumerate(result.outputs):
            tokens = [int(t) for t in completion.token_ids]
            if completion.finish_reason == "stop" and (
                not tokens or tokens[-1] not in self.eos_ids
            ):
                raise RuntimeError(
                    f"prompt {prompt_id!r}: vLLM stopped without returning the EOS token; "
                    "its entropy step would be missing"
                )
            entropies, logprobs = [], []
            for step, (token, candidates) in enumerate(zip(tokens, completion.logprobs)):
                h, lq = renormalised_step(
                    candidates,
                    token,
                    s,
                    where=f"prompt {prompt_id!r} rollout {sample} step {step + 1}",
                )
                entropies.append(h)
                logprobs.append(lq)
            hit_eos = bool(tokens) and tokens[-1] in self.eos_ids
            rows.append(
                rollout_row(
                    prompt_id, sample, len(prompt_ids), tokens, entropies, logprobs, hit_eos
                )
            )
        return rows

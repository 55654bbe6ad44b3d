"""The vLLM backend: vLLM samples, we rebuild q_t from its top-K log-probabilities.

vLLM returns, per step, the log-probabilities of the K most likely tokens of the *raw* model
distribution (``logprobs_mode="raw_logprobs"``) plus the drawn token. Raw log-probabilities differ
from the logits by one constant per step, which cancels in a softmax, so applying temperature,
top-k and top-p to the K candidates and renormalising (in float64) gives exactly the distribution
vLLM sampled from whenever top_k <= K. With top-k off the tail beyond the K candidates is lost and
the entropies are an underestimate: we warn. Unlike the ``canopy`` backend, vLLM's draws depend on
its batching, so reruns match only when the engine schedules the same way (each prompt gets a
stable seed from (seed, prompt_id), its rollout i the seed + i).

The engine runs in a worker process (``python -c`` loading this file): the interpreter is
``$CANOPY_VLLM_PYTHON`` when set (a virtual environment holding vLLM, e.g. ``build/vllm`` that
``setup.sh --test`` makes with the CPU build), else the current one (vLLM installed beside the
workflow, as GPU users do). A separate interpreter is what lets vLLM's own pins (another
transformers) live beside the project's, and a ``-c`` main module is what keeps vLLM's spawned
engine core from re-running a Snakemake script. So this module, at import, needs the standard
library and numpy only: the worker side (``serve``) imports vLLM, the parent side (``VllmSampler``)
the library, each lazily.

The worker hands all prompts of a job to one engine (``LLMEngine.add_request``/``step``, so its
scheduler batches across prompts), asks for each prompt's result once its last rollout ends
(``RequestOutputKind.FINAL_ONLY``) with flat log-probabilities (no object per candidate), and
renormalises that prompt's steps in one vectorised pass before sending the rows back.
``$CANOPY_VLLM_ENGINE_ARGS`` (JSON) adds or overrides ``vllm.LLM`` keyword arguments, e.g.
``{"enforce_eager": true}`` (no torch.compile: an engine starts in seconds instead of minutes but
decodes slower) or ``{"tensor_parallel_size": 2}``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import warnings
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CANDIDATES_WHEN_TOP_K_OFF",
    "ENGINE_ARGS_VARIABLE",
    "PYTHON_VARIABLE",
    "VllmSampler",
    "candidate_count",
    "kv_cache_gib",
    "renormalise",
    "renormalised_step",
]

#: How many log-probabilities to request per step when top-k is off (then not exact).
CANDIDATES_WHEN_TOP_K_OFF = 1000
#: The interpreter that runs the engine (default: the current one).
PYTHON_VARIABLE = "CANOPY_VLLM_PYTHON"
#: JSON object of extra ``vllm.LLM`` keyword arguments.
ENGINE_ARGS_VARIABLE = "CANOPY_VLLM_ENGINE_ARGS"

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------ the renormalisation


def candidate_count(settings: Any) -> int:
    """K, the number of top log-probabilities to request: top_k itself (exact), or a default."""
    if settings.top_k > 0:
        return settings.top_k
    warnings.warn(
        f"backend vllm with top_k=0: q_t is renormalised over the top {CANDIDATES_WHEN_TOP_K_OFF} "
        "candidates (and the drawn token) only, so step entropies underestimate the truth; set "
        "top_k for exact values",
        stacklevel=2,
    )
    return CANDIDATES_WHEN_TOP_K_OFF


def renormalise(
    ids: np.ndarray,
    raw: np.ndarray,
    drawn: np.ndarray,
    temperature: float,
    top_k: int,
    top_p: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(h_t, log q_t(drawn), drawn found) per step, float64, for many steps at once.

    ``ids`` and ``raw`` [steps, W]: each step's candidate token ids and raw log-probabilities,
    sorted by decreasing log-probability (-inf padding last); ``drawn`` [steps]: the token drawn.
    Temperature, then top-k (the first ``top_k`` columns), then top-p (the smallest prefix whose
    mass reaches ``top_p``, the token that crosses it kept), then renormalisation: the processing
    of the canopy backend, on the candidates. A step whose drawn token is not in the processed
    support is reported as not found (its log-probability is -inf).
    """
    x = np.asarray(raw, dtype=np.float64) / temperature
    ids = np.asarray(ids)
    if top_k > 0:
        x, ids = x[:, :top_k], ids[:, :top_k]
    with np.errstate(divide="ignore", invalid="ignore"):
        shifted = x - x[:, :1]  # sorted rows: the first column is the maximum
        weights = np.exp(shifted)
        total = weights.sum(axis=1, keepdims=True)
        if top_p < 1.0:
            mass_before = np.cumsum(weights, axis=1) / total - weights / total
            keep = mass_before < top_p
            weights = np.where(keep, weights, 0.0)
            shifted = np.where(keep, shifted, -np.inf)
            total = weights.sum(axis=1, keepdims=True)
        log_q = shifted - np.log(total)
        q = weights / total
        entropy = -np.where(q > 0, q * log_q, 0.0).sum(axis=1)
    match = (ids == np.asarray(drawn)[:, None]) & (q > 0)
    found = match.any(axis=1)
    drawn_log_q = np.where(found, log_q[np.arange(len(ids)), match.argmax(axis=1)], -np.inf)
    return entropy, drawn_log_q, found


def renormalised_step(
    candidates: Mapping[int, Any], drawn: int, settings: Any, *, where: str = ""
) -> tuple[float, float]:
    """(h_t, log q_t(drawn)) from one step's candidate log-probabilities {token id: raw logprob}
    (plain floats or vLLM ``Logprob`` objects), processed with ``settings``' temperature, top-k
    and top-p: :func:`renormalise` for a single step."""
    if settings.top_k > 0 and len(candidates) < settings.top_k:
        raise ValueError(
            f"{where}: vLLM returned {len(candidates)} candidates but top_k={settings.top_k}; "
            "request at least top_k log-probabilities (max_logprobs >= top_k)"
        )
    # vLLM gives Logprob objects (with .logprob), tests plain floats.
    values = {
        int(token): float(getattr(value, "logprob", value)) for token, value in candidates.items()
    }
    ordered = sorted(values, key=values.__getitem__, reverse=True)
    ids = np.array([ordered])
    raw = np.array([[values[token] for token in ordered]])
    entropy, drawn_log_q, found = renormalise(
        ids, raw, np.array([int(drawn)]), settings.temperature, settings.top_k, settings.top_p
    )
    if not found[0]:
        raise ValueError(f"{where}: drawn token {drawn} lies outside the processed distribution")
    return float(entropy[0]), float(drawn_log_q[0])


def _completion_steps(
    completion: Any, candidates: int, top_k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One rollout's (candidate ids, raw log-probabilities, drawn ids), sorted as
    :func:`renormalise` wants them, from vLLM's flat log-probabilities: K + 1 entries per step,
    the drawn token first (with its vocabulary rank), then the top K by rank."""
    flat = completion.logprobs
    steps = len(completion.token_ids)
    width = candidates + 1
    ids = np.asarray(flat.token_ids, dtype=np.int64)
    raw = np.asarray(flat.logprobs, dtype=np.float64)
    if ids.size != steps * width:
        raise RuntimeError(
            f"vLLM returned {ids.size} log-probabilities for {steps} steps, not {width} per step "
            "(the drawn token and the top K): an unsupported vLLM version?"
        )
    ids, raw = ids.reshape(steps, width), raw.reshape(steps, width)
    drawn = np.asarray(completion.token_ids, dtype=np.int64)
    if steps and not np.array_equal(ids[:, 0], drawn):
        raise RuntimeError("vLLM's first log-probability per step is not the drawn token's")
    if top_k > 0:
        # The drawn token is among the top top_k <= K whenever top-k applied, as it must.
        return ids[:, 1:], raw[:, 1:], drawn
    # Top-k off: the candidates are the top K and, when it ranks below them, the drawn token
    # (least likely of all, so appending it keeps the rows sorted).
    rank = np.asarray(flat.ranks[::width], dtype=np.int64)
    extra = np.where(rank > candidates, raw[:, 0], -np.inf)
    return (
        np.concatenate([ids[:, 1:], ids[:, :1]], axis=1),
        np.concatenate([raw[:, 1:], extra[:, None]], axis=1),
        drawn,
    )


# ------------------------------------------------------------------------ the worker process


def _head_dim(config: Mapping[str, Any]) -> int | None:
    text = config.get("text_config") or config
    if text.get("head_dim"):
        return int(text["head_dim"])
    if text.get("hidden_size") and text.get("num_attention_heads"):
        return int(text["hidden_size"]) // int(text["num_attention_heads"])
    return None


def _check_servable(model: str) -> None:
    """Refuse, with the way out, a model whose attention the CPU build does not implement: the
    engine would otherwise fail inside its own process with a message only its log shows."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:  # another vLLM layout: the engine start reports what it refuses
        return
    supported = CPUAttentionBackend.get_supported_head_sizes()
    head_dim = _head_dim(json.loads((Path(model) / "config.json").read_text()))
    if head_dim is not None and head_dim not in supported:
        raise ValueError(
            f"vLLM's CPU build cannot serve {model!r}: its attention head size {head_dim} is not "
            f"one of {supported}. Use backend: canopy for this model"
        )


def serve(fd: int) -> None:
    """The worker: import vLLM, start the engine, sample the prompts it is sent, send the rows.

    Messages (pickled builtins only, so that the two interpreters' numpy versions never meet):
    -> ``{"platform", "vllm"}`` or ``{"error", "kind"}``; <- ``{"engine", "env", "settings"}``;
    -> ``{"ready"}`` or an error; <- ``{"prompts": [(token ids, seed), ...]}``;
    -> ``{"done": index, "rows": [(tokens, entropies, logprobs, finish reason), ...]}`` per prompt,
    then ``{"finished"}``.
    """
    from multiprocessing.connection import Connection

    connection = Connection(fd)
    try:
        import vllm
        from vllm.platforms import current_platform
    except ImportError as error:
        connection.send({"error": f"{type(error).__name__}: {error}", "kind": "import"})
        return
    connection.send({"platform": current_platform.device_type, "vllm": vllm.__version__})
    start = connection.recv()
    if start is None:
        return
    try:
        os.environ.update(start["env"])
        _check_servable(start["engine"]["model"])
        engine_args = {
            **start["engine"],
            **json.loads(os.environ.get(ENGINE_ARGS_VARIABLE) or "{}"),
        }
        llm = vllm.LLM(**engine_args)
    except Exception as error:  # noqa: BLE001 - every failure goes back to the parent
        connection.send({"error": f"{type(error).__name__}: {error}", "kind": "engine"})
        return
    connection.send({"ready": True})
    _sample(llm, connection.recv()["prompts"], start["settings"], connection)
    connection.send({"finished": True})


def _sample(llm: Any, prompts: list[tuple[list[int], int]], s: dict, connection: Any) -> None:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    rollouts, candidates, top_k = s["rollouts"], s["candidates"], s["top_k"]
    # Enough rollouts queued that the scheduler never waits for the next prompt, few enough that
    # prompts finish about in order (their shards land while the job runs).
    queued_limit = llm.llm_engine.vllm_config.scheduler_config.max_num_seqs + rollouts
    next_prompt, in_flight = 0, 0
    while next_prompt < len(prompts) or engine.has_unfinished_requests():
        while next_prompt < len(prompts) and in_flight + rollouts <= queued_limit:
            token_ids, seed = prompts[next_prompt]
            params = SamplingParams(
                n=rollouts,
                temperature=s["temperature"],
                top_k=top_k if top_k > 0 else -1,
                top_p=s["top_p"],
                max_tokens=s["max_new_tokens"],
                seed=seed,
                logprobs=candidates,
                flat_logprobs=True,
                stop_token_ids=s["eos_ids"],
                ignore_eos=True,  # only stop_token_ids end a rollout (there is no tokenizer)
                detokenize=False,
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
            engine.add_request(str(next_prompt), {"prompt_token_ids": token_ids}, params)
            next_prompt += 1
            in_flight += rollouts
        for output in engine.step():
            if not output.finished:
                continue
            in_flight -= rollouts
            completions = sorted(output.outputs, key=lambda c: c.index)
            parts = [_completion_steps(c, candidates, top_k) for c in completions]
            ids, raw, drawn = (np.concatenate([part[k] for part in parts]) for k in range(3))
            entropy, drawn_log_q, found = renormalise(
                ids, raw, drawn, s["temperature"], top_k, s["top_p"]
            )
            bounds = np.cumsum([0] + [len(c.token_ids) for c in completions])
            rows = []
            for c, lo, hi in zip(completions, bounds[:-1], bounds[1:]):
                if not found[lo:hi].all():
                    step = int(np.argmin(found[lo:hi])) + 1
                    raise RuntimeError(
                        f"prompt {output.request_id} rollout {c.index} step {step}: the drawn "
                        "token lies outside the processed distribution"
                    )
                rows.append(
                    (
                        list(c.token_ids),
                        entropy[lo:hi].tolist(),
                        drawn_log_q[lo:hi].tolist(),
                        str(c.finish_reason),
                    )
                )
            connection.send({"done": int(output.request_id), "rows": rows})


# ------------------------------------------------------------------------ the parent side


def _import_error(python: str, detail: str) -> ImportError:
    return ImportError(
        f"sampling backend 'vllm' needs the vllm package, which {python} cannot import ({detail}): "
        f"`pip install vllm` beside the workflow on a CUDA machine, or point {PYTHON_VARIABLE} at "
        "a Python that has it (`setup.sh --test` builds build/vllm with the CPU build), or set "
        "backend: canopy"
    )


def kv_cache_gib(model_dir: Path, positions: int, dtype_bytes: int) -> int:
    """Whole GiB (at least 1) of KV cache that hold ``positions`` token positions of the model:
    keys and values of every layer's key/value heads."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    text = config.get("text_config") or config
    heads = text.get("num_key_value_heads") or text["num_attention_heads"]
    per_position = 2 * text["num_hidden_layers"] * heads * _head_dim(config) * dtype_bytes
    return max(1, math.ceil(positions * per_position / 2**30))


class _Worker:
    """The worker process and its connection; vLLM's output goes to the log, its tail into
    errors."""

    def __init__(self, python: str) -> None:
        import socket
        import subprocess
        import threading
        from multiprocessing.connection import Connection

        ours, theirs = socket.socketpair()
        boot = (
            "import importlib.util, sys; "
            "spec = importlib.util.spec_from_file_location('canopy_vllm_worker', sys.argv[1]); "
            "module = importlib.util.module_from_spec(spec); "
            "sys.modules[spec.name] = module; spec.loader.exec_module(module); "
            "module.serve(int(sys.argv[2]))"
        )
        try:
            self.process = subprocess.Popen(
                [python, "-c", boot, __file__, str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        except OSError as error:
            raise _import_error(python, str(error)) from error
        theirs.close()
        self.connection = Connection(ours.detach())
        self.tail: deque[str] = deque(maxlen=40)
        self.reader = threading.Thread(target=self._forward, daemon=True)
        self.reader.start()

    def _forward(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.tail.append(line.rstrip())
            logger.info("vllm: %s", line.rstrip())

    def receive(self) -> dict[str, Any]:
        try:
            return self.connection.recv()
        except EOFError:
            self.process.wait()
            self.reader.join(timeout=5)
            raise RuntimeError(
                f"the vLLM worker ended (exit status {self.process.returncode}); its last "
                "output:\n" + "\n".join(self.tail)
            ) from None

    def close(self) -> None:
        self.connection.close()
        try:
            self.process.wait(timeout=60)
        except Exception:  # noqa: BLE001 - a worker that does not end is ended
            self.process.kill()
            self.process.wait()
        self.reader.join(timeout=5)


class VllmSampler:
    """All prompts of a job through one vLLM engine; rows have the canopy backend's columns."""

    def __init__(self, model_dir: str | Path, settings: Any, eos_ids: Sequence[int]) -> None:
        from canopy.modeling import resolve_device, resolve_dtype

        self.model_dir = Path(model_dir)
        self.settings = settings
        self.eos_ids = sorted(set(int(e) for e in eos_ids))
        self.candidates = candidate_count(settings)
        self.device = resolve_device(settings.device)
        self.dtype = str(resolve_dtype(settings.dtype, self.device)).removeprefix("torch.")
        python = os.environ.get(PYTHON_VARIABLE) or sys.executable
        self.worker = _Worker(python)
        hello = self.worker.receive()
        if "error" in hello:
            self.worker.close()
            raise _import_error(python, hello["error"])
        if hello["platform"] != self.device.type:
            self.worker.close()
            raise ValueError(
                f"device {settings.device!r} resolves to {self.device.type}, but the vLLM of "
                f"{python} (version {hello['vllm']}) runs on {hello['platform']}: set the sampling "
                "point's device to match it, or use backend: canopy"
            )
        logger.info("vLLM %s on %s from %s", hello["vllm"], hello["platform"], python)
        self.started_for: int | None = None  # the longest prompt the engine was sized for

    def _engine_args(self, longest_prompt: int) -> tuple[dict[str, Any], dict[str, str]]:
        s = self.settings
        model_len = longest_prompt + s.max_new_tokens
        engine: dict[str, Any] = {
            "model": str(self.model_dir),
            "dtype": self.dtype,
            "seed": s.seed,
            "max_logprobs": self.candidates,
            "logprobs_mode": "raw_logprobs",
            "max_model_len": model_len,
            "skip_tokenizer_init": True,  # prompts arrive as token ids, rows leave as token ids
            # The model's generation_config.json must not add defaults (a repetition penalty)
            # to what the sampling point says.
            "generation_config": "vllm",
        }
        # max_batch_rows: a number caps vLLM's rows; auto (and 0) leave them to vLLM, within the
        # KV cache below.
        rows = s.max_batch_rows if isinstance(s.max_batch_rows, int) and s.max_batch_rows else 0
        if rows:
            engine["max_num_seqs"] = rows
        env: dict[str, str] = {}
        dtype_bytes = 4 if self.dtype == "float32" else 2
        if self.device.type == "cpu" and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            # vLLM's CPU default takes a share of the machine's memory; ours holds what the
            # config asks for: max_batch_tokens, or every row of the batch (one prompt's rollouts
            # unless max_batch_rows says otherwise) at full length.
            positions = s.max_batch_tokens or (rows or s.rollouts) * model_len
            env["VLLM_CPU_KVCACHE_SPACE"] = str(
                kv_cache_gib(self.model_dir, positions, dtype_bytes)
            )
        elif self.device.type != "cpu" and s.max_batch_tokens:
            gib = kv_cache_gib(self.model_dir, s.max_batch_tokens, dtype_bytes)
            engine["kv_cache_memory_bytes"] = gib << 30
        return engine, env

    def start(self, jobs: Sequence[Any]) -> None:
        """Start the engine, sized for the longest of ``jobs``' prompts (``sample_prompts`` does
        it when nobody did; the peer benchmark starts it first so as to time the sampling)."""
        s = self.settings
        engine, env = self._engine_args(max(len(job.token_ids) for job in jobs))
        settings = {
            "rollouts": s.rollouts,
            "temperature": s.temperature,
            "top_k": s.top_k,
            "top_p": s.top_p,
            "max_new_tokens": s.max_new_tokens,
            "candidates": self.candidates,
            "eos_ids": self.eos_ids,
        }
        self.worker.connection.send({"engine": engine, "env": env, "settings": settings})
        answer = self.worker.receive()
        if "error" in answer:
            raise RuntimeError(
                f"vLLM could not start an engine for {str(self.model_dir)!r}: {answer['error']}. "
                "Its log above says more; backend: canopy samples any transformers model"
            )
        self.started_for = max(len(job.token_ids) for job in jobs)

    def sample_prompts(
        self, jobs: Sequence[Any], on_done: Callable[[int, list[dict[str, Any]]], None]
    ) -> None:
        """Sample every job's prompt in one engine; ``on_done(index, rows)`` as each one ends.
        The engine serves one call: the worker ends with it."""
        from canopy.sampling.distribution import prompt_seed
        from canopy.sampling.kernel import rollout_row

        s = self.settings
        worker = self.worker
        if not jobs:
            worker.connection.send(None)
            worker.close()
            return
        try:
            if self.started_for is None:
                self.start(jobs)
            elif max(len(job.token_ids) for job in jobs) > self.started_for:
                raise ValueError("a prompt is longer than those the engine was started for")
            # vLLM children of a request take seeds seed + i: keep them within 63 bits.
            seeds = [prompt_seed(s.seed, job.prompt_id) % 2**62 for job in jobs]
            prompts = [(list(map(int, job.token_ids)), seed) for job, seed in zip(jobs, seeds)]
            worker.connection.send({"prompts": prompts})
            while "finished" not in (message := worker.receive()):
                index = message["done"]
                job = jobs[index]
                rows = []
                for sample, (tokens, entropies, logprobs, reason) in enumerate(message["rows"]):
                    hit_eos = bool(tokens) and tokens[-1] in self.eos_ids
                    if reason == "stop" and not hit_eos:
                        raise RuntimeError(
                            f"prompt {job.prompt_id!r}: vLLM stopped without returning the EOS "
                            "token; its entropy step would be missing"
                        )
                    rows.append(
                        rollout_row(
                            job.prompt_id,
                            sample,
                            len(job.token_ids),
                            tokens,
                            entropies,
                            logprobs,
                            hit_eos,
                        )
                    )
                on_done(index, rows)
        except BaseException:
            worker.process.kill()  # a failed or interrupted job leaves no engine behind
            worker.close()
            raise
        worker.close()

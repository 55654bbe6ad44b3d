"""Benchmark: the canopy sampler vs vLLM (bare, and as our backend) vs ``generate``, side by side.

Every contender samples the same prompts, M rollouts each, with the same temperature, top-k and
token cap, in one run of this script:

* ``canopy`` — ``canopy.sampling.sample_prompts`` (exact full-vocabulary entropies);
* ``vllm-bare`` — ``vllm.LLM.generate`` of all prompts at once, a seed per prompt, no
  log-probabilities: vLLM's own speed, no entropy at all (the peer the backend is held to);
* ``vllm-backend`` — ``canopy.sampling.vllm.VllmSampler`` (what ``backend: vllm`` runs): the same
  engine with the step-entropy plugin, driven by the backend's worker, rows and all;
* ``generate`` — transformers' ``model.generate(do_sample=True, output_scores=True)``, then the
  entropies from the stored processed scores.

With ``--breakdown``, two more split the backend's cost between the engine and the worker:

* ``vllm-bare-noseed`` — ``vllm-bare`` without the per-prompt seeds;
* ``vllm-bare-entropy`` — ``vllm-bare`` with the plugin on and one log-probability per step
  (the backend's requests through ``LLM.generate``, without its worker, transport or rows).

Tokens/s = generated tokens (EOS included) per second of sampling; engine and model start-up are
not counted (each contender starts first, then is timed). Each contender runs in its own process:
the vLLM ones with the interpreter that has vLLM (``--vllm-python``; ``build/vllm`` here, made by
``setup.sh --test``), the others with this one. The vLLM contenders share the engine arguments
(``$CANOPY_VLLM_ENGINE_ARGS`` included) but for what the plugin needs (``logprobs_mode`` and
``max_logprobs``). The step-1 entropy of each prompt (the same distribution for every rollout: the
prompt's next token) must agree between canopy, the backend and ``generate``.

Models: ``random`` — the random Llama-style model of benchmarks/sampler.py (vocabulary 8192,
hidden 256, 4 layers, 4 heads, head_dim 64), saved once under build/bench/; random weights
rarely draw EOS, so rollouts run to the cap. ``gemma`` — Gemma-3-270m real weights from
build/real_weights/gemma-3-270m (the real_weights tier's directory), vocabulary 262,144, when it
exists.

Run: ``python benchmarks/vllm_peer.py`` (both models; ``--models random``; ``--top-k 0``;
``--device cuda`` with ``--dtype bfloat16`` on a GPU, where vLLM is installed beside the workflow:
``--vllm-python`` then defaults to this interpreter).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VLLM_MODULE = REPO / "src" / "canopy" / "sampling" / "vllm.py"
GEMMA_DIR = REPO / "build" / "real_weights" / "gemma-3-270m"
# The tests' tiny-model builders (tests/support/models.py) build the random models here too.
sys.path.insert(0, str(REPO / "tests"))
RANDOM_DIR = REPO / "build" / "bench"  # random-<shape>/ beneath
GEMMA_TEXTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three most important ideas in thermodynamics are",
]
CONTENDERS = ("canopy", "vllm-bare", "vllm-backend", "generate")
BREAKDOWN = ("vllm-bare-noseed", "vllm-bare-entropy")


def build_random_model(path: Path, shape: str = "small") -> Path:
    """A random model of a named shape, saved once (with a word-level tokenizer, so that it loads
    like any model directory)."""
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GenerationConfig, LlamaForCausalLM

    from sampler import GEMMA_270M_SHAPE, LLAMA_SHAPE
    from support.models import BASE_SPECIALS, llama_config, save_model_dir, word_tokenizer

    configs = {
        # benchmarks/sampler.py's model
        "small": lambda: llama_config(**LLAMA_SHAPE, context=4096),
        # Llama-3.1-8B's shape (random weights): for the GPU script
        "llama8b": lambda: llama_config(
            128256, hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, context=4096
        ),
        # Gemma-3-270m's shape (sampler.py's one definition of it): for a GPU machine that has no
        # copy of the real weights (the same work per token; random rows rarely end, so every
        # rollout runs to the cap), with this tokenizer's special ids
        "gemma270m": lambda: Gemma3TextConfig(
            **{**GEMMA_270M_SHAPE, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
        ),
    }
    config = configs[shape]()
    architecture = Gemma3ForCausalLM if shape == "gemma270m" else LlamaForCausalLM
    torch.manual_seed(0)
    # An 8B model is initialised on the GPU where there is one (minutes on a CPU), in bfloat16.
    device = "cuda" if shape == "llama8b" and torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if shape == "llama8b" else torch.float32
    with torch.device(device):
        model = architecture(config).to(dtype).eval()
    model.generation_config = GenerationConfig(eos_token_id=2, pad_token_id=0, bos_token_id=1)
    words = [f"w{i}" for i in range(len(BASE_SPECIALS), config.vocab_size)]
    tokenizer = word_tokenizer(BASE_SPECIALS, words, add_bos=False)
    tmp = path.with_name(path.name + ".tmp")
    save_model_dir(tmp, model, tokenizer)
    tmp.rename(path)
    return path


def prompts_for(model: str, model_dir: Path, count: int) -> list[list[int]]:
    if model == "gemma":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        texts = (GEMMA_TEXTS * count)[:count]
        return [tokenizer(text)["input_ids"] for text in texts]
    import numpy as np

    rng = np.random.default_rng(0)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    return [[1, *rng.integers(4, vocab, size=11).tolist()] for _ in range(count)]


# ------------------------------------------------------------------------------ contenders


def _settings(args: argparse.Namespace):
    sys.path.insert(0, str(REPO / "src"))
    from canopy.sampling import SamplingSettings

    return SamplingSettings(
        rollouts=args.rollouts,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        dtype=args.dtype,
        backend="vllm",
        seed=42,
    )


def run_canopy(args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    from canopy.modeling import load_model
    from canopy.sampling import PromptJob, sample_prompts

    settings = _settings(args)
    loaded = load_model(args.model_dir, device=args.device, dtype=args.dtype)
    jobs = [PromptJob(f"p{i}", ids) for i, ids in enumerate(prompts)]
    first: dict[int, float] = {}
    tokens = 0

    def on_done(index: int, rows: list[dict]) -> None:
        nonlocal tokens
        tokens += sum(row["n_steps"] for row in rows)
        first[index] = rows[0]["step_entropy"][0]

    _sync(args.device)
    started = time.perf_counter()
    sample_prompts(loaded, jobs, settings, eos_ids=[args.eos], on_done=on_done)
    _sync(args.device)
    return _result(tokens, time.perf_counter() - started, first, args.device)


def run_backend(args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    from canopy.sampling import PromptJob
    from canopy.sampling.vllm import VllmSampler

    os.environ["CANOPY_VLLM_PYTHON"] = args.vllm_python
    sampler = VllmSampler(args.model_dir, _settings(args), [args.eos])
    jobs = [PromptJob(f"p{i}", ids) for i, ids in enumerate(prompts)]
    sampler.start(jobs)
    first: dict[int, float] = {}
    tokens = 0
    last_rows = 0.0

    def on_done(index: int, rows: list[dict]) -> None:
        nonlocal tokens, last_rows
        tokens += sum(row["n_steps"] for row in rows)
        first[index] = rows[0]["step_entropy"][0]
        last_rows = time.perf_counter()

    started = time.perf_counter()
    sampler.sample_prompts(jobs, on_done)
    # Timed to the last rows in hand, as the bare runs are timed to generate's return; ending
    # the engine after that is reported on its own (a job pays it once).
    result = _result(tokens, last_rows - started, first, args.device)
    result["teardown_s"] = time.perf_counter() - last_rows
    return result


def run_generate(args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    import torch

    from canopy.modeling import load_model

    loaded = load_model(args.model_dir, device=args.device, dtype=args.dtype)
    # generate keeps every step's scores until the call ends: rollouts go in groups whose scores
    # stay near 2 GB (Gemma-3's 262k vocabulary takes 21 GB for 100 rollouts x 200 steps).
    vocab = loaded.model.config.get_text_config().vocab_size
    group = max(1, min(args.rollouts, int(2e9 // (args.max_new_tokens * vocab * 4))))
    groups = [group] * (args.rollouts // group) + [args.rollouts % group] * bool(
        args.rollouts % group
    )
    tokens, logprob_sum = 0, 0.0
    first: dict[int, float] = {}
    _sync(args.device)
    started = time.perf_counter()
    for index, ids in enumerate(prompts):
        for rows in groups:
            with torch.no_grad():
                out = loaded.model.generate(
                    input_ids=torch.tensor([ids], device=loaded.device),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=loaded.device),
                    do_sample=True,
                    temperature=1.0,
                    top_k=args.top_k if args.top_k > 0 else None,
                    top_p=1.0,
                    max_new_tokens=args.max_new_tokens,
                    num_return_sequences=rows,
                    output_scores=True,
                    return_dict_in_generate=True,
                    eos_token_id=args.eos,
                    pad_token_id=args.eos,
                )
            drawn = out.sequences[:, len(ids) :]
            alive = torch.ones(rows, dtype=torch.bool, device=drawn.device)
            # One step at a time: no [steps, M, vocab] stack on top of the stored scores.
            for step, scores in enumerate(out.scores):
                log_q = torch.log_softmax(scores.double(), dim=-1)
                h = -torch.where(log_q.isfinite(), log_q.exp() * log_q, 0.0).sum(-1)
                logprob_sum += float(log_q.gather(-1, drawn[:, step : step + 1])[alive].sum())
                first.setdefault(index, float(h[0]))
                tokens += int(alive.sum())
                alive &= drawn[:, step] != args.eos
    _sync(args.device)
    return _result(tokens, time.perf_counter() - started, first, args.device)


def run_bare(args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    """One bare vLLM run (``args.worker``: ``vllm-bare``, ``-noseed`` or ``-entropy``) on a fresh
    engine, its first call timed, as the backend's is."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("canopy_vllm_worker", VLLM_MODULE)
    ours = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = ours
    spec.loader.exec_module(ours)
    entropy = args.worker == "vllm-bare-entropy"
    if entropy:
        ours._register_plugin()  # as the backend's worker does, before vLLM is imported
    import vllm
    from vllm import SamplingParams

    engine = {
        "model": str(args.model_dir),
        "dtype": (
            args.dtype
            if args.dtype != "auto"
            else ("bfloat16" if args.device == "cuda" else "float32")
        ),
        "seed": 42,
        "max_model_len": max(map(len, prompts)) + args.max_new_tokens,
        "skip_tokenizer_init": True,
        "generation_config": "vllm",
        **({"max_logprobs": 1, "logprobs_mode": "processed_logits"} if entropy else {}),
        **json.loads(os.environ.get(ours.ENGINE_ARGS_VARIABLE) or "{}"),
    }
    if args.device == "cpu" and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        # The KV cache the backend gives itself (one prompt's rollouts at full length).
        dtype_bytes = 4 if engine["dtype"] == "float32" else 2
        positions = args.rollouts * engine["max_model_len"]
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(
            ours.kv_cache_gib(args.model_dir, positions, dtype_bytes)
        )
    llm = vllm.LLM(**engine)
    requests = [{"prompt_token_ids": ids} for ids in prompts]
    params = [
        SamplingParams(
            n=args.rollouts,
            temperature=1.0,
            top_k=args.top_k if args.top_k > 0 else -1,
            max_tokens=args.max_new_tokens,
            seed=None if args.worker == "vllm-bare-noseed" else 1000 + index,
            logprobs=1 if entropy else None,
            flat_logprobs=entropy,
            stop_token_ids=[args.eos],
            ignore_eos=True,
            detokenize=False,
        )
        for index in range(len(prompts))
    ]
    _sync(args.device)
    started = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    first: dict[int, float] = {}
    if entropy:
        for index, out in enumerate(outputs):
            c = out.outputs[0]
            flat = c.logprobs
            h, _ = ours.step_columns(c.token_ids, flat.token_ids, flat.logprobs, flat.ranks)
            first[index] = float(h[0])
    return _result(tokens, seconds, first, args.device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _result(tokens: int, seconds: float, first: dict[int, float], device: str) -> dict:
    peak = None
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_initialized() and torch.cuda.max_memory_allocated():
            peak = torch.cuda.max_memory_allocated() / 2**30
        else:  # vLLM's engine holds the GPU in its own process: what the device has in use
            used = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
            ).stdout.split()
            peak = int(used[0]) / 1024 if used else None
    else:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) / 2**20
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "step1_entropy": [first[i] for i in sorted(first)],
        "peak_gib": peak,
    }


# ------------------------------------------------------------------------------ driver


def _spawn(python: str, args: argparse.Namespace, contender: str, prompts_file: Path) -> dict:
    out = prompts_file.with_name(f"{contender}.json")
    command = [
        python,
        __file__,
        "--worker",
        contender,
        "--prompts-file",
        str(prompts_file),
        "--result",
        str(out),
        "--model-dir",
        str(args.model_dir),
        "--rollouts",
        str(args.rollouts),
        "--top-k",
        str(args.top_k),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--eos",
        str(args.eos),
        "--vllm-python",
        args.vllm_python,
    ]
    log = prompts_file.with_name(f"{contender}.log")
    with open(log, "w") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT)
    if code != 0:
        raise RuntimeError(f"{contender} failed ({code}); see {log}:\n{log.read_text()[-3000:]}")
    return json.loads(out.read_text())


def compare(args: argparse.Namespace, model: str, contenders: list[str]) -> dict:
    import tempfile

    prompts = prompts_for(model, args.model_dir, args.prompts)
    results: dict[str, dict] = {}
    rounds: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        prompts_file = Path(scratch) / "prompts.json"
        prompts_file.write_text(json.dumps(prompts))
        # Rounds run every contender in turn, so that a neighbour's load on a shared machine
        # falls on all of them; the fastest round of each counts.
        for _ in range(args.rounds):
            for contender in contenders:
                bare = contender.startswith("vllm-bare")
                python = args.vllm_python if bare else sys.executable
                result = _spawn(python, args, contender, prompts_file)
                rounds.setdefault(contender, []).append(result["tokens_per_s"])
                if result["tokens_per_s"] >= results.get(contender, result)["tokens_per_s"]:
                    results[contender] = result
    print(
        f"\n{model}: {args.model_dir} — {len(prompts)} prompts x M={args.rollouts}, top-k "
        f"{args.top_k}, up to {args.max_new_tokens} tokens, {args.device} {args.dtype}"
    )
    print(
        f"{'contender':<20}{'tokens':>9}{'seconds':>10}{'tokens/s':>11}{'peak GiB':>10}"
        "  tokens/s per round"
    )
    for name in contenders:
        r = results[name]
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        teardown = f"  (engine ended in {r['teardown_s']:.2f} s)" if "teardown_s" in r else ""
        print(
            f"{name:<20}{r['tokens']:>9}{r['seconds']:>10.2f}{r['tokens_per_s']:>11.1f}{peak:>10}"
            f"  {' '.join(f'{value:.0f}' for value in rounds[name])}{teardown}"
        )

    def ratio(a: str, b: str) -> None:
        if a in results and b in results:
            value = results[a]["tokens_per_s"] / results[b]["tokens_per_s"]
            print(f"  {a} / {b}: {value:.2f}x")

    ratio("vllm-backend", "vllm-bare")
    ratio("vllm-bare-noseed", "vllm-bare")
    ratio("vllm-bare-entropy", "vllm-bare")
    ratio("vllm-backend", "vllm-bare-entropy")
    ratio("canopy", "vllm-bare")
    ratio("canopy", "vllm-backend")
    ratio("canopy", "generate")
    reference = results.get("canopy", {}).get("step1_entropy")
    for name in ("vllm-backend", "vllm-bare-entropy", "generate"):
        other = results.get(name, {}).get("step1_entropy")
        if reference and other:
            worst = max(abs(a - b) for a, b in zip(reference, other))
            verdict = "agree" if worst <= 1e-4 else "DISAGREE"
            print(f"  step-1 entropy, canopy vs {name}: max |diff| {worst:.2e} ({verdict})")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="random,gemma")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument(
        "--breakdown", action="store_true", help=f"add {', '.join(BREAKDOWN)} to the contenders"
    )
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--rollouts", type=int, default=100)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    default_python = REPO / "build" / "vllm" / "bin" / "python"
    parser.add_argument(
        "--vllm-python",
        default=str(default_python) if default_python.exists() else sys.executable,
    )
    parser.add_argument("--model-dir", type=Path, help="any model directory instead of --models")
    parser.add_argument(
        "--random-shape", default="small", choices=("small", "llama8b", "gemma270m")
    )
    parser.add_argument("--json", type=Path, help="write every result here")
    # worker mode
    parser.add_argument("--worker")
    parser.add_argument("--prompts-file", type=Path)
    parser.add_argument("--result", type=Path)
    parser.add_argument("--eos", type=int, default=None)
    args = parser.parse_args()

    if args.worker:
        sys.path.insert(0, str(REPO / "src"))
        prompts = json.loads(args.prompts_file.read_text())
        runner = {
            "canopy": run_canopy,
            "vllm-backend": run_backend,
            "generate": run_generate,
            "vllm-bare": run_bare,
            "vllm-bare-noseed": run_bare,
            "vllm-bare-entropy": run_bare,
        }[args.worker]
        args.result.write_text(json.dumps(runner(args, prompts)))
        return

    sys.path.insert(0, str(REPO / "src"))
    contenders = args.contenders.split(",") + (list(BREAKDOWN) if args.breakdown else [])
    everything = {}
    targets = (
        [("custom", args.model_dir)]
        if args.model_dir
        else [(m, RANDOM_DIR if m == "random" else GEMMA_DIR) for m in args.models.split(",")]
    )
    for model, model_dir in targets:
        if model == "random":
            shape_dir = model_dir / f"random-{args.random_shape}"
            model_dir = build_random_model(shape_dir, args.random_shape)
        if not (model_dir / "config.json").exists():
            print(
                f"\n{model}: {model_dir} does not exist (the real_weights tier makes it): skipped"
            )
            continue
        args.model_dir = model_dir
        generation = json.loads((model_dir / "generation_config.json").read_text())
        eos = generation.get("eos_token_id")
        args.eos = int(eos[0] if isinstance(eos, list) else eos)
        everything[model] = compare(args, model, contenders)
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()

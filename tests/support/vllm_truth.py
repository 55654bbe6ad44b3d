"""Run in vLLM's interpreter by tests/test_vllm.py: the same engine, prompt and seed sampled twice,
once as the backend samples (the step-entropy plugin's two numbers per step) and once with every
step's full processed logits returned (``logprobs=-1``, vLLM's own gather), for an independent
float64 check in the test.

    build/vllm/bin/python tests/support/vllm_truth.py request.json result.npz

request.json: {"model", "prompt" (token ids), "rollouts", "max_tokens", "seed", "eos_ids",
"settings": [the sampling points as SamplingParams keyword arguments, ...]}. result.npz, per
setting i: ``tokens_i`` and ``truth_tokens_i`` [rollouts, steps] (-1 padded), ``entropy_i`` and
``log_q_i`` (the plugin's), and ``logits_i`` [rollouts, steps, vocab] float32 (vLLM's processed
logits).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np

MODULE = Path(__file__).resolve().parents[2] / "src" / "canopy" / "sampling" / "vllm.py"


def main(request_path: str, result_path: str) -> None:
    spec = importlib.util.spec_from_file_location("canopy_vllm_worker", MODULE)
    worker = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = worker
    spec.loader.exec_module(worker)
    worker._register_plugin()  # as the backend's worker does, before vLLM is imported
    import vllm
    from vllm import SamplingParams

    request = json.loads(Path(request_path).read_text())
    llm = vllm.LLM(
        model=request["model"],
        dtype="float32",
        seed=request["seed"],
        max_logprobs=-1,  # both requests: one log-probability, and the whole vocabulary
        logprobs_mode="processed_logits",
        max_model_len=len(request["prompt"]) + request["max_tokens"],
        skip_tokenizer_init=True,
        generation_config="vllm",
        enforce_eager=True,
        # The second request must compute exactly what the first did, not reuse its cached prefix.
        enable_prefix_caching=False,
    )
    vocab = llm.llm_engine.model_config.get_vocab_size()
    prompt = {"prompt_token_ids": request["prompt"]}
    result: dict[str, np.ndarray] = {}

    def run(setting: dict, logprobs: int):
        params = SamplingParams(
            n=request["rollouts"],
            **setting,
            max_tokens=request["max_tokens"],
            seed=request["seed"],
            logprobs=logprobs,
            flat_logprobs=True,
            stop_token_ids=request["eos_ids"],
            ignore_eos=True,
            detokenize=False,
        )
        (output,) = llm.generate([prompt], params, use_tqdm=False)
        return sorted(output.outputs, key=lambda c: c.index)

    steps = request["max_tokens"]
    for i, setting in enumerate(request["settings"]):
        shape = (request["rollouts"], steps)
        tokens = np.full(shape, -1, dtype=np.int64)
        entropy = np.full(shape, np.nan)
        log_q = np.full(shape, np.nan)
        for r, c in enumerate(run(setting, 1)):
            flat = c.logprobs
            h, lq = worker.step_columns(c.token_ids, flat.token_ids, flat.logprobs, flat.ranks)
            n = len(c.token_ids)
            tokens[r, :n], entropy[r, :n], log_q[r, :n] = c.token_ids, h, lq
        truth_tokens = np.full(shape, -1, dtype=np.int64)
        logits = np.full((*shape, vocab), -np.inf, dtype=np.float32)
        for r, c in enumerate(run(setting, -1)):
            flat = c.logprobs
            for t in range(len(c.token_ids)):
                lo, hi = flat.start_indices[t], flat.end_indices[t]
                # The drawn token first, then the whole vocabulary by decreasing logit.
                ids = np.asarray(flat.token_ids[lo + 1 : hi])
                logits[r, t, ids] = np.asarray(flat.logprobs[lo + 1 : hi], dtype=np.float32)
            truth_tokens[r, : len(c.token_ids)] = c.token_ids
        result.update(
            {
                f"tokens_{i}": tokens,
                f"entropy_{i}": entropy,
                f"log_q_{i}": log_q,
                f"truth_tokens_{i}": truth_tokens,
                f"logits_{i}": logits,
            }
        )
    np.savez(result_path, **result)
    os._exit(0)  # no engine shutdown to wait for


if __name__ == "__main__":
    main(*sys.argv[1:3])

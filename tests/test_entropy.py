"""Canopy Entropy estimators checked against exact canopies.

Two models small enough to enumerate completely give the truth: a hand-built autoregressive model
(pure numpy) and a tiny random-weight Llama from transformers. Rollouts drawn from them in the
rollout-table format go through :func:`canopy.entropy.prompt_metrics`; the estimates must land
near the enumerated values and their intervals must cover them at the nominal rate.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from canopy.entropy import (
    EXTRA_METRIC_COLUMNS,
    PROMPT_METRIC_COLUMNS,
    MetricSettings,
    TruncationWarning,
    chao_shen_entropy,
    entropy_trajectory,
    length_entropy,
    prompt_metrics,
    write_metrics,
)
from support.enumeration import CanopyLeaf, ExactCanopy, enumerate_canopy, exact_canopy
from support.models import llama_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Truncation is part of these canopies on purpose (the estimator must stay exact with it), so
# the warning threshold is lifted where it is not the subject of the test.
QUIET = MetricSettings(truncation_warning=1.0)

# The four estimators and the exact quantity each one targets.
TARGETS = {
    "canopy_entropy": lambda c: c.canopy_entropy,
    "canopy_entropy_surprisal": lambda c: c.canopy_entropy,
    "mean_length": lambda c: c.mean_length,
    "mean_rate": lambda c: c.mean_rate,
}


# ---------------------------------------------------------------------------------------------
# Models


def _entropy(q: np.ndarray) -> float:
    q = q[q > 0]
    return float(-(q * np.log(q)).sum())


class HandModel:
    """A small autoregressive model: next-token logits depend on the last token and the position.

    Vocabulary {0, 1, 2, EOS = 3}. Token 0 makes EOS likely and the next step nearly certain,
    token 2 keeps generating and spreads the next step out, so length and entropy rate correlate
    (negatively) the way they do in real models. A per-prompt shift gives different canopies.
    """

    eos = 3
    vocab = 4

    def __init__(self, shift: float, max_new_tokens: int = 6) -> None:
        self.max_new_tokens = max_new_tokens
        self.shift = shift
        # rows: previous token (0, 1, 2, start); columns: next token (0, 1, 2, EOS)
        self.logits_by_last = np.array(
            [
                [3.0, 0.0, -1.0, 1.5],
                [0.5, 0.8, 0.2, 0.0],
                [0.3, 0.4, 0.5, -2.0],
                [0.0, 0.2, 0.4, -3.0],
            ]
        )
        self._memo: dict[tuple[int, ...], np.ndarray] = {}

    def __call__(self, prefix: Sequence[int]) -> np.ndarray:
        key = tuple(prefix)
        if key not in self._memo:
            last = key[-1] if key else 3
            logits = self.logits_by_last[last].copy()
            logits[self.eos] += 0.6 * len(key) + self.shift  # EOS grows likelier with position
            logits[0] -= self.shift
            q = np.exp(logits - logits.max())
            self._memo[key] = q / q.sum()
        return self._memo[key]


def ancestral_rollouts(
    model: Callable[[Sequence[int]], np.ndarray],
    eos: int,
    max_new_tokens: int,
    n_rollouts: int,
    rng: np.random.Generator,
    prompt_id: str,
) -> list[dict]:
    """Exact ancestral sampling, one token at a time, written in the rollout-table format."""
    rows = []
    for sample in range(n_rollouts):
        tokens: list[int] = []
        entropies: list[float] = []
        logprobs: list[float] = []
        while True:
            q = model(tokens)
            # inverse-CDF draw: token k iff cdf[k-1] <= u < cdf[k] (zero-probability tokens never)
            token = int(np.searchsorted(np.cumsum(q), rng.random(), side="right"))
            token = min(token, len(q) - 1)
            entropies.append(_entropy(q))
            logprobs.append(float(np.log(q[token])))
            tokens.append(token)
            if token == eos or len(tokens) == max_new_tokens:
                break
        hit_eos = tokens[-1] == eos
        rows.append(
            {
                "prompt_id": prompt_id,
                "sample": sample,
                "prompt_tokens": 3,
                "n_steps": len(tokens),
                "hit_eos": hit_eos,
                "truncated": not hit_eos,
                "step_entropy": entropies,
                "step_logprob": logprobs,
                "sum_entropy": float(np.sum(entropies)),
                "sum_logprob": float(np.sum(logprobs)),
                "token_ids": tokens,
                "text": " ".join(map(str, tokens)),
            }
        )
    return rows


def leaf_rollouts(
    leaves: Sequence[CanopyLeaf],
    model: Callable[[Sequence[int]], np.ndarray],
    n_rollouts: int,
    rng: np.random.Generator,
    prompt_id: str,
) -> pd.DataFrame:
    """Rollouts drawn i.i.d. from the enumerated leaves (exact, by construction)."""
    probs = np.array([leaf.prob for leaf in leaves])
    picks = rng.choice(len(leaves), size=n_rollouts, p=probs / probs.sum())
    rows = []
    for sample, k in enumerate(picks):
        leaf = leaves[k]
        logprobs = [float(np.log(model(leaf.tokens[:t])[tok])) for t, tok in enumerate(leaf.tokens)]
        rows.append(
            {
                "prompt_id": prompt_id,
                "sample": sample,
                "prompt_tokens": 3,
                "n_steps": leaf.length,
                "hit_eos": leaf.hit_eos,
                "truncated": not leaf.hit_eos,
                "step_entropy": list(leaf.step_entropies),
                "step_logprob": logprobs,
                "sum_entropy": leaf.sum_entropy,
                "sum_logprob": float(np.sum(logprobs)),
                "token_ids": list(leaf.tokens),
                "text": "",
            }
        )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def hand_models() -> dict[str, tuple[HandModel, ExactCanopy]]:
    out = {}
    for prompt_id, shift in (("p0", 0.0), ("p1", 1.0)):
        model = HandModel(shift)
        leaves = enumerate_canopy(model, [model.eos], model.max_new_tokens)
        out[prompt_id] = (model, exact_canopy(leaves))
    return out


@pytest.fixture(scope="module")
def llama_canopy() -> tuple[Callable[[Sequence[int]], np.ndarray], list[CanopyLeaf], ExactCanopy]:
    """A random-weight Llama with 5 tokens (EOS = 4), enumerated to max_new_tokens = 5."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(1)
    torch.manual_seed(3)  # a seed whose canopy truncates 15 % of the time (EOS = 4 is not rare)
    config = llama_config(
        5,
        hidden=16,
        heads=2,
        context=32,
        eos=4,
        bos_token_id=0,
        pad_token_id=4,
        initializer_range=0.6,  # large weights: distributions far from uniform
    )
    model = transformers.LlamaForCausalLM(config).eval()
    prompt = [0, 1, 2]
    memo: dict[tuple[int, ...], np.ndarray] = {}

    def next_distribution(prefix: Sequence[int]) -> np.ndarray:
        key = tuple(int(t) for t in prefix)
        if key not in memo:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + list(key)])).logits[0, -1]
            # temperature 1, no top-k: the softmax itself, in float64 so it sums to 1
            memo[key] = torch.softmax(logits.double(), dim=-1).numpy()
        return memo[key]

    leaves = enumerate_canopy(next_distribution, [4], 5)
    return next_distribution, leaves, exact_canopy(leaves)


def _seed_table(
    draw: Callable[[np.random.Generator, str], pd.DataFrame], seeds: int
) -> pd.DataFrame:
    """One "prompt" per seed: each seed's rollouts are an independent replicate."""
    return pd.concat(
        [draw(np.random.default_rng(seed), f"seed{seed}") for seed in range(seeds)],
        ignore_index=True,
    )


def _check_within_3se(metrics_row: pd.Series, canopy: ExactCanopy) -> None:
    for name, target in TARGETS.items():
        estimate, se = metrics_row[name], metrics_row[f"{name}_se"]
        assert abs(estimate - target(canopy)) <= 3 * se, (name, estimate, target(canopy), se)


def _check_coverage(table: pd.DataFrame, canopy: ExactCanopy) -> None:
    """Coverage of the 95 % intervals over 200 independent seeds, and calibration of the SE.

    Bounds: a correct interval covers with probability close to 0.95 (the Student-t interval on
    100 draws of these bounded variables: 0.94-0.95). With p = 0.94, P(covered < 174 of 200) =
    7e-5; with p = 0.95, P(all 200 covered) = 4e-5. Over the 8 coverage checks of this file the
    chance that a correct implementation fails one is below 1e-3. An interval built from the
    standard deviation instead of the standard error covers every time and fails the upper
    bound; one that is 30 % too narrow covers about 0.82 and fails the lower bound.

    The SE check compares the spread of the 200 estimates with the mean reported SE: for a
    correct SE their ratio is 1 within about 5 % (one standard error of a standard deviation
    from 200 draws), so [0.8, 1.2] is a 4-sigma band.
    """
    assert len(table) == 200
    for name, target in TARGETS.items():
        truth = target(canopy)
        covered = int(
            ((table[f"{name}_ci_low"] <= truth) & (truth <= table[f"{name}_ci_high"])).sum()
        )
        assert 174 <= covered <= 199, (name, covered)
        ratio = table[name].std(ddof=1) / table[f"{name}_se"].mean()
        assert 0.8 <= ratio <= 1.2, (name, ratio)
        # unbiased: the mean of 200 estimates sits within 4 of its standard errors of the truth
        assert abs(table[name].mean() - truth) <= 4 * table[name].std(ddof=1) / math.sqrt(200)


# ---------------------------------------------------------------------------------------------
# Estimators against exact canopies


def test_hand_model_sampler_follows_the_canopy(hand_models):
    """The test's sampler is exact: every rollout is a leaf with the enumerated step entropies."""
    model, canopy = hand_models["p0"]
    leaves = {leaf.tokens: leaf for leaf in canopy.leaves}
    rows = ancestral_rollouts(
        model, model.eos, model.max_new_tokens, 300, np.random.default_rng(1), "p0"
    )
    for row in rows:
        leaf = leaves[tuple(row["token_ids"])]
        assert row["step_entropy"] == list(leaf.step_entropies)
        assert row["sum_logprob"] == pytest.approx(math.log(leaf.prob), abs=1e-12)
    assert 0.02 < canopy.truncation_prob < 0.5  # truncation is exercised


def test_hand_model_estimates_within_three_se(hand_models):
    rng = np.random.default_rng(42)
    rows = []
    for prompt_id, (model, _) in hand_models.items():
        rows += ancestral_rollouts(model, model.eos, model.max_new_tokens, 2000, rng, prompt_id)
    metrics = prompt_metrics(pd.DataFrame(rows), QUIET).set_index("prompt_id")
    for prompt_id, (_, canopy) in hand_models.items():
        row = metrics.loc[prompt_id]
        _check_within_3se(row, canopy)
        # the plug-in conditional entropy is biased only by O(K/M) through H(N)
        assert abs(
            row["conditional_entropy_given_length"] - canopy.conditional_entropy_given_length
        ) <= (3 * row["canopy_entropy_se"] + 0.01)
        assert row["length_entropy_miller_madow"] == pytest.approx(canopy.length_entropy, abs=0.05)
        assert row["truncation_rate"] == pytest.approx(canopy.truncation_prob, abs=0.03)
        assert row["rho_pearson"] < 0  # the model is built so that long rollouts are calmer


def test_hand_model_interval_coverage(hand_models):
    model, canopy = hand_models["p1"]
    table = prompt_metrics(
        _seed_table(
            lambda rng, pid: pd.DataFrame(
                ancestral_rollouts(model, model.eos, model.max_new_tokens, 100, rng, pid)
            ),
            200,
        ),
        QUIET,
    )
    _check_coverage(table, canopy)


def test_llama_canopy_is_exact(llama_canopy):
    _, leaves, canopy = llama_canopy
    assert sum(leaf.prob for leaf in leaves) == pytest.approx(1.0, abs=1e-12)
    assert canopy.canopy_entropy == pytest.approx(canopy.canopy_entropy_chain, abs=1e-10)
    # H(N, Y) = H(N) + H(Y | N), with H(Y | N) computed independently, length by length.
    h_y_given_n = 0.0
    for n, p_n in canopy.length_distribution.items():
        within = np.array([leaf.prob for leaf in leaves if leaf.length == n]) / p_n
        h_y_given_n += p_n * _entropy(within)
    assert canopy.length_entropy + h_y_given_n == pytest.approx(canopy.canopy_entropy, abs=1e-10)
    # the random weights give a canopy worth testing: far from uniform, with truncation
    assert canopy.canopy_entropy < 0.9 * canopy.mean_length * math.log(5)
    assert canopy.truncation_prob > 0.02


def test_llama_estimates_within_three_se_and_cover(llama_canopy):
    model, leaves, canopy = llama_canopy
    big = prompt_metrics(leaf_rollouts(leaves, model, 2000, np.random.default_rng(42), "x"), QUIET)
    _check_within_3se(big.iloc[0], canopy)
    table = prompt_metrics(
        _seed_table(lambda rng, pid: leaf_rollouts(leaves, model, 100, rng, pid), 200), QUIET
    )
    _check_coverage(table, canopy)


# ---------------------------------------------------------------------------------------------
# Identities and columns


def _random_table(
    rng: np.random.Generator, prompts: int, rollouts: int, max_len: int
) -> pd.DataFrame:
    rows = []
    for p in range(prompts):
        lengths = rng.integers(1, max_len + 1, size=rollouts)
        for s, n in enumerate(lengths):
            h = rng.gamma(0.5, 2.0, size=n)
            lp = -rng.gamma(0.5, 2.0, size=n)
            trunc = bool(n == max_len)
            rows.append(
                {
                    "prompt_id": f"q{p}",
                    "sample": s,
                    "n_steps": int(n),
                    "hit_eos": not trunc,
                    "truncated": trunc,
                    "step_entropy": h,
                    "step_logprob": lp,
                    "sum_entropy": float(h.sum()),
                    "sum_logprob": float(lp.sum()),
                }
            )
    return pd.DataFrame(rows)


def test_columns_follow_the_contract():
    table = prompt_metrics(_random_table(np.random.default_rng(0), 3, 10, 50), QUIET)
    assert list(table.columns) == list(PROMPT_METRIC_COLUMNS) + list(EXTRA_METRIC_COLUMNS)
    assert list(table["prompt_id"]) == ["q0", "q1", "q2"]
    assert (table["note"] == "").all()


def test_decomposition_identity_on_every_prompt():
    rollouts = _random_table(np.random.default_rng(3), 40, 30, 3000)
    table = prompt_metrics(rollouts, QUIET)
    gap = table["canopy_entropy"] - (table["decomposition_product"] + table["cov_length_rate"])
    assert (gap.abs() <= 1e-9 * np.maximum(1.0, table["canopy_entropy"].abs())).all()
    assert (gap.abs() <= 1e-9).all()  # also absolutely, at CE* in the thousands


def test_per_prompt_values_match_direct_computation():
    rollouts = _random_table(np.random.default_rng(4), 2, 25, 40)
    table = prompt_metrics(rollouts, MetricSettings(truncation_warning=1.0, confidence=0.9))
    for _, row in table.iterrows():
        group = rollouts[rollouts["prompt_id"] == row["prompt_id"]]
        n = group["n_steps"].to_numpy(float)
        h = group["sum_entropy"].to_numpy()
        r = h / n
        m = len(group)
        assert row["canopy_entropy"] == pytest.approx(h.mean(), rel=1e-12)
        assert row["canopy_entropy_se"] == pytest.approx(h.std(ddof=1) / math.sqrt(m), rel=1e-12)
        assert row["canopy_entropy_surprisal"] == pytest.approx(
            -group["sum_logprob"].mean(), rel=1e-12
        )
        assert row["mean_rate"] == pytest.approx(r.mean(), rel=1e-12)
        assert row["cov_length_rate"] == pytest.approx(np.cov(n, r, ddof=0)[0, 1], rel=1e-9)
        assert row["rho_pearson"] == pytest.approx(stats.pearsonr(n, r)[0], rel=1e-12)
        assert row["rho_spearman_p"] == pytest.approx(stats.spearmanr(n, r)[1], rel=1e-12)
        assert row["rho_kendall"] == pytest.approx(stats.kendalltau(n, r)[0], rel=1e-12)
        assert row["branching_factor"] == pytest.approx(math.exp(r.mean()))
        assert row["generation_perplexity"] == pytest.approx(math.exp(h.mean() / n.mean()))
        half = stats.t.ppf(0.95, m - 1) * row["canopy_entropy_se"]
        assert row["canopy_entropy_ci_high"] == pytest.approx(h.mean() + half, rel=1e-12)
        assert row["n_truncated"] == int(group["truncated"].sum())
        assert row["truncation_rate"] == pytest.approx(group["truncated"].mean())


def test_length_entropy_by_hand():
    # lengths 2, 2, 3, 5: p = (1/2, 1/4, 1/4), K = 3 distinct values, M = 4
    plugin, mm = length_entropy(np.array([2, 2, 3, 5]))
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert plugin == pytest.approx(expected, abs=1e-15)
    assert mm == pytest.approx(expected + 2 / 8, abs=1e-15)


def test_chao_shen_by_hand():
    # lengths 2, 2, 3, 5: M = 4, two singletons, coverage C = 1 - 2/4 = 1/2, so the shrunk
    # frequencies are (1/4, 1/8, 1/8); each term is divided by 1 - (1 - C p)^4.
    terms = [(0.25, 1 - 0.75**4), (0.125, 1 - 0.875**4), (0.125, 1 - 0.875**4)]
    expected = -sum(pa * math.log(pa) / inclusion for pa, inclusion in terms)
    assert chao_shen_entropy(np.array([2, 2, 3, 5])) == pytest.approx(expected, abs=1e-15)
    # no singletons: coverage 1, and with every value seen often the correction vanishes
    many = np.repeat([1, 2], 500)
    assert chao_shen_entropy(many) == pytest.approx(math.log(2), abs=1e-12)
    assert chao_shen_entropy(np.array([7])) == 0.0
    assert math.isnan(chao_shen_entropy(np.array([], dtype=int)))


@pytest.mark.parametrize(
    "name",
    ["uniform over 1000 lengths", "log-normal lengths up to 4000"],
)
def test_chao_shen_is_far_less_biased_when_lengths_outnumber_rollouts(name):
    """M = 100 rollouts whose lengths spread over thousands of values, as the paper's do: the
    plug-in estimate is capped at ln 100 = 4.6 nats and Miller–Madow adds at most 0.5; the
    coverage-adjusted estimate must land near the known entropy (about 6.9 nats)."""
    if name.startswith("uniform"):
        p = np.full(1000, 1 / 1000)
    else:
        x = np.arange(1, 4001)
        w = np.exp(-((np.log(x) - math.log(300)) ** 2) / (2 * 0.8**2)) / x
        p = w / w.sum()
    truth = _entropy(p)
    rng = np.random.default_rng(5)
    reps, m = 300, 100
    draws = rng.choice(p.size, size=(reps, m), p=p) + 1
    plugin, mm = np.array([length_entropy(d) for d in draws]).T
    cs = np.array([chao_shen_entropy(d) for d in draws])
    cs_bias, mm_bias = cs.mean() - truth, mm.mean() - truth
    assert plugin.max() <= math.log(m) + 1e-12
    assert mm_bias < -1.5  # Miller–Madow stays far below the truth
    assert abs(cs_bias) < 0.35 and abs(cs_bias) < abs(mm_bias) / 5


def test_conditional_entropy_uses_the_configured_length_estimator():
    rollouts = pd.DataFrame(
        {
            "prompt_id": "p",
            "sample": range(6),
            "n_steps": [3, 3, 4, 7, 9, 9],
            "truncated": False,
            "sum_entropy": [1.0, 2.0, 1.5, 3.0, 2.5, 2.0],
            "sum_logprob": [-1.0, -2.5, -1.0, -3.5, -2.0, -2.0],
        }
    )
    ce = float(np.mean([1.0, 2.0, 1.5, 3.0, 2.5, 2.0]))
    for estimator in ("plugin", "miller_madow", "chao_shen"):
        settings = MetricSettings(truncation_warning=1.0, length_entropy=estimator)
        row = prompt_metrics(rollouts, settings).iloc[0]
        assert row["length_entropy_estimator"] == estimator
        assert row["conditional_entropy_given_length"] == pytest.approx(
            ce - row[f"length_entropy_{estimator}"], abs=1e-12
        )
    assert MetricSettings().length_entropy == "chao_shen"
    with pytest.raises(ValueError, match="length_entropy"):
        MetricSettings(length_entropy="nsb")


def test_miller_madow_corrects_plugin_bias():
    """Against a known length distribution: plug-in is biased low, Miller–Madow much less so."""
    p = np.array([0.35, 0.25, 0.15, 0.1, 0.08, 0.05, 0.02])
    truth = _entropy(p)
    rng = np.random.default_rng(11)
    reps, m = 1000, 20
    lengths = rng.choice(np.arange(1, p.size + 1), size=(reps, m), p=p)
    h = np.ones((reps, m))  # entropy 1 nat per step, irrelevant here
    rollouts = pd.DataFrame(
        {
            "prompt_id": np.repeat([f"r{i}" for i in range(reps)], m),
            "sample": np.tile(np.arange(m), reps),
            "n_steps": lengths.ravel(),
            "truncated": False,
            "sum_entropy": (h * lengths).ravel(),
            "sum_logprob": -(h * lengths).ravel(),
        }
    )
    table = prompt_metrics(rollouts, QUIET)
    plugin_bias = table["length_entropy_plugin"].mean() - truth
    mm_bias = table["length_entropy_miller_madow"].mean() - truth
    se = table["length_entropy_plugin"].std() / math.sqrt(reps)  # about 0.008
    assert plugin_bias < -5 * se  # clearly biased low (about -0.17 nats)
    assert abs(mm_bias) < abs(plugin_bias) / 3
    assert (table["length_entropy_miller_madow"] >= table["length_entropy_plugin"]).all()


# ---------------------------------------------------------------------------------------------
# Degenerate input


def _rollouts(
    prompt_id: str, step_entropies: list[list[float]], truncated: list[bool] | None = None
) -> pd.DataFrame:
    truncated = truncated or [False] * len(step_entropies)
    return pd.DataFrame(
        {
            "prompt_id": prompt_id,
            "sample": range(len(step_entropies)),
            "n_steps": [len(h) for h in step_entropies],
            "hit_eos": [not t for t in truncated],
            "truncated": truncated,
            "step_entropy": step_entropies,
            "step_logprob": [[-x for x in h] for h in step_entropies],
            "sum_entropy": [float(np.sum(h)) for h in step_entropies],
            "sum_logprob": [-float(np.sum(h)) for h in step_entropies],
        }
    )


def test_single_rollout_gives_nan_with_reason():
    row = prompt_metrics(_rollouts("solo", [[0.5, 0.25]]), QUIET).iloc[0]
    assert row["n_rollouts"] == 1
    assert row["canopy_entropy"] == pytest.approx(0.75)
    assert row["canopy_entropy"] == row["decomposition_product"] + row["cov_length_rate"]
    for col in (
        "canopy_entropy_se",
        "rho_pearson",
        "rho_spearman_p",
        "rho_kendall",
        "canopy_entropy_ci_low",
    ):
        assert math.isnan(row[col]), col
    assert row["length_entropy_plugin"] == 0.0 and row["length_entropy_miller_madow"] == 0.0
    assert "fewer than 2 rollouts" in row["note"]


def test_constant_length_gives_nan_correlations():
    row = prompt_metrics(_rollouts("flat", [[0.1, 0.2], [0.3, 0.3], [1.0, 0.0]]), QUIET).iloc[0]
    assert math.isnan(row["rho_pearson"]) and math.isnan(row["rho_kendall_p"])
    assert "constant length" in row["note"]
    assert row["cov_length_rate"] == 0.0
    assert row["length_entropy_plugin"] == 0.0
    assert row["canopy_entropy_se"] > 0


def test_all_truncated_and_dropped():
    rollouts = _rollouts("cut", [[0.1, 0.2], [0.3, 0.3, 0.4]], truncated=[True, True])
    with pytest.warns(TruncationWarning):
        row = prompt_metrics(rollouts, MetricSettings(truncated="drop")).iloc[0]
    assert row["n_rollouts"] == 0 and row["n_rollouts_total"] == 2
    assert row["truncation_rate"] == 1.0 and row["n_truncated"] == 2
    assert math.isnan(row["canopy_entropy"]) and math.isnan(row["mean_length"])
    assert "all rollouts truncated and dropped" in row["note"]
    # kept, the same rollouts give ordinary estimates of the truncated canopy
    with pytest.warns(TruncationWarning):
        kept = prompt_metrics(rollouts).iloc[0]
    assert kept["canopy_entropy"] == pytest.approx(0.65)


def test_drop_removes_truncated_rollouts_only_from_the_estimates():
    rollouts = _random_table(np.random.default_rng(5), 3, 40, 12)
    assert rollouts["truncated"].any()
    dropped = prompt_metrics(rollouts, MetricSettings(truncated="drop", truncation_warning=1.0))
    finished = prompt_metrics(rollouts[~rollouts["truncated"]], QUIET)
    for col in ("canopy_entropy", "mean_rate", "rho_kendall", "length_entropy_miller_madow"):
        np.testing.assert_allclose(dropped[col], finished[col], rtol=1e-12)
    full = prompt_metrics(rollouts, QUIET)
    np.testing.assert_array_equal(dropped["truncation_rate"], full["truncation_rate"])
    assert (dropped["n_rollouts"] < full["n_rollouts"]).any()


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda t: t.at[1, "step_entropy"].__setitem__(0, float("nan")), "step_entropy at step 1"),
        (lambda t: t.at[1, "step_entropy"].__setitem__(1, -0.5), "step_entropy at step 2"),
        (
            lambda t: t.__setitem__("sum_entropy", t["sum_entropy"].where(t.index != 1, np.nan)),
            "sum_entropy",
        ),
        (
            lambda t: t.__setitem__("sum_entropy", t["sum_entropy"] + (t.index == 1) * 0.1),
            "sums to",
        ),
        (
            lambda t: t.__setitem__("n_steps", t["n_steps"] + (t.index == 1)),
            "has 2 values but n_steps is 3",
        ),
    ],
)
def test_corrupt_rollouts_raise_naming_prompt_and_sample(corrupt, message):
    table = _rollouts("bad-prompt", [[0.1, 0.2], [0.3, 0.4], [0.5]])
    table["step_entropy"] = table["step_entropy"].apply(list)
    corrupt(table)
    with pytest.raises(ValueError, match=message) as info:
        prompt_metrics(table, QUIET)
    assert "'bad-prompt'" in str(info.value) and "sample 1" in str(info.value)


def test_missing_column_and_duplicates_are_named():
    table = _rollouts("p", [[0.1], [0.2]])
    with pytest.raises(ValueError, match="truncated"):
        prompt_metrics(table.drop(columns="truncated"))
    with pytest.raises(ValueError, match="duplicate rollout: prompt 'p', sample 0"):
        prompt_metrics(pd.concat([table, table.iloc[:1]], ignore_index=True))


def test_truncation_warning_names_label_and_prompt():
    rollouts = pd.concat(
        [
            _rollouts("calm", [[0.1]] * 20),
            _rollouts("long-one", [[0.1, 0.2]] * 20, truncated=[True] * 2 + [False] * 18),
        ],
        ignore_index=True,
    )
    with pytest.warns(
        TruncationWarning, match=r"llama/finetuned/math.*'long-one' \(10%\)"
    ) as record:
        prompt_metrics(
            rollouts, MetricSettings(truncation_warning=0.05), label="llama/finetuned/math"
        )
    assert "calm" not in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prompt_metrics(
            rollouts, MetricSettings(truncation_warning=0.1), label="x"
        )  # 10% is not above


def test_settings_from_config():
    settings = MetricSettings.from_config(
        {"truncated": "drop", "truncation_warning": 0.2, "bootstrap": {"resamples": 10}}
    )
    assert settings == MetricSettings(
        truncated="drop", truncation_warning=0.2, bootstrap={"resamples": 10}
    )
    assert settings.bootstrap.resamples == 10
    assert MetricSettings.from_config(None) == MetricSettings()
    with pytest.raises(ValueError, match="truncaton"):
        MetricSettings.from_config({"truncaton": "keep"})
    with pytest.raises(ValueError, match="'keep' or 'drop'"):
        MetricSettings.from_config({"truncated": "skip"})
    with pytest.raises(ValueError, match="confidence"):
        MetricSettings(confidence=95)


# ---------------------------------------------------------------------------------------------
# Trajectory


def test_entropy_trajectory_matches_a_loop():
    rollouts = _random_table(np.random.default_rng(6), 3, 15, 9)
    trajectory = entropy_trajectory(rollouts)
    longest = int(rollouts["n_steps"].max())
    assert list(trajectory["position"]) == list(range(1, longest + 1))
    for _, row in trajectory.iterrows():
        t = int(row["position"])
        values = np.array([h[t - 1] for h in rollouts["step_entropy"] if len(h) >= t])
        assert row["n_active"] == values.size
        assert row["mean_entropy"] == pytest.approx(values.mean(), rel=1e-12)
        if values.size >= 2:
            assert row["se"] == pytest.approx(values.std(ddof=1) / math.sqrt(values.size), rel=1e-9)
        else:
            assert math.isnan(row["se"])
    assert (np.diff(trajectory["n_active"]) <= 0).all()
    cut = entropy_trajectory(rollouts, max_positions=4)
    pd.testing.assert_frame_equal(cut, trajectory.iloc[:4])


def test_parquet_round_trip_through_write_metrics(tmp_path, hand_models):
    """Rollouts stored as parquet (list columns come back as numpy arrays) give the same metrics."""
    model, _ = hand_models["p0"]
    rollouts = pd.DataFrame(
        ancestral_rollouts(
            model, model.eos, model.max_new_tokens, 60, np.random.default_rng(8), "p0"
        )
    )
    rollouts.to_parquet(tmp_path / "math.parquet", index=False)
    table = write_metrics(
        tmp_path / "math.parquet",
        tmp_path / "metrics" / "math.parquet",
        tmp_path / "metrics" / "math.trajectory.parquet",
        QUIET,
    )
    pd.testing.assert_frame_equal(table, prompt_metrics(rollouts, QUIET))
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "metrics" / "math.parquet"), table)
    trajectory = pd.read_parquet(tmp_path / "metrics" / "math.trajectory.parquet")
    pd.testing.assert_frame_equal(trajectory, entropy_trajectory(rollouts))
    assert trajectory["n_active"].iloc[0] == 60

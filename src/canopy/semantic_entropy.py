"""Semantic entropy of a prompt's rollouts: entropy over meaning clusters.

Rollouts that entail each other (premise -> hypothesis in both directions) say the same thing;
grouping a prompt's M rollouts by bidirectional entailment and taking the entropy over the groups
measures how many different meanings the model spreads its samples over, whatever the wording.
Two estimates per prompt (natural logarithms):

* ``semantic_entropy``: discrete, from the cluster frequencies n_c / M;
* ``semantic_entropy_weighted``: probability-weighted, p(c) = sum of the rollouts' sequence
  probabilities in c, normalised over the M rollouts (``logprob = "sum"``: log q(y_i) as
  sampled; ``"mean"``: the per-token mean, which keeps long rollouts from vanishing).

Entailment is any function from a batch of (premise, hypothesis) pairs to booleans; the
:class:`NliEntailment` class gives one from a transformers sequence-classification model with an
``entailment`` label (e.g. microsoft/deberta-large-mnli). :class:`EntailmentCache` keeps every
answer, so no pair is asked twice, and identical texts are one meaning without asking.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from scipy.special import logsumexp

from canopy.auxiliary_models import Classifier, load_classifier, locate_model
from canopy.config.analysis import SemanticEntropySettings
from canopy.io import write_parquet

__all__ = [
    "EntailmentCache",
    "NliEntailment",
    "SemanticEntropySettings",
    "SEMANTIC_COLUMNS",
    "cluster_by_entailment",
    "discrete_semantic_entropy",
    "semantic_entropy_table",
    "weighted_semantic_entropy",
    "write_semantic_entropy",
]

#: (premise, hypothesis) pairs -> does the premise entail the hypothesis, one bool per pair.
EntailmentFn = Callable[[Sequence[tuple[str, str]]], Sequence[bool]]

#: Columns of :func:`semantic_entropy_table` after ``prompt_id``.
SEMANTIC_COLUMNS: tuple[str, ...] = (
    "semantic_entropy",
    "semantic_entropy_weighted",
    "n_semantic_clusters",
)


class EntailmentCache:
    """Memoise an entailment function: each distinct (premise, hypothesis) is asked once, and
    the pairs still unknown in a call go to the function as one batch."""

    def __init__(self, entails: EntailmentFn) -> None:
        self._entails = entails
        self._known: dict[tuple[str, str], bool] = {}
        #: pairs actually sent to the function (cache misses)
        self.calls = 0

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        todo = list(dict.fromkeys(p for p in pairs if p not in self._known))
        if todo:
            answers = list(self._entails(todo))
            if len(answers) != len(todo):
                raise ValueError(
                    f"entailment function returned {len(answers)} answers for {len(todo)} pairs"
                )
            self.calls += len(todo)
            self._known.update(zip(todo, (bool(a) for a in answers)))
        return [self._known[p] for p in pairs]


def cluster_by_entailment(texts: Sequence[str], entails: EntailmentFn) -> np.ndarray:
    """Cluster labels 0, 1, ... (in order of first appearance) by bidirectional entailment.

    Each text joins the first cluster whose first member it entails and is entailed by;
    otherwise it opens a new cluster. Identical texts share a cluster without asking. The pairs
    of one text against every cluster's first member go out as one batch.
    """
    labels = np.full(len(texts), -1, dtype=np.int64)
    representatives: list[str] = []
    seen: dict[str, int] = {}
    for i, text in enumerate(texts):
        if text in seen:
            labels[i] = seen[text]
            continue
        pairs = [(text, rep) for rep in representatives] + [(rep, text) for rep in representatives]
        answers = entails(pairs) if pairs else []
        k = len(representatives)
        both = [answers[c] and answers[k + c] for c in range(k)]
        label = both.index(True) if any(both) else k
        if label == k:
            representatives.append(text)
        labels[i] = label
        seen[text] = label
    return labels


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def discrete_semantic_entropy(labels: np.ndarray) -> float:
    """Entropy (nats) of the cluster frequencies n_c / M."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return math.nan
    _, counts = np.unique(labels, return_counts=True)
    return _entropy(counts / labels.size)


def weighted_semantic_entropy(labels: np.ndarray, logprobs: np.ndarray) -> float:
    """Entropy (nats) of p(c) = sum of exp(logprob_i) over the cluster, normalised over the M
    rollouts (in log space: sequence probabilities underflow at a few hundred tokens)."""
    labels = np.asarray(labels)
    logprobs = np.asarray(logprobs, dtype=np.float64)
    if labels.size == 0:
        return math.nan
    if labels.shape != logprobs.shape or not np.isfinite(logprobs).all():
        raise ValueError("weighted semantic entropy needs one finite log-probability per rollout")
    total = logsumexp(logprobs)
    clusters = np.unique(labels)
    log_pc = np.array([logsumexp(logprobs[labels == c]) - total for c in clusters])
    return _entropy(np.exp(log_pc))


def semantic_entropy_table(
    rollouts: pd.DataFrame, entails: EntailmentFn, *, logprob: str = "sum"
) -> pd.DataFrame:
    """One row per prompt (first-appearance order): ``prompt_id`` and :data:`SEMANTIC_COLUMNS`.

    ``rollouts`` needs ``prompt_id``, ``text``, ``sum_logprob`` and (for ``logprob="mean"``)
    ``n_steps``. ``entails`` is wrapped in an :class:`EntailmentCache` unless it is one.
    """
    needed = ["prompt_id", "text", "sum_logprob"] + (["n_steps"] if logprob == "mean" else [])
    missing = [c for c in needed if c not in rollouts.columns]
    if missing:
        raise ValueError(f"rollout table lacks column(s) {', '.join(missing)} for semantic entropy")
    cache = entails if isinstance(entails, EntailmentCache) else EntailmentCache(entails)
    rows = []
    for prompt_id, group in rollouts.groupby("prompt_id", sort=False):
        texts = group["text"].fillna("").astype(str).tolist()
        labels = cluster_by_entailment(texts, cache)
        lp = group["sum_logprob"].to_numpy(dtype=np.float64)
        if logprob == "mean":
            lp = lp / group["n_steps"].to_numpy(dtype=np.float64)
        rows.append(
            {
                "prompt_id": prompt_id,
                "semantic_entropy": discrete_semantic_entropy(labels),
                "semantic_entropy_weighted": weighted_semantic_entropy(labels, lp),
                "n_semantic_clusters": int(np.unique(labels).size),
            }
        )
    return pd.DataFrame(rows, columns=["prompt_id", *SEMANTIC_COLUMNS])


class NliEntailment:
    """Entailment from a transformers sequence-classification NLI model (batched, no gradients).

    A pair counts as entailed when the model's most likely label is its entailment label (found
    by name in ``config.id2label``, case-insensitively). Pairs go to the model ``batch_size`` at a
    time, each cut to ``max_length`` tokens.
    """

    def __init__(self, judge: Classifier, *, batch_size: int = 32, max_length: int = 512) -> None:
        import torch

        self._torch = torch
        self.tokenizer, self.model, self.device = judge.tokenizer, judge.model, judge.device
        labels = {int(i): str(name).lower() for i, name in self.model.config.id2label.items()}
        hits = [i for i, name in labels.items() if name.startswith("entail")]
        if len(hits) != 1:
            raise ValueError(
                f"NLI model {judge.location!r} has labels {sorted(labels.values())}: expected exactly one "
                "named 'entailment' (set diversity.semantic_entropy.model to an NLI model)"
            )
        self.entailment_index = hits[0]
        self.batch_size = batch_size
        self.max_length = max_length

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        out: list[bool] = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            encoded = self.tokenizer(
                [p for p, _ in chunk],
                [h for _, h in chunk],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            with self._torch.no_grad():
                logits = self.model(**encoded).logits
            out += (logits.argmax(dim=-1) == self.entailment_index).tolist()
        return out


def load_nli(
    settings: SemanticEntropySettings, *, model_dir: str | os.PathLike[str] | None = None
) -> NliEntailment:
    """The NLI model of ``settings``: from ``model_dir`` where it was fetched to, else from the
    directory, package or local hub cache ``settings.model`` names."""
    source = locate_model(settings.model, "diversity.semantic_entropy.model", directory=model_dir)
    return NliEntailment(
        load_classifier(source, device=settings.device),
        batch_size=settings.batch_size,
        max_length=settings.max_length,
    )


def write_semantic_entropy(
    rollouts_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    settings: SemanticEntropySettings,
    *,
    model_dir: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Read a rollout parquet, write its per-prompt semantic entropies atomically."""
    columns = ["prompt_id", "text", "sum_logprob", "n_steps"]
    rollouts = pd.read_parquet(rollouts_path, columns=columns)
    nli = load_nli(settings, model_dir=model_dir)
    table = semantic_entropy_table(rollouts, nli, logprob=settings.logprob)
    write_parquet(table, out_path)
    return table

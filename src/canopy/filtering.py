"""Reward-model filtering of rollouts: a sweep point made of each prompt's best-scored rollouts.

A sequence-classification reward model (the paper: Skywork-Reward-Llama-3.1-8B-v0.2) scores every
rollout as the assistant's answer to its prompt, rendered with the reward model's own chat
template, and the top ``keep`` share of each prompt's rollouts (0.7 in the paper) is kept. The
kept rows are written as an ordinary rollout table, so metrics, diversity and the regression treat
the filter as one more sampling setting (``sampling: {<name>: {filter: {from: ..., ...}}}``).

What filtering does to the estimates: CE*, R̄ and ρ of a filtered set describe the rollouts a
reward model prefers, no longer the sampled canopy; the chain-rule estimator stays the mean of
the kept rollouts' summed entropies.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from canopy.auxiliary_models import Classifier, load_classifier, locate_model
from canopy.config.sampling import FilterSettings
from canopy.io import write_parquet
from canopy.prompts import read_prompts

__all__ = [
    "FilterSettings",
    "RewardScorer",
    "kept_count",
    "select_top",
    "filter_rollouts",
    "write_filtered_rollouts",
]


def kept_count(m: int, keep: float) -> int:
    """Rollouts kept out of ``m``: ``keep * m`` rounded half up, at least one (70 of 100)."""
    return max(1, min(m, math.floor(keep * m + 0.5))) if m else 0


def select_top(scores: pd.DataFrame, keep: float) -> np.ndarray:
    """Boolean mask over ``scores`` rows (``prompt_id``, ``sample``, ``reward``): per prompt the
    :func:`kept_count` highest rewards; ties go to the lower sample number (deterministic)."""
    mask = np.zeros(len(scores), dtype=bool)
    frame = scores.reset_index(drop=True)
    for _, group in frame.groupby("prompt_id", sort=False):
        ordered = group.sort_values(["reward", "sample"], ascending=[False, True], kind="stable")
        mask[ordered.index[: kept_count(len(group), keep)]] = True
    return mask


class RewardScorer:
    """Scores (prompt, answer) pairs with a sequence-classification reward model (one logit).

    Each pair is rendered as a user turn and an assistant turn with the reward model's chat
    template, tokenised without adding special tokens again (the template has them), and scored
    in batches of ``batch_size`` pairs of similar length, right-padded, each cut to
    ``max_length`` tokens.
    """

    def __init__(
        self, reward_model: Classifier, *, batch_size: int = 8, max_length: int = 4096
    ) -> None:
        import torch

        self._torch = torch
        self.tokenizer, self.model = reward_model.tokenizer, reward_model.model
        if self.tokenizer.chat_template is None:
            raise ValueError(
                f"reward model {reward_model.location!r} has no chat template: it cannot be "
                "given (prompt, answer) conversations the way it was trained"
            )
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"reward model {reward_model.location!r} has {self.model.config.num_labels} "
                "labels; a reward model gives one score per sequence"
            )
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = reward_model.device
        self.batch_size = batch_size
        self.max_length = max_length

    def encode(self, prompt: str, answer: str) -> list[int]:
        conversation = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ]
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[: self.max_length]

    def score(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """One reward per (prompt, answer), float64, in input order."""
        encoded = [self.encode(p, a) for p, a in pairs]
        order = np.argsort([len(ids) for ids in encoded], kind="stable")
        rewards = np.empty(len(pairs), dtype=np.float64)
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            width = max(len(encoded[i]) for i in chunk)
            ids = self._torch.full((len(chunk), width), pad, dtype=self._torch.long)
            mask = self._torch.zeros((len(chunk), width), dtype=self._torch.long)
            for row, index in enumerate(chunk):
                tokens = encoded[index]
                ids[row, : len(tokens)] = self._torch.tensor(tokens)
                mask[row, : len(tokens)] = 1
            with self._torch.no_grad():
                logits = self.model(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
                ).logits
            rewards[chunk] = logits[:, 0].float().cpu().numpy()
        return rewards


def filter_rollouts(
    rollouts: pd.DataFrame, prompts: Mapping[str, str], scorer: Any, keep: float
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score every rollout and keep each prompt's best ``keep`` share.

    ``prompts`` maps prompt_id to the prompt text as the user wrote it (before any chat template
    of the sampled model). ``scorer`` has ``score(pairs) -> rewards``. Returns the kept rows of
    ``rollouts`` (all columns, table order) and the score table (prompt_id, sample, reward, kept).
    """
    missing = sorted(set(map(str, rollouts["prompt_id"])) - set(prompts))
    if missing:
        raise ValueError(f"rollouts of prompt(s) {missing[:5]} have no prompt text to score with")
    pairs = [
        (prompts[str(p)], "" if t is None else str(t))
        for p, t in zip(rollouts["prompt_id"], rollouts["text"])
    ]
    scores = pd.DataFrame(
        {
            "prompt_id": rollouts["prompt_id"].to_numpy(),
            "sample": rollouts["sample"].to_numpy(),
            "reward": scorer.score(pairs),
        }
    )
    if not np.isfinite(scores["reward"]).all():
        bad = scores.loc[~np.isfinite(scores["reward"])].iloc[0]
        raise ValueError(
            f"reward model gave a non-finite score to prompt {bad['prompt_id']!r}, "
            f"sample {bad['sample']}"
        )
    scores["kept"] = select_top(scores, keep)
    kept = rollouts.reset_index(drop=True)[scores["kept"].to_numpy()].reset_index(drop=True)
    return kept, scores


def write_filtered_rollouts(
    rollouts_path: str | os.PathLike[str],
    prompts_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    scores_path: str | os.PathLike[str],
    settings: FilterSettings,
    *,
    model_dir: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Read a rollout table and its prompts, write the kept rollouts and all scores atomically.

    ``model_dir``: where the reward model was fetched to (the workflow's resources/classifiers/);
    without it the model is found from ``settings.model`` (a directory, package or hub cache).
    """
    source = locate_model(
        settings.model, "sampling.<filter>.filter.reward_model.model", directory=model_dir
    )
    scorer = RewardScorer(
        load_classifier(source, device=settings.device, dtype=settings.dtype),
        batch_size=settings.batch_size,
        max_length=settings.max_length,
    )
    rollouts = pd.read_parquet(rollouts_path)
    prompts = {p.prompt_id: p.prompt for p in read_prompts(prompts_path)}
    kept, scores = filter_rollouts(rollouts, prompts, scorer, settings.keep)
    write_parquet(scores, scores_path)
    write_parquet(kept, out_path)
    return scores

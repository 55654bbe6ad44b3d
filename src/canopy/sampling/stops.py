"""Stop sequences: strings matched on the decoded text of a rollout, as vLLM's ``stop``.

A stop is a stopping time. Whether step n ends the rollout is decided from the tokens drawn up to
n alone, so N (which counts the token that completes the string) is a stopping time and every
step entropy stays the exact entropy of the distribution that step was drawn from.

The text is decoded incrementally, as serving engines do (TGI's and vLLM's ``prefix_offset`` /
``read_offset`` scheme): each token's new text is the tail its window of tokens adds, held back
while it ends in an incomplete UTF-8 character, so a step costs two decodes of a few tokens
whatever the rollout's length. Only the new text and the characters before it that a stop could
still span are searched. The one definition, :class:`StopScanner`, serves both ways a rollout is
stopped: the canopy batcher pushes each drawn token and ends the row at the first hit; a backend
that cannot stop on text (vLLM without detokenisation) hands back longer rows, which
:func:`cut_at_stop` replays through the same scanner and cuts. Same tokens, same end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from canopy.sampling.kernel import rollout_row

__all__ = ["StopScanner", "StopSequences", "cut_at_stop"]

#: What a decoder writes for bytes that do not (yet) form a character.
_INCOMPLETE = "\ufffd"


class StopSequences:
    """The stop strings of a (variant, task) and the tokenizer that decodes its rollouts."""

    def __init__(self, tokenizer: Any, sequences: Sequence[str]) -> None:
        sequences = tuple(sequences)
        if not sequences or not all(isinstance(s, str) and s for s in sequences):
            raise ValueError(f"stop sequences must be non-empty strings, got {list(sequences)}")
        self.tokenizer = tokenizer
        self.sequences = sequences
        # Characters of earlier text a stop completed by new text can span.
        self.overlap = max(len(s) for s in sequences) - 1

    def scanner(self) -> StopScanner:
        """A scanner for one new rollout."""
        return StopScanner(self)

    def first_stop(self, token_ids: Sequence[int]) -> int | None:
        """The number of steps up to and including the token that completes the first stop
        string in the decoded rollout, or None when no stop occurs."""
        scanner = self.scanner()
        for step, token in enumerate(token_ids, start=1):
            if scanner.push(int(token)):
                return step
        return None


class StopScanner:
    """One rollout's incremental decoder: ``push`` each drawn token, True once a stop string has
    been completed (the rollout ends at that token)."""

    __slots__ = ("stops", "ids", "prefix_offset", "read_offset", "prefix_text", "tail")

    def __init__(self, stops: StopSequences) -> None:
        self.stops = stops
        self.ids: list[int] = []
        # Tokens from prefix_offset give the decoder the context (a leading space, a multi-byte
        # character) of the tokens from read_offset, whose text is new; prefix_text is the text
        # of ids[prefix_offset:read_offset].
        self.prefix_offset = 0
        self.read_offset = 0
        self.prefix_text = ""
        self.tail = ""  # the last `overlap` characters of the text so far

    def _decode(self, ids: Sequence[int]) -> str:
        # Special tokens (EOS, turn markers) are not text, as in the rollout table's text column.
        return self.stops.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> bool:
        self.ids.append(token)
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) <= len(self.prefix_text) or text.endswith(_INCOMPLETE):
            return False  # no complete new character yet
        new = text[len(self.prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        window = self.tail + new
        # A stop found earlier would have ended the rollout, so any found now ends in `new`.
        hit = any(stop in window for stop in self.stops.sequences)
        overlap = self.stops.overlap
        self.tail = window[-overlap:] if overlap else ""
        return hit


def cut_at_stop(row: dict[str, Any], stops: StopSequences) -> tuple[dict[str, Any], int]:
    """A rollout-table row ended at its first stop sequence, and the steps cut off.

    The row keeps its first n steps (n counting the token that completes the stop) with their
    entropies and log-probabilities, its sums are recomputed, and it ends as at EOS (hit_eos,
    not truncated); ``text`` is left empty for the caller to decode. A row without a stop is
    returned as it is, with 0.
    """
    n = stops.first_stop(row["token_ids"])
    if n is None:
        return row, 0
    if n == row["n_steps"] and row["hit_eos"]:
        return row, 0  # already ended there (the canopy batcher stops rows itself)
    cut = rollout_row(
        row["prompt_id"],
        row["sample"],
        row["prompt_tokens"],
        list(row["token_ids"])[:n],
        list(row["step_entropy"])[:n],
        list(row["step_logprob"])[:n],
        True,
    )
    return cut, row["n_steps"] - n

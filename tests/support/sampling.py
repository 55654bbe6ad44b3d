"""The prompts, prompt files and progress loggers of the sampling-job tests."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from support.models import WORDS, build_model_dir

#: Six prompts of three to six words each.
PROMPTS = {f"q{i}": " ".join(WORDS[i : i + 3 + i % 4]) for i in range(6)}


def write_prompts(path: Path, prompts: dict[str, str]) -> Path:
    """A task's prompt file, as prepare_prompts writes it."""
    lines = [
        json.dumps({"prompt_id": pid, "task": "t", "prompt": text, "source": "test"})
        for pid, text in prompts.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def build_sampling_model_dir(path: Path) -> Path:
    """The tiny chat Llama of the sampling-job tests: two EOS ids, rollouts short and long."""
    return build_model_dir(path, eos=[2, 6], seed=1)


class Interrupted(Exception):
    """Raised by :class:`InterruptingLogger` where a killed job would have stopped."""


class InterruptingLogger(logging.Logger):
    """A progress logger that stops the run after ``after`` finished prompts (like a killed job)."""

    def __init__(self, after: int) -> None:
        super().__init__("interrupting")
        self.after, self.done, self.messages = after, 0, []

    def info(self, msg, *args, **kwargs) -> None:  # noqa: ANN001
        self.messages.append(msg % args)
        if "done" in msg:
            self.done += 1
            if self.done == self.after:
                raise Interrupted


class RecordingLogger(logging.Logger):
    """A progress logger that keeps every message."""

    def __init__(self) -> None:
        super().__init__("recording")
        self.messages: list[str] = []

    def info(self, msg, *args, **kwargs) -> None:  # noqa: ANN001
        self.messages.append(msg % args)

"""Training checkpoints: a killed training job resumes where it was, to bit-identical weights.

A checkpoint holds everything the next step depends on: the trainable parameters (all weights
when training from scratch or fully; the LoRA adapters and trained token rows otherwise, the
frozen rest being reloaded from the base), the optimiser's and the schedule's state, the RNG
states (torch, CUDA, Python, NumPy), the step (the data position: the seeded batch functions are
replayed up to it, which costs no model computation) and the loss curve so far.

Checkpoints live in ``<output>.checkpoint/`` (``resources/models/{family}/{variant}.checkpoint/``),
a sibling of the model directory that no rule declares as an output: Snakemake deletes the
declared outputs of a failed or incomplete job, so a checkpoint inside the output directory would
be deleted with it. The directory is removed once the output is written.

Each file is written atomically (a temporary file renamed into place) and carries a header with
the fingerprint of what determines the run (the recipe, its inputs, the thread count, the torch
version) and the sha256 and size of its payload. A file of another fingerprint (a changed recipe
or input) is stale and removed; a truncated or corrupt one fails the size or checksum check, is
named in the log and skipped, and the one before it (two are kept), or step zero, is used. A
payload is only unpickled after its checksum matched, and then with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from canopy.io import atomic_path
from canopy.sampling.shards import fingerprint, sibling_dir

__all__ = ["CHECKPOINT_FORMAT", "Checkpoints", "checkpoint_dir_for", "rng_state", "set_rng_state"]

#: Bump when the meaning of a checkpoint's contents changes, so that old ones are never resumed.
CHECKPOINT_FORMAT = 1

_MAGIC = b"canopy-training-checkpoint\n"
#: Checkpoints kept: the newest and the one before it, the fallback when the newest is damaged.
_KEEP = 2


def checkpoint_dir_for(out_dir: str | Path) -> Path:
    """``resources/models/{family}/{variant}`` -> ``resources/models/{family}/{variant}.checkpoint``."""
    return sibling_dir(out_dir, ".checkpoint")


def rng_state() -> dict[str, Any]:
    """Every RNG state a training step may draw from (CUDA's only where CUDA is in use)."""
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {
                "key": numpy_state["key"].numpy().astype(np.uint32),
                "pos": numpy_state["pos"],
            },
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoints:
    """The checkpoints of one training output, for one fingerprint of what determines the run.

    ``key`` names the run's inputs (stage, recipe, data digests, base model identity); the
    thread count and torch version are added here, since a different one may train to different
    bits. ``every`` is the number of steps between checkpoints.
    """

    def __init__(
        self,
        out_dir: str | Path,
        key: Mapping[str, Any],
        every: int,
        logger: logging.Logger,
    ) -> None:
        self.directory = checkpoint_dir_for(out_dir)
        self.every = every
        self.log = logger
        self.fingerprint = fingerprint(
            {
                **key,
                "format": CHECKPOINT_FORMAT,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            }
        )

    def _files(self) -> list[Path]:
        """Checkpoint files, newest (highest step) first."""
        if not self.directory.is_dir():
            return []
        return sorted(self.directory.glob("step-*.ckpt"), reverse=True)

    def due(self, done: int, steps: int) -> bool:
        """Whether a checkpoint is due after ``done`` of ``steps`` steps (never after the last:
        the output is written right then)."""
        return done % self.every == 0 and done < steps

    def save(self, done: int, state: Mapping[str, Any]) -> Path:
        """Write the state after ``done`` steps atomically; keep the newest two checkpoints."""
        buffer = io.BytesIO()
        torch.save(dict(state), buffer)
        # A view, not a copy: a full fine-tune's checkpoint (weights and two Adam moments) is
        # three times the model.
        payload = buffer.getbuffer()
        header = {
            "fingerprint": self.fingerprint,
            "step": done,
            "bytes": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
        }
        path = self.directory / f"step-{done:09d}.ckpt"
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(_MAGIC + json.dumps(header).encode() + b"\n")
                handle.write(payload)
        for old in self._files()[_KEEP:]:
            old.unlink(missing_ok=True)
        return path

    def _read(self, path: Path) -> tuple[dict[str, Any], dict[str, Any]] | str:
        """(header, state) of a checkpoint file, or why it cannot be used."""
        data = path.read_bytes()
        end = data.find(b"\n", len(_MAGIC)) if data.startswith(_MAGIC) else -1
        if end < 0:
            return "not a checkpoint file (no header)"
        try:
            header = json.loads(data[len(_MAGIC) : end])
        except ValueError:
            return "unreadable header"
        payload = memoryview(data)[end + 1 :]  # a view: the payload may be gigabytes
        if header.get("fingerprint") != self.fingerprint:
            return "stale"
        if len(payload) != header.get("bytes"):
            return f"truncated ({len(payload)} of {header.get('bytes')} bytes)"
        if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
            return "checksum mismatch"
        state = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
        return header, state

    def load(self) -> tuple[int, dict[str, Any]] | None:
        """The newest usable checkpoint as (steps done, state), or None. Stale and damaged files
        are named in the log and removed; a damaged newest one falls back to the one before."""
        for path in self._files():
            result = self._read(path)
            if isinstance(result, str):
                if result == "stale":
                    self.log.info(
                        "checkpoint %s is of another recipe or input: not resumed, removed", path
                    )
                else:
                    self.log.warning(
                        "checkpoint %s is damaged (%s): ignored, removed", path, result
                    )
                path.unlink(missing_ok=True)
                continue
            header, state = result
            return int(header["step"]), state
        return None

    def clear(self) -> None:
        """Remove the checkpoints once the output is written."""
        shutil.rmtree(self.directory, ignore_errors=True)

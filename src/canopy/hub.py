"""Downloading a hub model at a pinned revision into ``resources/models/{family}/{variant}/``.

This is the one place the workflow reaches the network (the ``download_model`` rule). Only what
loading and sampling need is fetched: the config and generation config, the safetensors weights
(with their index), and the tokenizer files with the chat template. The download goes to a hidden
sibling directory that a rerun resumes, and is renamed onto ``out_dir`` only when complete, so an
interrupted download never looks like a model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["ModelDownloadError", "download_model", "ALLOW_PATTERNS"]

#: Files fetched from a model repository (weights, config, tokenizer, generation config).
ALLOW_PATTERNS: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "*.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
)
# Llama repositories also ship the original checkpoint under original/ (not needed, very large).
_IGNORE_PATTERNS: tuple[str, ...] = ("original/*", "*.pth", "*.gguf")
# Older repositories without safetensors: the PyTorch weights instead.
_FALLBACK_WEIGHTS: tuple[str, ...] = ("pytorch_model*.bin", "pytorch_model.bin.index.json")


class ModelDownloadError(RuntimeError):
    """A model could not be downloaded; the message says how to provide it instead."""


def _instead(repo_id: str, revision: str, out_dir: Path) -> str:
    return (
        f"Download it on a machine with network (or on the cluster's login node), e.g. "
        f"`hf download {repo_id} --revision {revision} --local-dir {out_dir}` or the "
        f"workflow's download_model rule, then either leave it at {out_dir} or point "
        f"families.<family>.<variant> at the directory with `source: local, path: <dir>`."
    )


def download_model(
    repo_id: str,
    revision: str,
    out_dir: str | os.PathLike[str],
    *,
    token_env: str = "HF_TOKEN",
) -> Path:
    """Download ``repo_id`` at ``revision`` into ``out_dir`` (weights, config, tokenizer,
    generation config) and return ``out_dir``.

    The access token, for gated models such as Llama 3.1 and Gemma 3, is read from the environment
    variable ``token_env``. Raises :class:`ModelDownloadError` naming the model when there is no
    network, the repository or revision does not exist, access is denied, or no weights came back.
    """
    if not repo_id or not isinstance(repo_id, str):
        raise ModelDownloadError(f"a hub model needs an id (owner/name), got {repo_id!r}")
    if not revision or not isinstance(revision, str):
        raise ModelDownloadError(f"model {repo_id}: a revision (commit hash or tag) is required")
    target = Path(out_dir)
    partial = target.with_name(f".{target.name}.partial")
    token = os.environ.get(token_env) or None
    name = f"{repo_id}@{revision}"
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as error:
        raise ModelDownloadError(
            f"downloading {name} needs the huggingface_hub package. {_instead(repo_id, revision, target)}"
        ) from error

    def fetch(patterns: tuple[str, ...]) -> None:
        snapshot_download(
            repo_id=repo_id,
            revision=revision,
            local_dir=partial,
            allow_patterns=list(patterns),
            ignore_patterns=list(_IGNORE_PATTERNS),
            token=token,
        )

    try:
        fetch(ALLOW_PATTERNS)
        if not any(partial.glob("*.safetensors")):
            fetch(_FALLBACK_WEIGHTS)
    except GatedRepoError as error:
        raise ModelDownloadError(
            f"model {name} is gated: accept its licence on the hub and put an access token in the "
            f"environment variable {token_env} ({error})"
        ) from error
    except RevisionNotFoundError as error:
        raise ModelDownloadError(
            f"model {repo_id} has no revision {revision!r}: fix families.<family>.<variant>.revision "
            f"({error})"
        ) from error
    except RepositoryNotFoundError as error:
        raise ModelDownloadError(
            f"model {repo_id} was not found on the hub (or it is private and {token_env} is unset): "
            f"fix families.<family>.<variant>.id ({error})"
        ) from error
    except Exception as error:  # noqa: BLE001 - offline, connection and HTTP errors alike
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        reason = (
            "HF_HUB_OFFLINE is set on this machine" if offline else "the hub could not be reached"
        )
        raise ModelDownloadError(
            f"cannot download model {name}: {reason} ({type(error).__name__}: {error}). "
            f"{_instead(repo_id, revision, target)}"
        ) from error

    if not (partial / "config.json").is_file():
        raise ModelDownloadError(f"model {name} has no config.json: it is not a transformers model")
    if not any(partial.glob("*.safetensors")) and not any(partial.glob("pytorch_model*.bin")):
        raise ModelDownloadError(
            f"model {name}: no weights (safetensors or pytorch_model*.bin) came back"
        )
    # snapshot_download keeps resume metadata in .cache/; the finished directory does not need it.
    shutil.rmtree(partial / ".cache", ignore_errors=True)
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, target)
    return target

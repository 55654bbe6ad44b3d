"""Fetching from the model hub: models, embedders and the commits prompt data sets resolve to.

These functions are the only ones in the library that reach the network, and only the workflow's
fetching rules call them (``download_model``, ``download_embedder``, and ``prepare_prompts`` for a
``source: hub`` task); every other job runs with the hub switched off.

A fetch first resolves the configured revision (a branch, a tag or a commit) to the commit it
points to *now*, then downloads exactly that commit, so that what is recorded is what was fetched
even when the branch moves during the download. Files go to a hidden sibling of the target
directory (``.{name}.partial``), which a rerun resumes, and the sibling is renamed onto the target
only when complete: an interrupted fetch never looks like a model. The finished directory holds a
record of the fetch (:mod:`canopy.sources.record`), which the workflow's lock file gathers.

A revision that names a branch is resolved once, when the resource is fetched, and never again
behind the user's back: later runs use the fetched copy. :func:`moved_revisions` asks the hub
where each recorded branch points now, which is how a user learns that ``main`` has moved.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from canopy.sources.record import LEGACY_RECORD_FILES, RECORD_FILE, read_record, write_record

__all__ = [
    "ALLOW_PATTERNS",
    "EMBEDDER_IGNORE_PATTERNS",
    "FETCH_RECORD",
    "HubFetch",
    "HubFetchError",
    "ModelDownloadError",
    "download",
    "download_embedder",
    "download_model",
    "fetch_snapshot",
    "hub_offline",
    "is_commit",
    "moved_revisions",
    "read_fetch_record",
    "resolve_revision",
]

#: The file a fetch's record had before every made model held one record file: still read.
FETCH_RECORD = LEGACY_RECORD_FILES["hub"]

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
    "preprocessor_config.json",
    "processor_config.json",
)
# Llama repositories also ship the original checkpoint under original/ (not needed, very large).
_MODEL_IGNORE_PATTERNS: tuple[str, ...] = ("original/*", "*.pth", "*.gguf")
# Older repositories without safetensors: the PyTorch weights instead.
_FALLBACK_WEIGHTS: tuple[str, ...] = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
#: A sentence-transformers repository is fetched whole (modules.json names sub-folders such as
#: 1_Pooling/ that differ by model), except exports for other runtimes.
EMBEDDER_IGNORE_PATTERNS: tuple[str, ...] = (
    "onnx/*",
    "openvino/*",
    "*.gguf",
    "*.onnx",
    "*.h5",
    "*.msgpack",
    "*.ot",
    "tf_model*",
    "flax_model*",
    "rust_model*",
    "coreml/*",
)

_COMMIT = re.compile(r"[0-9a-f]{40}")
_TRUE = {"1", "ON", "YES", "TRUE"}


class HubFetchError(RuntimeError):
    """A fetch from the hub failed; the message names the repository, the revision and, where
    known, the file, says why, and how to provide the resource without the network."""


#: Kept for callers of the model download: the same error.
ModelDownloadError = HubFetchError


@dataclass(frozen=True)
class HubFetch:
    """What one fetch resolved: ``revision`` as configured, ``commit`` as found on the hub."""

    kind: str  # model, embedder or dataset
    repo_id: str
    repo_type: str  # model or dataset (the hub's own repository kinds)
    revision: str
    commit: str
    endpoint: str
    fetched_at: str
    files: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["files"] = list(self.files)
        return record


def is_commit(revision: str) -> bool:
    """True for a full 40-character commit SHA, the only revision that cannot move."""
    return bool(_COMMIT.fullmatch(revision or ""))


def hub_offline() -> bool:
    """True when the environment switches the hub off (``HF_HUB_OFFLINE`` or
    ``HF_DATASETS_OFFLINE``), as every job but the fetching ones does: the one offline check of
    the library."""
    environment = any(
        os.environ.get(name, "").strip().upper() in _TRUE
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; where it is imported already, what it
    # read then decides what it does, so it counts as well.
    constants = sys.modules.get("huggingface_hub.constants")
    return environment or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def _repo_url(repo_id: str, repo_type: str) -> str:
    return f"{_endpoint()}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"


def _failed_file(error: BaseException) -> str | None:
    """The repository file a download error was about, read from the URL of its response."""
    response = getattr(error, "response", None)
    url = str(getattr(response, "url", "") or "")
    match = re.search(r"/resolve/[^/]+/(.+?)(?:\?|$)", url)
    return match.group(1) if match else None


def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    return int(status) if isinstance(status, int) else None


def explain_fetch_error(
    error: BaseException,
    repo_id: str,
    revision: str,
    repo_type: str,
    config_key: str,
    instead: str,
    token_env: str = "HF_TOKEN",
) -> HubFetchError:
    """One actionable :class:`HubFetchError` for any failure of a hub call about ``repo_id``."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    kind = "data set" if repo_type == "dataset" else "repository"
    name = f"{kind} {repo_id} at revision {revision!r}"
    file = _failed_file(error)
    where = f" (file {file})" if file else ""
    has_token = bool(os.environ.get(token_env))
    status = _status(error)
    if isinstance(error, GatedRepoError) or (isinstance(error, HfHubHTTPError) and status == 403):
        message = (
            f"{name}{where} is gated (HTTP {status or 403}): accept its licence at "
            f"{_repo_url(repo_id, repo_type)} with your account, then put an access token of that "
            f"account in the environment variable {token_env} of the fetching job"
            + (" (a token is set, but it has no access yet)" if has_token else "")
        )
    elif isinstance(error, RevisionNotFoundError):
        message = f"{name} does not exist: {repo_id} has no such branch, tag or commit; fix {config_key}.revision"
    elif isinstance(error, EntryNotFoundError):
        message = f"{name} has no file {file or '(unknown)'} that the fetch needs"
    elif isinstance(error, RepositoryNotFoundError):
        private = (
            ""
            if has_token
            else f", or it is private or gated and {token_env} is unset (HTTP {status or 401})"
        )
        message = f"{name} was not found on {_endpoint()}{private}; check {config_key}"
    elif hub_offline():
        message = f"cannot fetch {name}{where}: the hub is switched off here (HF_HUB_OFFLINE)"
    elif status is not None:
        message = f"cannot fetch {name}{where} from {_endpoint()}: the hub answered HTTP {status}"
    else:
        message = f"cannot fetch {name}{where} from {_endpoint()}: the hub could not be reached"
    return HubFetchError(f"{message} ({type(error).__name__}: {error}). {instead}")


def _token(token_env: str) -> str | None:
    return os.environ.get(token_env) or None


@contextlib.contextmanager
def _explained(
    repo_id: str, revision: str, repo_type: str, config_key: str, instead: str, token_env: str
) -> Iterator[None]:
    """Re-raise any failure of the block's hub calls as :func:`explain_fetch_error` words it."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - every failure gets the same actionable message
        raise explain_fetch_error(
            error, repo_id, revision, repo_type, config_key, instead, token_env
        ) from error


def resolve_revision(
    repo_id: str,
    revision: str,
    *,
    repo_type: str = "model",
    config_key: str = "<config key>",
    instead: str = "",
    token_env: str = "HF_TOKEN",
) -> str:
    """The commit ``revision`` of ``repo_id`` points to now (a commit resolves to itself)."""
    from huggingface_hub import HfApi

    with _explained(repo_id, revision, repo_type, config_key, instead, token_env):
        info = HfApi().repo_info(
            repo_id, revision=revision, repo_type=repo_type, token=_token(token_env)
        )
    if not info.sha or not is_commit(info.sha):
        raise HubFetchError(
            f"{repo_id} at revision {revision!r}: the hub answered without a commit ({info.sha!r})"
        )
    return str(info.sha)


def _check_arguments(repo_id: Any, revision: Any, config_key: str) -> None:
    if not isinstance(repo_id, str) or not repo_id.strip("/"):
        raise HubFetchError(
            f"{config_key}: a hub repository id (owner/name) is required, got {repo_id!r}"
        )
    if not isinstance(revision, str) or not revision:
        raise HubFetchError(
            f"{config_key}.revision is required for {repo_id}: a commit hash (reproducible) or a "
            "branch or tag (resolved once, at the first fetch)"
        )


def read_fetch_record(directory: str | os.PathLike[str]) -> HubFetch | None:
    """The record of a finished fetch in ``directory``, or None if it holds none."""
    data = read_record(directory, source="hub", legacy=(FETCH_RECORD,))
    if data is None:
        return None
    del data["source"]
    data["files"] = tuple(data.get("files", ()))
    return HubFetch(**data)


def _local_files(directory: Path) -> tuple[str, ...]:
    return tuple(
        sorted(
            str(path.relative_to(directory))
            for path in directory.rglob("*")
            if path.is_file() and path.name not in (RECORD_FILE, FETCH_RECORD)
        )
    )


def fetch_snapshot(
    repo_id: str,
    revision: str,
    out_dir: str | os.PathLike[str],
    *,
    kind: str,
    config_key: str,
    repo_type: str = "model",
    allow_patterns: Sequence[str] | None = None,
    ignore_patterns: Sequence[str] = (),
    fallback_patterns: Sequence[str] = (),
    required: Sequence[str] = ("config.json",),
    token_env: str = "HF_TOKEN",
) -> HubFetch:
    """Fetch ``repo_id`` at the commit ``revision`` resolves to into ``out_dir``, atomically.

    ``allow_patterns``/``ignore_patterns`` select the files (None: every file);
    ``fallback_patterns`` are fetched as well when nothing matched ``*.safetensors`` (old
    repositories with PyTorch weights only). Every name of ``required`` must be present
    afterwards. A rerun after an interruption resumes the hidden partial directory, unless it
    holds another commit (a branch moved in between), which is discarded.
    """
    _check_arguments(repo_id, revision, config_key)
    target = Path(out_dir)
    instead = (
        f"To provide it without the network: fetch it on a machine with network (`hf download "
        f"{repo_id} --revision {revision}{' --repo-type dataset' if repo_type == 'dataset' else ''}"
        f" --local-dir {target}`, or this workflow's fetching rule on a login node), then point "
        f"{config_key} at that directory (`source: local, path: <dir>` for a model)."
    )
    commit = resolve_revision(
        repo_id,
        revision,
        repo_type=repo_type,
        config_key=config_key,
        instead=instead,
        token_env=token_env,
    )
    partial = target.with_name(f".{target.name}.partial")
    marker = partial / ".canopy_commit"
    if partial.exists() and (not marker.is_file() or marker.read_text().strip() != commit):
        shutil.rmtree(partial)  # another commit's files must not mix with this one's
    partial.mkdir(parents=True, exist_ok=True)
    marker.write_text(commit + "\n")

    from huggingface_hub import snapshot_download

    def download(patterns: Sequence[str] | None) -> None:
        snapshot_download(
            repo_id=repo_id,
            revision=commit,
            repo_type=repo_type,
            local_dir=partial,
            allow_patterns=list(patterns) if patterns is not None else None,
            ignore_patterns=list(ignore_patterns) or None,
            token=_token(token_env),
        )

    with _explained(repo_id, revision, repo_type, config_key, instead, token_env):
        download(allow_patterns)
        if fallback_patterns and not any(partial.glob("*.safetensors")):
            download(fallback_patterns)
    missing = [name for name in required if not (partial / name).exists()]
    if missing:
        raise HubFetchError(
            f"{repo_id} at revision {revision!r} (commit {commit}) has no {', '.join(missing)}: "
            f"it is not a {kind} this workflow can load; check {config_key}"
        )
    # snapshot_download keeps resume metadata in .cache/; the finished directory does not need it.
    shutil.rmtree(partial / ".cache", ignore_errors=True)
    marker.unlink()
    record = HubFetch(
        kind=kind,
        repo_id=repo_id,
        repo_type=repo_type,
        revision=revision,
        commit=commit,
        endpoint=_endpoint(),
        fetched_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        files=_local_files(partial),
    )
    write_record(partial, "hub", record.to_dict())
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, target)
    return record


def download(
    kind: str,
    repo_id: str,
    revision: str,
    out_dir: str | os.PathLike[str],
    *,
    config_key: str | None = None,
    token_env: str = "HF_TOKEN",
) -> HubFetch:
    """Fetch a ``model`` or an ``embedder`` into ``out_dir``.

    A model (a causal LM or a classifier): weights, config, tokenizer and chat template,
    generation config; gated models (Llama 3.1, Gemma 3) need an access token in ``token_env``.
    An embedder (a sentence-transformers model): every file but other runtimes' exports, custom
    code included for models that need ``trust_remote_code``. :func:`download_model` and
    :func:`download_embedder` are this function for one kind.
    """
    default_key, patterns = _DOWNLOADS[kind]
    config_key = config_key or default_key
    record = fetch_snapshot(
        repo_id,
        revision,
        out_dir,
        kind=kind,
        config_key=config_key,
        token_env=token_env,
        **patterns,
    )
    target = Path(out_dir)
    weights = any(target.glob("*.safetensors")) or any(target.glob("pytorch_model*.bin"))
    if kind == "model" and not weights:
        shutil.rmtree(target)
        raise HubFetchError(
            f"model {repo_id} at revision {revision!r}: no weights (safetensors or "
            f"pytorch_model*.bin) came back; check {config_key}.id"
        )
    return record


# Per kind: the config key named in errors by default, and what to fetch.
_DOWNLOADS: dict[str, tuple[str, dict[str, Sequence[str]]]] = {
    "model": (
        "families.<family>.<variant>",
        {
            "allow_patterns": ALLOW_PATTERNS,
            "ignore_patterns": _MODEL_IGNORE_PATTERNS,
            "fallback_patterns": _FALLBACK_WEIGHTS,
        },
    ),
    "embedder": ("embedders.<name>", {"ignore_patterns": EMBEDDER_IGNORE_PATTERNS}),
}

#: ``download("model", ...)``.
download_model = functools.partial(download, "model")
#: ``download("embedder", ...)``.
download_embedder = functools.partial(download, "embedder")


def moved_revisions(
    records: Iterable[HubFetch], *, token_env: str = "HF_TOKEN"
) -> list[tuple[HubFetch, str]]:
    """``(record, commit now)`` for every fetched branch or tag that points elsewhere today."""
    moved = []
    for record in records:
        if is_commit(record.revision):
            continue
        now = resolve_revision(
            record.repo_id,
            record.revision,
            repo_type=record.repo_type,
            config_key=record.repo_id,
            token_env=token_env,
        )
        if now != record.commit:
            moved.append((record, now))
    return moved

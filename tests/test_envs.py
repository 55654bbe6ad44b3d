"""The conda environments of envs/ against the pip/apt pins and against what the rules import.

Two set-up paths must give the same software: pip + apt (requirements.txt, requirements-apt.txt,
setup.sh) and conda (envs/*.yaml through `snakemake --use-conda`). Conda cannot be installed on the
development machines, so the envs are checked here statically: exact pins only, the same
versions as the pip/apt path, one existing env per rule, and every third-party module a rule's
script can import (following the canopy functions it calls) shipped by that rule's env.
"""

from __future__ import annotations

import ast
import functools
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from support.workflow import REPO, snakemake, workflow_rules

ENVS_DIR = REPO / "envs"
ENV_FILES = sorted(ENVS_DIR.glob("*.yaml"))
SRC = REPO / "src"

CONDA_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.\-]*)=(?P<version>[A-Za-z0-9_.+]+)$")
PIP_SPEC = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.\-]*)(?:\[[A-Za-z0-9_,\-]+\])?==(?P<version>[A-Za-z0-9_.+!\-]+)$"
)

# R packages pinned for conda but not packaged by Debian bookworm (so absent from
# requirements-apt.txt): the pip/apt path computes these diagnostics itself.
CONDA_ONLY_R = {"r-dharma": "DHARMa is not in Debian; the apt path simulates its residuals itself"}
# Packages that ship with R itself (r-base / r-base-core).
BASE_R_PACKAGES = {
    "base", "compiler", "datasets", "graphics", "grDevices", "grid", "methods", "parallel",
    "splines", "stats", "stats4", "tcltk", "tools", "utils",
}  # fmt: skip


# --------------------------------------------------------------------------- reading the pins


def load_env(path: Path) -> dict:
    with path.open() as handle:
        env = yaml.safe_load(handle)
    if not isinstance(env, dict) or not isinstance(env.get("dependencies"), list):
        raise AssertionError(f"{path.name}: not a conda environment file (no dependencies list)")
    return env


def conda_specs(env: dict) -> list[str]:
    return [item for item in env["dependencies"] if isinstance(item, str)]


def pip_specs(env: dict) -> list[str]:
    specs: list[str] = []
    for item in env["dependencies"]:
        if isinstance(item, dict):
            specs.extend(item.get("pip", []))
    return specs


def conda_pins(env: dict) -> dict[str, str]:
    pins = {}
    for spec in conda_specs(env):
        match = CONDA_SPEC.match(spec)
        assert match, f"not an exact conda pin: {spec!r}"
        pins[match["name"]] = match["version"]
    return pins


def exact_pip_pins(specs: Iterable[str], where: str) -> dict[str, str]:
    """{canonical name: version} of pip specs that must each pin one exact version."""
    pins = {}
    for spec in specs:
        match = PIP_SPEC.match(spec)
        assert match, f"{where}: not an exact pip pin: {spec!r}"
        pins[canonicalize_name(match["name"])] = match["version"]
    return pins


def pip_pins(env: dict) -> dict[str, str]:
    return exact_pip_pins(pip_specs(env), "conda env")


def pin_lines(path: Path) -> list[str]:
    """A pin file's lines without comments and blanks."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def requirements_pins() -> dict[str, str]:
    return exact_pip_pins(pin_lines(REPO / "requirements.txt"), "requirements.txt")


def apt_pins() -> dict[str, str]:
    pins = {}
    for line in pin_lines(REPO / "requirements-apt.txt"):
        name, _, version = line.partition("=")
        assert version, f"requirements-apt.txt: not an exact pin: {line!r}"
        pins[name] = version
    return pins


def debian_upstream(version: str) -> str:
    """The upstream part of a Debian version: no epoch, no Debian revision, no +dfsg repack tag.

    '1.1-31-1' -> '1.1-31'; '1.8.4-1+dfsg-1' -> '1.8.4-1'; '1.1.5+dfsg-4' -> '1.1.5'.
    """
    version = version.split(":", 1)[-1]
    upstream = version.rsplit("-", 1)[0] if "-" in version else version
    return re.sub(r"[+~](dfsg|ds|repack)[0-9.]*$", "", upstream)


def conda_r_version(version: str) -> str:
    """conda-forge writes CRAN's '1.1-31' as '1.1_31'."""
    return version.replace("_", "-")


def debian_name(conda_name: str) -> str:
    return "r-base-core" if conda_name == "r-base" else "r-cran-" + conda_name[2:]


# --------------------------------------------------------------------------- pins


def test_there_are_envs() -> None:
    assert {path.stem for path in ENV_FILES} >= {"analysis", "data", "figures", "stats", "torch"}


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
def test_env_is_exactly_pinned(path: Path) -> None:
    env = load_env(path)
    assert env.get("name"), f"{path.name}: give the environment a name"
    channels = env.get("channels") or []
    assert "conda-forge" in channels, f"{path.name}: packages come from conda-forge"
    assert "defaults" not in channels, f"{path.name}: the defaults channel makes solves drift"
    for spec in conda_specs(env):
        assert CONDA_SPEC.match(
            spec
        ), f"{path.name}: {spec!r} is not an exact conda pin (write name=version, no ranges)"
    for item in env["dependencies"]:
        assert isinstance(item, str) or set(item) == {"pip"}, f"{path.name}: unknown entry {item}"
    for spec in pip_specs(env):
        assert PIP_SPEC.match(
            spec
        ), f"{path.name}: {spec!r} is not an exact pip pin (write name==version, no ranges)"
    pip_pinned = bool(pip_specs(env))
    assert not pip_pinned or "pip" in conda_pins(env), f"{path.name}: pin pip itself"


def test_envs_share_python_and_pip() -> None:
    pythons = {path.name: conda_pins(load_env(path)).get("python") for path in ENV_FILES}
    pips = {path.name: conda_pins(load_env(path)).get("pip") for path in ENV_FILES}
    assert len(set(pythons.values())) == 1 and None not in pythons.values(), pythons
    assert len(set(pips.values())) == 1, pips
    assert sys.version.startswith(
        next(iter(pythons.values())) + "."
    ), f"envs pin python {next(iter(pythons.values()))} but the pip path runs {sys.version}"


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
def test_pip_pins_equal_requirements_txt(path: Path) -> None:
    required = requirements_pins()
    for name, version in pip_pins(load_env(path)).items():
        assert name in required, f"{path.name}: {name} is not pinned in requirements.txt"
        assert (
            version == required[name]
        ), f"{path.name} pins {name}=={version}, requirements.txt {name}=={required[name]}"


def test_debian_upstream_version_parsing() -> None:
    assert debian_upstream("1.1-31-1") == "1.1-31"
    assert debian_upstream("1.8.4-1+dfsg-1") == "1.8.4-1"
    assert debian_upstream("1.1.5+dfsg-4") == "1.1.5"
    assert debian_upstream("4.2.2.20221110-2") == "4.2.2.20221110"
    assert debian_upstream("1:2.3-4") == "2.3"
    assert conda_r_version("1.8.4_1") == "1.8.4-1"


def r_versions_match(conda_name: str, conda_version: str, debian_version: str) -> bool:
    upstream = debian_upstream(debian_version)
    if conda_name == "r-base":
        # Debian's r-base-core is '<R version>.<release date>' (4.2.2.20221110).
        return upstream == conda_version or upstream.startswith(conda_version + ".")
    return upstream == conda_r_version(conda_version)


def test_r_pins_match_debian_upstream_versions() -> None:
    stats = conda_pins(load_env(ENVS_DIR / "stats.yaml"))
    conda_r = {name: version for name, version in stats.items() if name.startswith("r-")}
    debian = apt_pins()
    for name, version in conda_r.items():
        if name in CONDA_ONLY_R:
            assert debian_name(name) not in debian, f"{name} is in Debian after all: pin it there"
            continue
        debian_version = debian.get(debian_name(name))
        assert debian_version is not None, (
            f"envs/stats.yaml pins {name}={version} but requirements-apt.txt has no "
            f"{debian_name(name)}: add it there (or list it in CONDA_ONLY_R with the reason)"
        )
        assert r_versions_match(name, version, debian_version), (
            f"envs/stats.yaml pins {name}={version}, requirements-apt.txt "
            f"{debian_name(name)}={debian_version} (upstream {debian_upstream(debian_version)})"
        )
    for debian_package in debian:
        assert any(
            debian_name(name) == debian_package for name in conda_r
        ), f"requirements-apt.txt pins {debian_package} but envs/stats.yaml has no conda twin"


def r_packages_used() -> dict[str, str]:
    """R packages that the R scripts of the library load: {package: file}."""
    used = {}
    patterns = [
        r"library\(\s*['\"]?([A-Za-z][A-Za-z0-9.]*)",
        r"require\(\s*['\"]?([A-Za-z][A-Za-z0-9.]*)",
        r"requireNamespace\(\s*['\"]([A-Za-z][A-Za-z0-9.]*)",
        r"\b([A-Za-z][A-Za-z0-9.]*)::",
    ]
    for path in sorted((SRC / "canopy" / "R").glob("*.R")):
        code = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
        for pattern in patterns:
            for name in re.findall(pattern, code):
                used.setdefault(name, path.name)
    return used


def test_stats_env_provides_every_r_package_the_code_loads() -> None:
    used = r_packages_used()
    assert "glmmTMB" in used, "the scan found no glmmTMB use: has src/canopy/R moved?"
    stats = conda_pins(load_env(ENVS_DIR / "stats.yaml"))
    for package, where in used.items():
        if package in BASE_R_PACKAGES:
            continue
        assert "r-" + package.lower() in stats, (
            f"src/canopy/R/{where} loads the R package {package}; envs/stats.yaml lacks "
            f"r-{package.lower()}"
        )


# --------------------------------------------------------------------------- rules and envs


def test_every_rule_has_an_existing_conda_env() -> None:
    rules = workflow_rules()
    assert {"sample_rollouts", "fit_glmm", "prompt_metrics"} <= set(rules)
    for name, rule in rules.items():
        if not rule["runs"]:
            continue
        assert rule["conda"] is not None, f"rule {name} has no conda: directive"
        assert (
            rule["conda"].parent == ENVS_DIR.resolve()
        ), f"rule {name}: conda env {rule['conda']} is not in envs/"
        assert rule["conda"].is_file(), f"rule {name}: {rule['conda']} does not exist"


def test_every_env_is_used_by_a_rule() -> None:
    used = {rule["conda"] for rule in workflow_rules().values() if rule["conda"]}
    unused = [path.name for path in ENV_FILES if path.resolve() not in used]
    assert not unused, f"envs no rule uses: {unused}"


# --------------------------------------------------------------------------- imports of the rules
#
# A static walk: the script's own imports, then for each `from canopy.x import name` the
# module-level imports of canopy.x and the imports inside `name` and inside every function of
# canopy.x that `name` refers to (transitively, across canopy modules). Imports under
# `if TYPE_CHECKING:` or inside `try: ... except ImportError:` are optional and skipped.


def _optional_import_block(node: ast.Try) -> bool:
    """`try: import x / except ImportError: <fallback>`: x is optional. A handler that raises
    (typically a clearer error saying what to install) marks x as required after all."""
    if not _catches_import_error(node):
        return False
    return not any(isinstance(inner, ast.Raise) for h in node.handlers for inner in ast.walk(h))


def _catches_import_error(node: ast.Try) -> bool:
    for handler in node.handlers:
        names = []
        if handler.type is None:
            return True
        for part in handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]:
            names.append(part.id if isinstance(part, ast.Name) else getattr(part, "attr", ""))
        if {"ImportError", "ModuleNotFoundError", "Exception"} & set(names):
            return True
    return False


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(nodes: list[ast.stmt], into_functions: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements that run (at import time, or also inside functions when asked)."""
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node):
            yield from _imports(node.orelse, into_functions)
        elif isinstance(node, ast.Try) and _optional_import_block(node):
            yield from _imports(node.finalbody, into_functions)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if into_functions:
                yield from _imports(node.body, into_functions)
        elif isinstance(node, ast.ClassDef):
            # The class body runs at import time, its methods when called.
            for child in node.body:
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    if into_functions:
                        yield from _imports(child.body, into_functions)
                else:
                    yield from _imports([child], into_functions)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    yield from _imports(
                        [c for c in children if isinstance(c, ast.AST)], into_functions
                    )


class _Module:
    """One canopy module: its import-time imports and its top-level definitions."""

    def __init__(self, path: Path, name: str) -> None:
        self.name = name
        self.path = path
        tree = ast.parse(path.read_text(), filename=str(path))
        self.module_imports = list(_imports(tree.body, into_functions=False))
        self.definitions: dict[str, ast.stmt] = {}
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.definitions[node.name] = node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Name):
                        self.definitions[target.id] = node
        # name -> (canopy module, attribute) for `from canopy.x import attr as name`
        self.canopy_names: dict[str, tuple[str, str]] = {}
        for node in self.module_imports:
            if isinstance(node, ast.ImportFrom):
                module = _absolute(node, name)
                for alias in node.names:
                    if module and module.split(".")[0] == "canopy":
                        self.canopy_names[alias.asname or alias.name] = (module, alias.name)


# Calls that load a package named by a string: importlib.import_module("x"),
# importlib.resources.files("x") (package data such as HumanEval's problems).
_PACKAGE_BY_NAME = {"import_module", "files", "find_spec"}


def _packages_named_in_calls(node: ast.AST) -> list[str]:
    names = []
    for call in ast.walk(node):
        if not (isinstance(call, ast.Call) and call.args):
            continue
        function = call.func
        called = (
            function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
        )
        first = call.args[0]
        if (
            called in _PACKAGE_BY_NAME
            and isinstance(first, ast.Constant)
            and isinstance(first.value, str)
        ):
            names.append(first.value.split(".")[0])
    return names


def _absolute(node: ast.ImportFrom, package_module: str) -> str | None:
    if node.level == 0:
        return node.module
    parts = package_module.split(".")[: -node.level] if node.level else []
    return ".".join(parts + ([node.module] if node.module else []))


@functools.lru_cache(maxsize=None)
def _canopy_module(name: str) -> _Module:
    relative = Path(*name.split("."))
    for candidate in (SRC / relative.with_suffix(".py"), SRC / relative / "__init__.py"):
        if candidate.is_file():
            module_name = name if candidate.name != "__init__.py" else name + ".__init__"
            return _Module(candidate, module_name)
    raise AssertionError(f"{name} is imported but src/{relative}.py does not exist")


def _top_level(module: str | None) -> str | None:
    return module.split(".")[0] if module else None


def third_party_imports(script: Path) -> dict[str, str]:
    """{top-level module: where it is imported} for everything the script can import."""
    found: dict[str, str] = {}
    visited_modules: set[str] = set()
    visited_names: set[tuple[str, str]] = set()
    pending: list[tuple[str, str | None]] = []  # (canopy module, name or None for the module)

    def record(node: ast.Import | ast.ImportFrom, where: str, package_module: str) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _top_level(alias.name) == "canopy":
                    pending.append((alias.name, None))
                else:
                    found.setdefault(alias.name.split(".")[0], where)
            return
        module = _absolute(node, package_module)
        if _top_level(module) == "canopy":
            for alias in node.names:
                pending.append((module, alias.name))
        elif module and (script.parent / f"{module}.py").is_file():
            # A helper beside the scripts (script_setup): everything it imports counts.
            if module not in visited_modules:
                visited_modules.add(module)
                helper = script.parent / f"{module}.py"
                helper_tree = ast.parse(helper.read_text(), filename=str(helper))
                for helper_node in _imports(helper_tree.body, into_functions=True):
                    record(helper_node, f"workflow/scripts/{helper.name}", "")
        elif module:
            found.setdefault(module.split(".")[0], where)

    tree = ast.parse(script.read_text(), filename=str(script))
    for node in _imports(tree.body, into_functions=True):
        record(node, f"workflow/scripts/{script.name}", "")
    for named in _packages_named_in_calls(tree):
        found.setdefault(named, f"workflow/scripts/{script.name}")

    while pending:
        module_name, attribute = pending.pop()
        module = _canopy_module(module_name)
        package = module.name
        where = str(module.path.relative_to(REPO))
        if module_name not in visited_modules:
            visited_modules.add(module_name)
            for node in module.module_imports:
                # Import-time imports of canopy modules load them (and their own imports).
                if (
                    isinstance(node, ast.ImportFrom)
                    and _top_level(_absolute(node, package)) == "canopy"
                ):
                    pending.append((_absolute(node, package), None))
                else:
                    record(node, where, package)
        if attribute is None or (module_name, attribute) in visited_names:
            continue
        visited_names.add((module_name, attribute))
        if attribute in module.canopy_names:  # re-exported from another canopy module
            pending.append(module.canopy_names[attribute])
            continue
        definition = module.definitions.get(attribute)
        if definition is None:
            try:  # `from canopy.figures import common`: a submodule
                _canopy_module(f"{module_name}.{attribute}")
            except AssertionError:
                continue
            pending.append((f"{module_name}.{attribute}", None))
            for name in _canopy_module(f"{module_name}.{attribute}").definitions:
                pending.append((f"{module_name}.{attribute}", name))
            continue
        for node in _imports([definition], into_functions=True):
            record(node, f"{where} ({attribute})", package)
        for named in _packages_named_in_calls(definition):
            if named != "canopy":
                found.setdefault(named, f"{where} ({attribute})")
        for node in ast.walk(definition):
            if isinstance(node, ast.Name):
                if node.id in module.definitions:
                    pending.append((module_name, node.id))
                elif node.id in module.canopy_names:
                    pending.append(module.canopy_names[node.id])
    return found


# The library itself comes from src/ beside the Snakefile, not from the env.
LOCAL_MODULES = {"canopy"}
# Modules a rule imports only on an opt-in path that the envs deliberately leave out.
OPTIONAL_MODULES = {
    "vllm": "sampling backend `vllm` (GPU only, large): install it into the torch env yourself",
}


@functools.lru_cache(maxsize=1)
def _packages_distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def distribution_of(module: str) -> str:
    """The pip distribution that provides an importable top-level module (installed metadata)."""
    providers = _packages_distributions().get(module)
    assert providers, (
        f"no installed distribution provides the module {module!r}: install it and pin it in "
        "requirements.txt and the rule's envs/*.yaml"
    )
    return canonicalize_name(providers[0])


@functools.lru_cache(maxsize=None)
def dependency_closure(distributions: frozenset[str]) -> frozenset[str]:
    """The distributions plus everything they require (installed metadata, no extras): what pip
    inside the conda env installs."""
    closure = set(distributions)
    stack = list(distributions)
    while stack:
        name = stack.pop()
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            dependency = canonicalize_name(requirement.name)
            if dependency not in closure:
                closure.add(dependency)
                stack.append(dependency)
    return frozenset(closure)


def test_import_scan_follows_canopy_functions(tmp_path: Path) -> None:
    """The scanner itself: a lazy import inside a called function counts, an unused one does not."""
    script = tmp_path / "probe.py"
    script.write_text(
        "from canopy.auxiliary_models import load_classifier\nfrom canopy.diversity import "
        "vendi_score\nfrom canopy.io import write_tsv\nimport yaml\n"
    )
    found = third_party_imports(script)
    assert {"torch", "transformers", "pandas", "numpy", "yaml"} <= set(found)
    assert "sentence_transformers" not in found  # only under TYPE_CHECKING and in unused loaders
    script.write_text("from canopy.diversity import DiversitySettings\n")
    assert "torch" not in third_party_imports(script)
    # A guarded import whose handler raises is required; one with a silent fallback is not.
    script.write_text(
        "try:\n    import requiredmod\nexcept ImportError as e:\n    raise SystemExit('x') from e\n"
        "try:\n    import optionalmod\nexcept ImportError:\n    optionalmod = None\n"
        "from importlib import resources\ndata = resources.files('packagedata') / 'x'\n"
    )
    found = third_party_imports(script)
    assert {"requiredmod", "packagedata"} <= set(found) and "optionalmod" not in found


def rules_with_scripts() -> list[str]:
    return sorted(name for name, rule in workflow_rules().items() if rule["script"])


@pytest.mark.parametrize("rule_name", rules_with_scripts())
def test_rule_env_provides_what_its_script_imports(rule_name: str) -> None:
    rule = workflow_rules()[rule_name]
    env = load_env(rule["conda"])
    provided = dependency_closure(frozenset(pip_pins(env)))
    stdlib = set(sys.stdlib_module_names)
    missing = []
    for module, where in sorted(third_party_imports(rule["script"]).items()):
        if module in stdlib or module in LOCAL_MODULES or module in OPTIONAL_MODULES:
            continue
        if module == "__future__":
            continue
        distribution = distribution_of(module)
        if distribution not in provided:
            missing.append(f"{module} ({distribution}, imported in {where})")
    assert (
        not missing
    ), f"rule {rule_name} runs in envs/{rule['conda'].name}, which does not install: " + "; ".join(
        missing
    )


# --------------------------------------------------------------------------- snakemake --use-conda


def test_use_conda_dry_run(tmp_path: Path) -> None:
    """`--use-conda -n` needs a conda executable: Snakemake runs `conda info --json` while it builds
    the DAG, even for a dry run. Where conda exists the dry run must succeed; where it does not,
    the run must fail for that reason only (the workflow and its envs parse)."""
    result = snakemake(tmp_path, "--use-conda", "-n", check=False)
    if shutil.which("conda") or shutil.which("mamba"):
        assert result.returncode == 0, result.stderr[-4000:]
        return
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Error running conda info" in output, output[-4000:]
    pytest.skip("conda is not installed: --use-conda dry runs need `conda info` (see test doc)")

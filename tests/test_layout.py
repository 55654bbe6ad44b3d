"""The library's layout: no import cycle, data files shipped as package data, and documentation
that names only modules that exist and nothing outside the repository."""

from __future__ import annotations

import ast
import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = SRC / "canopy"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imported(module: str, path: Path) -> set[str]:
    """The canopy modules ``module`` imports, at the top or inside a function (a lazy import
    still ties the two modules together). ``from canopy.x import y`` counts as ``canopy.x.y``
    where that is a module, else as ``canopy.x``; a parent package that Python imports on the
    way is not counted."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in MODULES else base)
    return {name for name in found if name in MODULES and name != module}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_import_graph_of_the_library_has_no_cycle() -> None:
    graph = {module: _imported(module, path) for module, path in MODULES.items()}
    assert graph["canopy.sampling.task"] >= {"canopy.prompts", "canopy.sampling.shards"}  # real
    assert _cycles(graph) == []


#: The library's layers, bottom first, as docs/architecture.md draws them: a module imports from
#: its own layer or the ones below.
LAYERS = [
    {"canopy.config", "canopy.io", "canopy.sources.record"},
    {"canopy.modeling", "canopy.hub", "canopy.checkpoints", "canopy.prompts"},
    {"canopy.sources", "canopy.auxiliary_models"},
    {"canopy.sampling", "canopy.training", "canopy.filtering"},
    {"canopy.entropy", "canopy.diversity", "canopy.semantic_entropy", "canopy.bootstrap"},
    {"canopy.panel", "canopy.stats", "canopy.robustness", "canopy.power"},
    {"canopy.figures", "canopy.report", "canopy.overview", "canopy.provenance"},
]


def _layer(module: str) -> int | None:
    """The layer of a module: that of the longest listed name it is or lies under."""
    owners = [
        (len(name), level)
        for level, names in enumerate(LAYERS)
        for name in names
        if module == name or module.startswith(name + ".")
    ]
    return max(owners)[1] if owners else None


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    unplaced = sorted(m for m in MODULES if m != "canopy" and _layer(m) is None)
    assert unplaced == [], f"place these modules in LAYERS (and the diagram): {unplaced}"
    upward = sorted(
        f"{module} -> {target}"
        for module, path in MODULES.items()
        if module != "canopy"
        for target in _imported(module, path)
        if _layer(target) > _layer(module)
    )
    assert upward == []
    assert _layer("canopy.sources.record") < _layer("canopy.hub") < _layer("canopy.sources.hub")


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_every_data_file_of_the_library_is_package_data() -> None:
    """A file the library reads at run time (R scripts, word lists, the plot style) must be
    declared in pyproject.toml, or a wheel would ship the code without it."""
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]
    data = [
        path
        for path in PACKAGE.rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts
    ]
    assert {path.name for path in data} >= {"arithmetic.json", "python_functions.json"}
    for path in data:
        covered = False
        for package, patterns in declared.items():
            root = SRC.joinpath(*package.split("."))
            if root in path.parents:
                relative = path.relative_to(root).as_posix()
                covered = covered or any(fnmatch(relative, pattern) for pattern in patterns)
        assert (
            covered
        ), f"{path.relative_to(REPO)} is not declared as package data in pyproject.toml"


DOCUMENTS = [
    PACKAGE / "__init__.py",
    REPO / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    *sorted((REPO / "workflow" / "report").rglob("*.rst")),
]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(REPO)))
def test_documents_name_only_modules_that_exist(document: Path) -> None:
    names = set(
        re.findall(r"\bcanopy(?:\.[a-z_][a-z0-9_]*)+", document.read_text(encoding="utf-8"))
    )
    missing = []
    for name in sorted(names):
        # canopy.x.y may be an attribute of module canopy.x (canopy.io.atomic_path).
        parts = name.split(".")
        if not any(".".join(parts[:end]) in MODULES for end in range(2, len(parts) + 1)):
            missing.append(name)
    assert missing == []


SOURCES = [
    path
    for pattern in (
        "src/**/*.py",
        "src/**/*.R",
        "workflow/**/*",
        "tests/*.py",
        "benchmarks/*",
        "docs/*",
    )
    for path in REPO.glob(pattern)
    # Bytecode is written beside the scripts by every run (and by setup.sh): not a source.
    if path.is_file() and path.name != "test_layout.py" and "__pycache__" not in path.parts
] + [REPO / "README.md", REPO / "Snakefile"]


def test_nothing_cites_notes_outside_the_repository() -> None:
    outside = re.compile(r"DESIGN(\.md| section)|NOTES\.md|\.\./shared/|design notes")
    cited = [
        f"{path.relative_to(REPO)}:{number}"
        for path in SOURCES
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if outside.search(line)
    ]
    assert len(SOURCES) > 50
    assert cited == []

"""The package's layout and import structure: no circles; the tools (the command line in
``portable_siglip/cli/``, the benchmarks in ``portable_siglip/bench/``) stand apart from the
core, which imports no tool and no framework.

Read from the source with ``ast``, without importing anything, so a violation is found even
on a path no other test executes. Every ``import`` statement counts, also one inside a
function: a lazy import still ties the two modules together.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Source folder of each installed package (pyproject's [tool.setuptools.package-dir]).
SOURCES = {
    "portable_siglip": ROOT / "portable_siglip",
    "portable_siglip.backends": ROOT / "backends",
    "portable_siglip.conformance": ROOT / "conformance",
}

#: Array and transport libraries the core must not import when it is imported.
FRAMEWORKS = {"numpy", "torch", "jax", "jaxlib", "cupy", "mpi4py", "array_api_strict"}

#: Modules of `portable_siglip` that are tools, not the core: ``python -m portable_siglip``,
#: the command line (with its device and launcher helpers and doctor) and the benchmarks.
#: Everything else in `portable_siglip/` is the core.
TOOLS = (
    "portable_siglip.__main__",
    "portable_siglip.cli",
    "portable_siglip.bench",
)

#: Words in a module's name that say it is a tool, so it belongs in one of the `TOOLS`.
TOOL_WORDS = ("cli", "command", "doctor", "launch", "device", "bench")

#: Where the command-line modules stood before `portable_siglip/cli/` held them.
FORMER_TOOLS = ("_cli", "_doctor", "_launch", "_devices")

#: Third-party libraries each bridge may import at module level: its own, and numpy.
BRIDGE_IMPORTS = {
    "portable_siglip.backends.torch": {"torch"},
    "portable_siglip.backends.jax": {"jax", "numpy"},
    "portable_siglip.backends.mpi": {"mpi4py", "numpy"},
    "portable_siglip.backends.nccl": {"numpy"},
}


def modules() -> dict[str, Path]:
    """Every module of the installed packages, by dotted name."""
    found: dict[str, Path] = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = modules()


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def imports(name: str) -> Iterator[tuple[str, int, bool]]:
    """Yield (imported module, line, at module level) for every import in module `name`."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    top_level = {id(node) for node in tree.body}
    # Statements directly under a module-level `if`/`try` also run at import time.
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)):
            top_level |= {id(child) for child in ast.walk(node)}
    package = name if is_package(name) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        level = id(node) in top_level
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, level
        elif isinstance(node, ast.ImportFrom):
            if node.module == "__future__":
                continue
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = str(node.module)
            # `from package import module` imports the module; `from module import name`
            # imports the module that defines the name.
            for alias in node.names:
                child = f"{target}.{alias.name}"
                yield (child if child in MODULES else target), node.lineno, level


def internal_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name in MODULES:
        for target, _, _ in imports(name):
            if target in MODULES and target != name:
                graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def is_core(name: str) -> bool:
    if not name.startswith("portable_siglip") or name.startswith(
        ("portable_siglip.backends", "portable_siglip.conformance")
    ):
        return False
    return not is_tool(name)


def is_tool(name: str) -> bool:
    return any(name == tool or name.startswith(tool + ".") for tool in TOOLS)


def test_the_walker_sees_the_package() -> None:
    # The checks below are only as good as the graph: it must hold the modules and edges
    # everyone knows are there.
    graph = internal_graph()
    assert "portable_siglip._losses" in graph
    assert "portable_siglip._checks" in graph["portable_siglip._losses"]
    assert "portable_siglip.comm" in graph["portable_siglip._distributed"]
    assert "portable_siglip" in graph["portable_siglip.backends._torch_common"]
    assert "portable_siglip.backends._torch_common" in graph["portable_siglip.backends.torch"]
    assert any(name.startswith("portable_siglip.bench.") for name in graph)
    assert "portable_siglip.cli._doctor" in graph["portable_siglip.cli._commands"]
    assert "portable_siglip._losses" in graph["portable_siglip.cli._commands"]
    assert is_core("portable_siglip._losses")
    assert is_core("portable_siglip.comm")
    assert not is_core("portable_siglip.cli._launch")
    assert not is_core("portable_siglip.__main__")


def test_circles_are_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]


def test_no_import_circle() -> None:
    found = circles(internal_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if is_core(n)))
def test_core_imports_no_tool(name: str) -> None:
    # Not even lazily: the command line and the benchmarks may import the core, never the
    # other way round.
    for target, line, _ in imports(name):
        where = f"{MODULES[name].relative_to(ROOT)}:{line}"
        assert not is_tool(target), f"{where} imports the tool {target}"


@pytest.mark.parametrize(
    "name", sorted(n for n in MODULES if n.startswith("portable_siglip.bench"))
)
def test_benchmarks_import_no_command_line(name: str) -> None:
    # One way between the two tools: the command line runs the benchmarks (cli/_bench.py),
    # and a benchmark needs nothing of the command line.
    for target, line, _ in imports(name):
        where = f"{MODULES[name].relative_to(ROOT)}:{line}"
        assert not target.startswith("portable_siglip.cli"), f"{where} imports {target}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if is_core(n)))
def test_core_imports_no_framework(name: str) -> None:
    for target, line, level in imports(name):
        where = f"{MODULES[name].relative_to(ROOT)}:{line}"
        # Lazy imports of numpy or torch inside the in-place kernels are how the core
        # serves those arrays; at import time, none is allowed.
        if level:
            assert target.split(".")[0] not in FRAMEWORKS, f"{where} imports {target}"


def test_the_package_root_holds_no_tool() -> None:
    root = SOURCES["portable_siglip"]
    for former in FORMER_TOOLS:
        assert not (root / f"{former}.py").exists(), f"{former}.py belongs in portable_siglip/cli/"
    named_as_tools = [
        name
        for name in MODULES
        if name.startswith("portable_siglip.")
        and any(word in name.rpartition(".")[2] for word in TOOL_WORDS)
    ]
    assert "portable_siglip.cli._doctor" in named_as_tools  # the word test sees the tools
    misplaced = [name for name in named_as_tools if is_core(name)]
    assert not misplaced, f"tools outside portable_siglip/cli/ and bench/: {misplaced}"


@pytest.mark.parametrize("name", sorted(BRIDGE_IMPORTS))
def test_each_bridge_imports_only_its_own_library(name: str) -> None:
    allowed = BRIDGE_IMPORTS[name]
    for target, line, level in imports(name):
        root = target.split(".")[0]
        if level and root in FRAMEWORKS:
            where = f"{MODULES[name].relative_to(ROOT)}:{line}"
            assert root in allowed, f"{where} imports {target}"

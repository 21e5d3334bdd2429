"""The layout the design fixes: small modules, one-way data flow (store/ never imports
pipeline/), no import cycles, and dvc code deps that cover every module a stage runs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "store")
MAX_LINES = 400
# The experiment config validates every section, the SAE's too, so generate imports the SAE's
# config schema; nothing generate writes depends on it, and a change to it must not regenerate.
# Nor does the comparison of trained runs (sweep_compare) read it.
SAE_SCHEMA = {"pipeline/sae/__init__.py", "pipeline/sae/config.py", "pipeline/sae/activation_fns.py"}
# Likewise every stage imports the features section's schema (pipeline/features/config.py), which
# only the features stage reads.
FEATURES_CONFIG = {"pipeline/features/__init__.py", "pipeline/features/config.py"}
# dvc.yaml stage -> the module the CLI starts it with.
STAGES = {"generate": ("pipeline.generate.stage",), "shuffle": ("store.shuffled_copy", "pipeline.generate.provenance"),
          "train": ("pipeline.train.stage",), "evaluate": ("pipeline.evaluate.stage",),
          "features": ("pipeline.features.stage",), "sweep_compare": ("pipeline.train.compare",)}
NOT_AN_INPUT = {"generate": SAE_SCHEMA, "shuffle": SAE_SCHEMA, "sweep_compare": SAE_SCHEMA}


def project_modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of pipeline/ and store/."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _statements(tree: ast.Module, lazy: bool):
    """The import statements that run: module level, and with `lazy` those in function bodies
    too; never `if TYPE_CHECKING:` blocks."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not lazy:
            continue
        yield node
        todo.extend(ast.iter_child_nodes(node))


def imports_of(path: Path, modules: dict[str, Path], *, lazy: bool = True) -> set[str]:
    """Project modules `path` imports (lazy: in function bodies too), plus the packages Python
    runs on the way (importing a.b.c runs a and a.b first)."""
    found = set()
    for node in _statements(ast.parse(path.read_text()), lazy):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in modules)
    return found


def closure(start: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    return seen


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def test_no_module_is_over_the_size_limit():
    long = {str(path.relative_to(REPO)): n for path in project_modules().values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules (one job each, <= {MAX_LINES} lines): {long}"


def test_store_never_imports_pipeline(graph):
    leaks = {name: sorted(m for m in deps if m.startswith("pipeline")) for name, deps in graph.items()
             if name.startswith("store") and any(m.startswith("pipeline") for m in deps)}
    assert not leaks


def test_there_are_no_import_cycles(graph):
    # cli.py starts each stage by a lazy import; every other edge, lazy or not, points one way
    cycles = [(name, dep) for name, deps in graph.items() for dep in deps if name in closure(dep, graph)]
    assert not cycles


def stage_code_deps() -> dict[str, set[str]]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    deps = {}
    for name in STAGES:
        deps[name] = {dep for dep in stages[name]["deps"] if dep.startswith(PACKAGES) and "$" not in dep}
    return deps


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_code_deps_cover_every_module_the_stage_runs(graph, stage):
    modules = project_modules()
    cli_top_level = imports_of(modules["pipeline.cli"], modules, lazy=False)  # the stages start lazily
    runs = set().union(*(closure(entry, graph) for entry in STAGES[stage]))
    runs |= closure("pipeline.cli", {**graph, "pipeline.cli": cli_top_level})
    files = {str(modules[m].relative_to(REPO)) for m in runs}
    files -= NOT_AN_INPUT.get(stage, set())
    if stage != "features":
        files -= FEATURES_CONFIG
    deps = stage_code_deps()[stage]
    uncovered = sorted(f for f in files if not any(f == dep or f.startswith(dep.rstrip("/") + "/") for dep in deps))
    assert not uncovered, f"dvc.yaml stage {stage!r} runs {uncovered} without depending on them"
    # and no dep on a package the stage never runs: editing it would rerun the stage for nothing
    unused = sorted(dep for dep in deps if not any(f == dep or f.startswith(dep + "/") for f in files))
    assert not unused, f"dvc.yaml stage {stage!r} depends on {unused}, which it never imports"


def test_every_bench_prints_its_host_first():
    """A figure never loses the machine it was measured on: each bench's main() prints the host
    (bench/host.py: CPU model, cores, load average) as its first act after parsing arguments."""
    missing = []
    for script in sorted((REPO / "bench").glob("*.py")):
        tree = ast.parse(script.read_text())
        main = next((node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main"), None)
        if main is None:
            continue
        calls = {node.func.id for node in ast.walk(main) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
        if "print_host" not in calls:
            missing.append(script.name)
    assert not missing, f"bench scripts whose main() never calls print_host(): {missing}"

"""The package's stages import one way: no cycle, no arrow from a lower stage up to a higher one."""

import ast
import graphlib

from tests.conftest import REPO

# Lower stages first; a stage imports only from its own layer and those below it.
LAYERS = ({"core"}, {"imaging", "data", "models"}, {"training", "runtime"}, {"export"},
          {"serving", "demo", "feedback", "insight"}, {"bench"}, {"cli"})
LAYER = {stage: depth for depth, stages in enumerate(LAYERS) for stage in stages}


def toolkit_modules() -> dict[str, ast.Module]:
    modules = {}
    for path in (REPO / "toolkit").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = ast.parse(path.read_text())
    return modules


def imports(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    """module -> the toolkit modules it imports anywhere: at the top, under TYPE_CHECKING or
    inside a function (`from toolkit.x import y` counts as importing toolkit.x.y where that is a module)."""
    graph: dict[str, set[str]] = {}
    for name, tree in modules.items():
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                          for alias in node.names}
        graph[name] = (found & modules.keys()) - {name}
    return graph


def stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYER else None


def test_toolkit_modules_import_each_other_without_a_cycle():
    try:
        graphlib.TopologicalSorter(imports(toolkit_modules())).prepare()
    except graphlib.CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from None


def test_no_stage_imports_from_a_stage_above_it():
    upward = [f"{module} -> {target}" for module, targets in imports(toolkit_modules()).items()
              for target in targets
              if stage(module) and stage(target) and LAYER[stage(target)] > LAYER[stage(module)]]
    assert not upward, upward


def test_no_module_is_longer_than_a_newcomer_reads_at_once():
    long = {path.relative_to(REPO).as_posix(): n for path in (REPO / "toolkit").rglob("*.py")
            if (n := len(path.read_text().splitlines())) > 450}
    assert not long, long

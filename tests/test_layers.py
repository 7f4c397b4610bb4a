"""The three layers and their one-way imports: regmix (core) <- components (KFP ops) <- pipelines.

Read from the sources (no imports run): every `import` and `from ... import` of a project
module, at module level or inside a function, is an edge of the module graph.
"""

import ast
from pathlib import Path

import pytest

from regmix.regression.pyfunc import PREDICTOR_MODULES

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"regmix": ROOT / "regmix", "regmix.components": ROOT / "components",
          "regmix.pipelines": ROOT / "pipelines"}
MAX_CORE_LINES = 500


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in LAYERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


MODULES = modules()


def is_op(node: ast.AST) -> bool:
    """A KFP op: KFP ships only its source to the pod, so it imports inside its body."""
    return isinstance(node, ast.FunctionDef) and any(
        isinstance(d, ast.Name) and d.id == "component" for d in node.decorator_list)


def imports(name: str) -> list[tuple[str, bool, bool]]:
    """(imported module, inside a function, inside an op) for each import in module `name`."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []

    def visit(node: ast.AST, in_function: bool, in_op: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function, in_op) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - child.level + 1]
                    base = ".".join([*anchor, *([child.module] if child.module else [])])
                # `from package import module` imports the module
                found.extend((f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base,
                              in_function, in_op) for a in child.names)
            function = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            visit(child, in_function or function, in_op or is_op(child))

    visit(ast.parse(path.read_text()), False, False)
    return found


def project_imports(name: str) -> set[str]:
    return {imported for imported, _, _ in imports(name) if imported in MODULES}


def layer(name: str) -> str:
    return next(p for p in ("regmix.components", "regmix.pipelines", "regmix")
                if name == p or name.startswith(p + "."))


def test_no_import_cycles():
    graph = {name: project_imports(name) - {name} for name in MODULES}
    # A package's __init__ is imported on the way to its modules: not an edge back
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_one_way(name):
    """The core never imports kfp or the layers above it; components never import pipelines."""
    own = layer(name)
    for imported, _, _ in imports(name):
        if own == "regmix":
            assert imported.split(".")[0] != "kfp", f"{name} imports {imported}: the core runs without KFP"
        if imported in MODULES:
            allowed = {"regmix": {"regmix"}, "regmix.components": {"regmix", "regmix.components"},
                       "regmix.pipelines": {"regmix", "regmix.components", "regmix.pipelines"}}[own]
            assert layer(imported) in allowed, f"{name} ({own}) imports {imported} ({layer(imported)})"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_project_modules_are_imported_at_the_top(name):
    """A function-level import is for an optional heavy dependency only; a KFP op's body is
    the exception, since KFP ships only its source to the pod."""
    late = [imported for imported, in_function, in_op in imports(name)
            if in_function and not in_op and (imported in MODULES or imported.startswith("regmix"))]
    assert late == [], f"{name} imports {late} inside a function"


def test_a_logged_models_code_is_self_contained():
    """The predictor's modules travel with a logged model under another package name: they
    import one another relatively and nothing else of the project, and neither kfp nor optuna."""
    package = "regmix.regression"
    for file in PREDICTOR_MODULES:
        name = package if file == "__init__.py" else f"{package}.{file[:-3]}"
        source = MODULES[name].read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith("regmix"), f"{name}: {node.module}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert not any((n or "").split(".")[0] in {"kfp", "optuna"} for n in names), name


@pytest.mark.parametrize("name", sorted(n for n in MODULES if layer(n) == "regmix"))
def test_core_modules_fit_in_a_readers_mind(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_CORE_LINES, f"{name} has {lines} lines: split it by job"

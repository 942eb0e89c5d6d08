"""The house rules on imports, checked on the source (fast, no server, nothing imported).

Layers, going down: ``bench/`` (and the ``deploy/`` scripts) -> the CLI (``stagebatch/``) -> ``tuning/``
-> ``loadtest/`` -> ``slicing/`` -> ``core/`` -> ``backends/``. A module may import its own layer and
the layers below it, never one above; modules never import each other in a loop (imports under
``if TYPE_CHECKING:`` count too); ``backends/`` runs inside Triton and imports only the standard
library, numpy, onnxruntime, ``triton_python_backend_utils`` and itself; the project's own modules
are imported at the top of a module, never inside a function; no package imports ``tests/``.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# bottom to top; a module's layer is its index here
LAYERS: tuple[tuple[str, ...], ...] = (
    ("backends",),
    ("core",),
    ("slicing",),
    ("loadtest",),
    ("tuning",),
    ("stagebatch",),
    ("bench", "deploy"),
)
PACKAGES = tuple(top for layer in LAYERS for top in layer)
OWN_TOPS = set(PACKAGES) | {"tests"}
BACKENDS_MAY_IMPORT = {"numpy", "onnxruntime", "triton_python_backend_utils", "backends"}
# loops known when this test was written, each to be broken by its owner; an entry that no longer
# loops fails the test, so delete it then
KNOWN_LOOPS: list[list[str]] = []


@dataclass(frozen=True)
class Import:
    """One import statement's target, resolved to the longest module of the project it names."""

    source: str
    target: str
    line: int
    in_function: bool


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    return next(index for index, tops in enumerate(LAYERS) if top in tops)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def project_modules() -> dict[str, Path]:
    """Every module of the layered packages (``deploy/`` holds scripts, named like modules)."""
    modules = {}
    for top in PACKAGES:
        for path in sorted((ROOT / top).rglob("*.py")):
            if not any(part.startswith(".") or part == "__pycache__" for part in path.parts):
                modules[module_name(path)] = path
    return modules


def resolve(name: str, modules: dict[str, Path]) -> str:
    """The longest prefix of a dotted name that is a module of the project (else its top package)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return parts[0]


def imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dotted names one import statement loads (``from a import b`` loads ``a.b`` when it is a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]


def walk_imports(tree: ast.AST) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement with whether it lies inside a function body."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


@cache
def all_imports() -> tuple[Import, ...]:
    """The imports of every project module, resolved; third-party imports keep their top name."""
    modules = project_modules()
    result = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, in_function in walk_imports(tree):
            names = imported_names(node, module, path.name == "__init__.py")
            if isinstance(node, ast.ImportFrom):
                # ``from a import b``: a, plus a.b only where that is a module of its own
                names = [names[0]] + [name for name in names[1:] if name in modules]
            for name in names:
                if not name:
                    continue
                top = name.split(".")[0]
                target = resolve(name, modules) if top in OWN_TOPS else top
                if target != module:
                    result.append(Import(module, target, node.lineno, in_function))
    return tuple(result)


def where(item: Import) -> str:
    return f"{project_modules()[item.source].relative_to(ROOT)}:{item.line} imports {item.target}"


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return components


def test_layers_import_only_downwards_when_reading_every_module() -> None:
    upward = [
        where(item)
        for item in all_imports()
        if item.target.split(".")[0] in PACKAGES and layer_of(item.target) > layer_of(item.source)
    ]
    assert upward == [], "a module imports a higher layer:\n" + "\n".join(upward)


def test_modules_import_no_loops_when_type_only_imports_count() -> None:
    modules = project_modules()
    edges: dict[str, set[str]] = {module: set() for module in modules}
    for item in all_imports():
        if item.target in modules:
            edges[item.source].add(item.target)
    loops = import_cycles(edges)
    assert [loop for loop in loops if loop not in KNOWN_LOOPS] == []
    assert [loop for loop in KNOWN_LOOPS if loop not in loops] == [], "no longer loops: delete from KNOWN_LOOPS"


def test_packages_import_no_tests_when_reading_every_module() -> None:
    into_tests = [where(item) for item in all_imports() if item.target.split(".")[0] == "tests"]
    assert into_tests == [], "tests/ helpers used by a package belong in the package:\n" + "\n".join(into_tests)


def test_backends_import_only_what_triton_has_when_copied_into_a_model_folder() -> None:
    allowed = BACKENDS_MAY_IMPORT | set(sys.stdlib_module_names) | {"__future__"}
    foreign = [
        where(item)
        for item in all_imports()
        if layer_of(item.source) == 0 and item.target.split(".")[0] not in allowed
    ]
    assert foreign == [], "backends/ runs inside Triton:\n" + "\n".join(foreign)


def test_own_modules_are_imported_at_module_top_when_inside_a_function() -> None:
    local = [
        where(item)
        for item in all_imports()
        if item.in_function and item.target.split(".")[0] in OWN_TOPS
    ]
    assert local == [], "move these imports to the top of the module:\n" + "\n".join(local)


def test_own_modules_are_imported_by_statements_when_loaded_by_name() -> None:
    """``__import__("loadtest...")`` or ``importlib.import_module`` would hide an edge from the checks above."""
    hidden = []
    for module, path in project_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
                continue
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
            argument = node.args[0].value
            if name in ("__import__", "import_module") and isinstance(argument, str):
                if argument.split(".")[0] in OWN_TOPS:
                    hidden.append(f"{path.relative_to(ROOT)}:{node.lineno} loads {argument}")
    assert hidden == []


def test_import_checks_see_a_loop_when_two_modules_import_each_other() -> None:
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_import_checks_resolve_relative_imports_when_inside_a_package() -> None:
    node = ast.parse("from ..common import ort").body[0]
    assert imported_names(node, "backends.reorch.model", is_package=False)[0] == "backends.common"
    node = ast.parse("from .sections import SECTIONS").body[0]
    assert imported_names(node, "loadtest.report", is_package=True)[0] == "loadtest.report.sections"

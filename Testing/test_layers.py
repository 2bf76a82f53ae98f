"""The library's layers, checked statically: lower layers never import higher ones, no import cycles.

Layers (DESIGN.md, docs/ARCHITECTURE.md): ``core`` (and the package's ``__init__``) 0 < ``io`` 1 < ``models`` 2 <
``stages`` 3 < ``outputs`` 4 < ``app`` = ``research`` 5 (siblings that never import each other) < ``cli`` 6.
Every ``import``/``from ... import`` anywhere in a file counts, inside functions too (a lazy import still
couples the modules), and so do ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name.
Relative imports are resolved; ``from X import Y`` counts as an import of module ``X.Y`` when that is a module.

The checker works on any folder (``check_package``), so the self-tests below plant violations in a synthetic
package and show that each kind is found.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "VertebralFractureLib"

#: subpackage (or top-level module) -> layer; a new top-level module or subpackage must be placed here
LAYERS: dict[str, int] = {"core": 0, "io": 1, "models": 2, "stages": 3, "outputs": 4, "app": 5, "research": 5, "cli": 6}
#: pairs of the same layer that must not import each other (in either direction)
SIBLINGS: set[frozenset[str]] = {frozenset({"app", "research"})}


@dataclass(frozen=True)
class Import:
    """One import statement: the importing module, where it is, what it says and the module it resolves to."""

    module: str
    path: str
    line: int
    text: str
    target: str

    def where(self) -> str:
        return f"{self.path}:{self.line}: `{self.text}`"


def module_names(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file for every .py under ``root / package`` (``pkg/__init__.py`` is ``pkg``)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def layer_key(module: str, package: str = PACKAGE) -> str | None:
    """The key of ``module`` in :data:`LAYERS` (``""`` for the package itself), or None outside the package."""
    parts = module.split(".")
    if parts[0] != package:
        return None
    return parts[1] if len(parts) > 1 else ""


def layer_of(module: str, package: str = PACKAGE) -> int | None:
    """Layer number of a module of the package; None when it lies in no known layer."""
    key = layer_key(module, package)
    if key == "":
        return 0  # the package's __init__ (version string only) sits with the core
    return LAYERS.get(key) if key is not None else None


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """Absolute name of the module a ``from ... import`` names (before ``Y`` is considered)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _literal_dynamic_import(node: ast.Call) -> str | None:
    """The literal module name of ``importlib.import_module("x")`` or ``__import__("x")``, else None."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def imports_in(source: str, module: str, path: str, known: set[str], *, is_package: bool = False,
               package: str = PACKAGE) -> list[Import]:
    """Every import of a module of ``package`` in ``source`` (anywhere in the file), resolved to a module name.

    ``known`` is the set of the package's module names: ``from X import Y`` resolves to ``X.Y`` when that is
    one of them (a submodule), else to ``X``.
    """
    found: list[Import] = []
    lines = source.splitlines()

    def text(node: ast.AST) -> str:
        return " ".join(part.strip() for part in lines[node.lineno - 1 : node.end_lineno])

    for node in ast.walk(ast.parse(source, filename=path)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif isinstance(node, ast.Call):
            name = _literal_dynamic_import(node)
            targets = [name] if name else []
        for target in dict.fromkeys(targets):  # one entry per module, in order
            if target == package or target.startswith(package + "."):
                found.append(Import(module, path, node.lineno, text(node), target))
    return sorted(found, key=lambda i: (i.line, i.target))


def _owner(target: str, known: set[str]) -> str:
    """The longest known module that ``target`` names or lies in (an attribute path or a missing module)."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in known:
            return ".".join(parts[:n])
    return target


def _layer_text(module: str, package: str) -> str:
    key = layer_key(module, package)
    return f"{key or package + '/__init__'} (layer {layer_of(module, package)})"


def layer_violations(imports: list[Import], package: str = PACKAGE) -> list[str]:
    """Messages for imports of a higher layer, between sibling layers, or of/by a module in no known layer."""
    out = []
    for imp in imports:
        src, dst = layer_of(imp.module, package), layer_of(imp.target, package)
        src_key, dst_key = layer_key(imp.module, package), layer_key(imp.target, package)
        if dst is None:
            out.append(f"{imp.where()} imports {imp.target}, which lies in no known layer ({sorted(LAYERS)})")
        elif src is not None and dst > src:
            out.append(f"{imp.where()} imports {_layer_text(imp.target, package)} from "
                       f"{_layer_text(imp.module, package)}: a lower layer never imports a higher one, not even "
                       "inside a function; move the shared code down or pass it in")
        elif frozenset({src_key, dst_key}) in SIBLINGS:
            out.append(f"{imp.where()} imports {dst_key} from {src_key}: these sibling layers never import each "
                       "other; move the shared code to a lower layer")
    return out


def unplaced_modules(modules: dict[str, Path], root: Path, package: str = PACKAGE) -> list[str]:
    """Messages for library files in no known layer (a new subpackage or top-level module must be placed)."""
    return [f"{path.relative_to(root)}: module {name} lies in no known layer; place it in a layer "
            f"({', '.join(LAYERS)}) or add its folder to LAYERS in Testing/test_layers.py"
            for name, path in modules.items() if layer_of(name, package) is None]


def import_cycles(imports: list[Import], known: set[str]) -> list[list[str]]:
    """One cycle path (first module repeated at the end) per strongly connected group of modules."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        dst = _owner(imp.target, known)
        if dst != imp.module and dst in known:
            graph.setdefault(imp.module, set()).add(dst)
    # Tarjan's strongly connected components, iterative (no recursion limit on a long chain)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.add(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(group)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return [_cycle_path(group, graph) for group in groups]


def _cycle_path(group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the group's first module (breadth-first inside the group)."""
    start = min(group)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph.get(node, ()) & group):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child not in previous:
                    previous[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(group)}")  # a strongly connected group has one


def check_package(root: Path, package: str = PACKAGE) -> list[str]:
    """Every layering problem of ``root / package`` as a readable message (empty when the layering holds)."""
    modules = module_names(root, package)
    known = set(modules)
    imports = []
    for name, path in modules.items():
        rel = str(path.relative_to(root))
        imports += imports_in(path.read_text(encoding="utf-8"), name, rel, known,
                              is_package=path.name == "__init__.py", package=package)
    problems = unplaced_modules(modules, root, package) + layer_violations(imports, package)
    for cycle in import_cycles(imports, known):
        lines = [f"  {imp.where()}" for a, b in zip(cycle, cycle[1:], strict=False)
                 for imp in imports if imp.module == a and _owner(imp.target, known) == b]
        problems.append("import cycle " + " -> ".join(cycle) + "; the imports:\n" + "\n".join(lines))
    return problems


# --- the real library -------------------------------------------------------------------------
def test_library_layers_hold():
    problems = check_package(REPO)
    assert not problems, f"{len(problems)} layering problem(s) in {PACKAGE}:\n" + "\n".join(problems)


def test_every_library_file_is_seen():
    """The walk finds the known layers' modules (a path mistake would make the check above vacuous)."""
    modules = module_names(REPO)
    assert {"VertebralFractureLib", "VertebralFractureLib.cli", "VertebralFractureLib.core.volume",
            "VertebralFractureLib.app.pipeline", "VertebralFractureLib.stages.segmentation.instances"} <= set(modules)
    assert len(modules) == len(list((REPO / PACKAGE).rglob("*.py")))


# --- self-tests of the checker on a planted package ----------------------------------------------
def _plant(root: Path, files: dict[str, str]) -> Path:
    for rel, source in {"VertebralFractureLib/__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(root).parents:  # every folder a package
            if str(parent) != "." and not (root / parent / "__init__.py").exists():
                (root / parent / "__init__.py").write_text("")
        path.write_text(source)
    return root


def test_checker_accepts_a_clean_package(tmp_path):
    root = _plant(tmp_path, {
        "VertebralFractureLib/core/errors.py": "class InputError(ValueError): ...\n",
        "VertebralFractureLib/stages/a.py": "from VertebralFractureLib.core.errors import InputError\n",
        "VertebralFractureLib/app/p.py": "def f():\n    from VertebralFractureLib.stages import a\n",
        "VertebralFractureLib/cli.py": "from VertebralFractureLib.app.p import f\n"
                                       "from VertebralFractureLib import core\n",
    })
    assert check_package(root) == []


@pytest.mark.parametrize("source", [
    "from VertebralFractureLib.stages.a import g\n",  # module level
    "def f():\n    from VertebralFractureLib.stages.a import g\n",  # inside a function
    "import VertebralFractureLib.stages.a\n",
    "from VertebralFractureLib.stages import a\n",  # Y is a submodule
    "from ..stages import a\n",  # relative
    "import importlib\nimportlib.import_module('VertebralFractureLib.stages.a')\n",
    "class K:\n    def m(self):\n        if True:\n            from VertebralFractureLib.cli import main\n",
])
def test_checker_finds_a_planted_upward_import(tmp_path, source):
    root = _plant(tmp_path, {"VertebralFractureLib/core/volume.py": source,
                             "VertebralFractureLib/stages/a.py": "g = 1\n"})
    problems = check_package(root)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{Path('VertebralFractureLib/core/volume.py')}:"), problems
    assert "from core (layer 0)" in problems[0] and "a lower layer never imports a higher one" in problems[0]


@pytest.mark.parametrize(("src", "dst"), [("app", "research"), ("research", "app")])
def test_checker_finds_sibling_imports(tmp_path, src, dst):
    root = _plant(tmp_path, {f"VertebralFractureLib/{src}/x.py": f"from VertebralFractureLib.{dst}.y import z\n",
                             f"VertebralFractureLib/{dst}/y.py": "z = 1\n"})
    problems = check_package(root)
    assert len(problems) == 1 and f"imports {dst} from {src}" in problems[0], problems


def test_checker_reports_a_planted_cycle_with_its_path(tmp_path):
    root = _plant(tmp_path, {
        "VertebralFractureLib/io/dicom.py": "from VertebralFractureLib.io.validation import check\n",
        "VertebralFractureLib/io/validation.py": "def check():\n    from VertebralFractureLib.io import volume_files\n",
        "VertebralFractureLib/io/volume_files.py": "from .dicom import x\n",
        "VertebralFractureLib/io/reading.py": "from VertebralFractureLib.io.dicom import x\n",  # into it, not on it
    })
    problems = check_package(root)
    assert len(problems) == 1, problems
    head = problems[0].splitlines()[0]
    assert head == ("import cycle VertebralFractureLib.io.dicom -> VertebralFractureLib.io.validation -> "
                    "VertebralFractureLib.io.volume_files -> VertebralFractureLib.io.dicom; the imports:")
    assert f"{Path('VertebralFractureLib/io/volume_files.py')}:1: `from .dicom import x`" in problems[0]


def test_checker_finds_unplaced_modules_and_imports_of_them(tmp_path):
    root = _plant(tmp_path, {"VertebralFractureLib/helpers.py": "x = 1\n",
                             "VertebralFractureLib/core/a.py": "from VertebralFractureLib.helpers import x\n"})
    problems = check_package(root)
    assert len(problems) == 2, problems
    assert "module VertebralFractureLib.helpers lies in no known layer" in problems[0]
    assert "imports VertebralFractureLib.helpers, which lies in no known layer" in problems[1]


def test_models_is_layer_two_whether_or_not_it_exists_yet(tmp_path):
    root = _plant(tmp_path, {"VertebralFractureLib/io/r.py": "from VertebralFractureLib.models.card import load\n",
                             "VertebralFractureLib/stages/s.py": "from VertebralFractureLib.models.card import load\n"})
    problems = check_package(root)
    assert len(problems) == 1 and "imports models (layer 2) from io (layer 1)" in problems[0], problems

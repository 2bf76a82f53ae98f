"""Static checks of the Slicer extension: build lists, .ui bindings, lazy imports, requirements.

The Slicer desktop application (Qt widgets, ``slicer.app``, the Segment Editor) cannot run in this
test environment, so the widget is checked statically here; the library code under it is exercised
for real in ``test_slicer_logic.py`` and ``test_mrml_nodes.py`` (on the ``slicer-core`` wheel), and the
module's own self-test (``VertebralFractureTest``, which covers the Logic, not the widget) runs inside
Slicer (``Reload and Test``, or ``ctest`` in an extension build).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "VertebralFracture"
MODULE_FILE = MODULE_DIR / "VertebralFracture.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "VertebralFracture.ui"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"

# Modules Slicer's Python always has: the standard library plus Slicer's own bindings.
SLICER_PROVIDED = {"qt", "ctk", "vtk", "slicer", "__future__"}


def _cmake_list(text: str, variable: str) -> list[str]:
    """Items of ``set(<variable> ...)`` in a CMakeLists (comments removed)."""
    text = re.sub(r"#[^\n]*", "", text)
    match = re.search(rf"set\(\s*{variable}\s+(.*?)\)", text, re.S)
    assert match, f"set({variable} ...) not found in {MODULE_CMAKE}"
    return match.group(1).split()


def _module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(), filename=str(MODULE_FILE))


def _ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def test_every_python_file_is_listed_in_the_module_cmakelists():
    text = MODULE_CMAKE.read_text()
    module_scripts = {s.replace("${MODULE_NAME}", "VertebralFracture") for s in _cmake_list(text, "MODULE_PYTHON_SCRIPTS")}
    lib_scripts = set(_cmake_list(text, "LIB_PYTHON_SCRIPTS"))
    on_disk_module = {p.relative_to(MODULE_DIR).as_posix() for p in MODULE_DIR.rglob("*.py") if "__pycache__" not in p.parts}
    on_disk_lib = {p.relative_to(REPO).as_posix() for p in (REPO / "VertebralFractureLib").rglob("*.py") if "__pycache__" not in p.parts}
    missing = sorted(on_disk_module - module_scripts) + sorted(on_disk_lib - lib_scripts)
    assert not missing, (
        "Python files not listed in VertebralFracture/CMakeLists.txt (add them to MODULE_PYTHON_SCRIPTS or "
        "LIB_PYTHON_SCRIPTS, or the Slicer extension build will not ship them): " + ", ".join(missing)
    )
    # slicerMacroBuildScriptedModule / ctkMacroCompilePythonScript fail on listed files that do not exist
    stale = sorted(s for s in module_scripts if not (MODULE_DIR / s).is_file()) + sorted(
        s for s in lib_scripts if not (REPO / s).is_file()
    )
    assert not stale, "listed in VertebralFracture/CMakeLists.txt but missing on disk: " + ", ".join(stale)


def test_module_resources_listed_in_cmake_exist():
    resources = _cmake_list(MODULE_CMAKE.read_text(), "MODULE_PYTHON_RESOURCES")
    resources = [r.replace("${MODULE_NAME}", "VertebralFracture") for r in resources]
    assert "Resources/UI/VertebralFracture.ui" in resources
    assert "Resources/Icons/VertebralFracture.png" in resources
    for r in resources:
        assert (MODULE_DIR / r).is_file(), r
    icon = (MODULE_DIR / "Resources/Icons/VertebralFracture.png").read_bytes()
    assert icon[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(icon[16:20], "big"), int.from_bytes(icon[20:24], "big")
    assert (width, height) == (128, 128)


def test_extension_cmakelists_follows_the_slicer_convention():
    text = (REPO / "CMakeLists.txt").read_text()
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                     "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf"set\({variable}\s+\S", text), variable
    assert "project(VertebralFracture)" in text
    assert "find_package(Slicer REQUIRED)" in text and "include(${Slicer_USE_FILE})" in text
    assert "add_subdirectory(VertebralFracture)" in text
    assert "include(${Slicer_EXTENSION_GENERATE_CONFIG})" in text and "include(${Slicer_EXTENSION_CPACK})" in text
    module = MODULE_CMAKE.read_text()
    assert "slicerMacroBuildScriptedModule(" in module and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module


def test_every_ui_attribute_used_by_the_module_exists_in_the_ui_file():
    used = {
        node.attr
        for node in ast.walk(_module_tree())
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "ui"
        and isinstance(node.value.value, ast.Name)
        and node.value.value.id == "self"
    }
    assert used, "the widget uses no self.ui.<name>: did the parsing break?"
    missing = sorted(used - set(_ui_widgets()))
    assert not missing, f"self.ui.<name> used in VertebralFracture.py but absent from {UI_FILE.name}: {missing}"


def _parameter_fields() -> dict[str, str]:
    for node in _module_tree().body:
        if isinstance(node, ast.ClassDef) and any(
            isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in node.decorator_list
        ):
            return {s.target.id: ast.unparse(s.annotation) for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in VertebralFracture.py")


def test_parameter_node_fields_are_bound_to_the_ui():
    fields = _parameter_fields()
    bound: dict[str, str] = {}
    for name, widget in _ui_widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = name
                assert prop.get("stdset") == "0", f"{name}: SlicerParameterName must be a dynamic property"
    assert set(bound) == set(fields), (
        f"unbound parameters: {sorted(set(fields) - set(bound))}; unknown parameters in the .ui: {sorted(set(bound) - set(fields))}"
    )
    # the bound widget class must suit the field type (what parameterNodeWrapper can connect)
    suits = {"bool": {"QCheckBox"}, "Path": {"ctkPathLineEdit", "ctkDirectoryButton"}, "int": {"QSpinBox", "QSlider"},
             "str": {"QComboBox", "QLineEdit"}, "vtkMRML": {"qMRMLNodeComboBox"}}
    widgets = _ui_widgets()
    for field, annotation in fields.items():
        cls = widgets[bound[field]].get("class")
        kind = next(k for k in ("vtkMRML", "Path", "bool", "int", "str") if k in annotation)
        assert cls in suits[kind], f"{field}: {annotation} bound to a {cls}"


def test_ui_mrml_widgets_receive_the_scene():
    root = ET.parse(UI_FILE).getroot()
    receivers = {c.findtext("receiver") for c in root.iter("connection") if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    mrml_widgets = {w.get("name") for w in root.iter("widget") if w.get("class", "").startswith("qMRML") and w.get("class") != "qMRMLWidget"}
    assert mrml_widgets <= receivers, f"MRML widgets without the scene connection: {sorted(mrml_widgets - receivers)}"


def test_module_file_imports_nothing_heavy_at_top_level():
    stdlib = set(sys.stdlib_module_names)
    top = []
    for node in _module_tree().body:
        if isinstance(node, ast.Import):
            top += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            top.append((node.module or "").split(".")[0])
    heavy = sorted({m for m in top if m not in stdlib and m not in SLICER_PROVIDED})
    assert not heavy, f"VertebralFracture.py imports {heavy} at top level; import them inside the methods that need them"


def test_module_defines_the_scripted_module_classes():
    classes = {node.name: [ast.unparse(b) for b in node.bases] for node in _module_tree().body if isinstance(node, ast.ClassDef)}
    assert "ScriptedLoadableModule" in classes["VertebralFracture"]
    assert "ScriptedLoadableModuleWidget" in classes["VertebralFractureWidget"]
    assert "ScriptedLoadableModuleLogic" in classes["VertebralFractureLogic"]
    assert "ScriptedLoadableModuleTest" in classes["VertebralFractureTest"]
    logic = next(n for n in _module_tree().body if isinstance(n, ast.ClassDef) and n.name == "VertebralFractureLogic")
    methods = {f.name for f in logic.body if isinstance(f, ast.FunctionDef)}
    assert {"process", "recompute", "renameLevel", "runBatch", "openCase", "ensureDependencies"} <= methods


def _library_imports() -> list[ast.ImportFrom]:
    """Every ``from VertebralFractureLib... import ...`` in the module file (they sit inside methods)."""
    return [
        node
        for node in ast.walk(_module_tree())
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "VertebralFractureLib"
    ]


def test_module_logic_calls_existing_library_functions():
    """Every library name the module imports, and every ``<module>.<name>`` it calls on an imported library
    module, exists (the module itself cannot be imported here: it needs Slicer's Qt)."""
    imports = _library_imports()
    assert {"VertebralFractureLib.app"} <= {node.module for node in imports}, "the module no longer imports the app layer?"
    modules: dict[str, object] = {}
    missing = []
    for node in imports:
        package = importlib.import_module(node.module)
        for alias in node.names:
            value = getattr(package, alias.name, None)
            if value is None:
                try:  # a submodule: ``from VertebralFractureLib.app import slicer_logic``
                    value = importlib.import_module(f"{node.module}.{alias.name}")
                except ModuleNotFoundError:
                    missing.append(f"{node.module}.{alias.name}")
                    continue
            if inspect.ismodule(value):
                modules[alias.asname or alias.name] = value
    assert {"slicer_logic", "mrml_nodes"} <= set(modules), f"library modules used by the module: {sorted(modules)}"
    for node in ast.walk(_module_tree()):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            if not hasattr(modules[node.value.id], node.attr):
                missing.append(f"{modules[node.value.id].__name__}.{node.attr}")
    assert not missing, f"VertebralFracture.py uses {sorted(set(missing))}, which do not exist"


def test_requirements_match_pyproject_dependencies():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    requirements = {}
    for line in (REPO / "Resources" / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            requirements[req.name.lower()] = req
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    # bundled with Slicer (replacing them breaks it) or installed through the PyTorch extension
    provided = {"numpy", "simpleitk", "torch", "vtk"}
    for line in project:
        req = Requirement(line)
        name = req.name.lower()
        if name in provided:
            assert name not in requirements, f"{name} must not be pip-installed into Slicer"
            continue
        assert name in requirements, f"{name} is a dependency in pyproject.toml but not in Resources/requirements.txt"
        assert requirements[name].specifier == req.specifier, f"{name}: {requirements[name]} vs pyproject {req}"


# --- the module does not freeze Slicer, installs with pip_ensure, reloads its library, translates -------------
def _class_node(name: str) -> ast.ClassDef:
    return next(n for n in _module_tree().body if isinstance(n, ast.ClassDef) and n.name == name)


def _method(class_name: str, method: str) -> ast.FunctionDef:
    return next(f for f in _class_node(class_name).body if isinstance(f, ast.FunctionDef) and f.name == method)


def _calls(tree: ast.AST) -> list[str]:
    return [ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)]


def test_long_work_runs_in_a_background_job_polled_by_a_timer():
    source = MODULE_FILE.read_text()
    assert "processEvents" not in source, "pumping Qt events from the pipeline is not a substitute for a worker thread"
    for handler, job in (("onApplyButton", "processJob"), ("onRecomputeButton", "recomputeJob"),
                         ("onRunBatchButton", "batchJob")):
        calls = _calls(_method("VertebralFractureWidget", handler))
        assert f"self.logic.{job}" in calls and "self._startJob" in calls, handler
        assert not {"self.logic.process", "self.logic.recompute", "self.logic.runBatch"} & set(calls), handler
    start = _calls(_method("VertebralFractureWidget", "_startJob"))
    assert "qt.QTimer" in start and "job.start" in start
    poll = ast.unparse(_method("VertebralFractureWidget", "_pollJob"))
    # results reach the scene from the timer's (main) thread: the job returns arrays, apply writes nodes
    assert "self._job.poll()" in poll and "self._applyResult(event.value)" in poll
    assert "self._job.cancel" in _calls(_method("VertebralFractureWidget", "onCancelButton"))
    for job in ("_analysisJob", "batchJob"):
        assert "BackgroundJob" in _calls(_method("VertebralFractureLogic", job))
    # MRML is read before the job starts (main thread), never inside the worker's lambda
    analysis = _method("VertebralFractureLogic", "_analysisJob")
    worker = next(n for n in ast.walk(analysis) if isinstance(n, ast.Lambda))
    assert "slicer" not in ast.unparse(worker) and "Node" not in ast.unparse(worker)


def test_dependencies_come_from_slicer_packaging_after_the_user_agrees():
    source = MODULE_FILE.read_text()
    assert "pydeps" not in source, "Slicer has no slicer.pydeps module"
    ensure = _method("VertebralFractureLogic", "ensureDependencies")
    text = ast.unparse(ensure)
    assert "from slicer.packaging import load_requirements, pip_ensure" in text
    calls = _calls(ensure)
    assert "pip_ensure" in calls and "load_requirements" in calls and "requirementsPath" in calls
    # the confirmation comes first: the install is inside the branch the user's OK opens
    assert text.index("confirmOkCancelDisplay") < text.rindex("pip_ensure(")


def test_reload_also_reloads_the_library():
    reload = _method("VertebralFractureWidget", "onReload")
    text = ast.unparse(reload)
    assert "sys.modules" in text and "VertebralFractureLib" in text and "ScriptedLoadableModuleWidget.onReload" in text


def test_user_facing_strings_are_translatable():
    source = MODULE_FILE.read_text()
    assert "from slicer.i18n import tr as _" in source and "from slicer.i18n import translate" in source
    module_init = ast.unparse(_method("VertebralFracture", "__init__"))
    for field in ("title", "helpText", "acknowledgementText"):
        assert re.search(rf"self\.parent\.{field} = _\(", module_init), field
    assert "translate('qSlicerAbstractCoreModule', 'Quantification')" in module_init
    # every literal shown in a dialog goes through _()
    dialogs = {"errorDisplay", "warningDisplay", "confirmOkCancelDisplay"}
    for node in ast.walk(_module_tree()):
        if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] in dialogs and node.args:
            first = node.args[0]
            assert not isinstance(first, (ast.Constant, ast.JoinedStr)), f"untranslated text: {ast.unparse(node)}"

"""Static checks of the Slicer extension: what Slicer's build, its module loader and the Extensions Index need.

None of this needs Slicer: the module file is parsed (never imported), the .ui is read as XML, the CMake
lists are compared with the folders on disk and the catalog metadata with the Extensions Index rules.

When ``test_library_cmake_lists_every_file`` fails because files were added to ``DeepSalRegLib/``, rewrite
the list with ``python3 Testing/test_slicer_static.py --write-library-cmake``.
"""
from __future__ import annotations

import ast
import json
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "DeepSalReg"
MODULE_FILE = MODULE_DIR / "DeepSalReg.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "DeepSalReg.ui"
BATCH_SCRIPT = MODULE_DIR / "Resources" / "batch_register.py"
LIBRARY_DIR = REPO / "DeepSalRegLib"
CATALOG_FILE = REPO / "DeepSalReg.json"

# What a Slicer module file may import at file scope besides the standard library (Extensions Index review
# rule: Slicer loads every module at startup, a missing third-party package would break the whole module).
FILE_SCOPE_ALLOWED = {"vtk", "qt", "ctk", "slicer", "numpy", "__main__"}
# Categories the Extensions Index accepts for extensions that are not part of a suite.
ACCEPTED_CATEGORIES = {
    "Analysis", "Converters", "DICOM", "Developer Tools", "Diffusion", "Examples", "Exporter", "Filtering",
    "IGT", "Informatics", "Neuroimaging", "Nuclear Medicine", "Planning", "Quantification", "Radiotherapy",
    "Registration", "Rendering", "Segmentation", "Sequences", "Shape Analysis", "Simulation", "Tracking",
    "Tractography", "Training", "Ultrasound", "Utilities", "Virtual Reality",
}
CATALOG_SCHEMA_PROPERTIES = {
    "$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies", "dicom_support_rule",
    "build_subdirectory", "enabled", "tier",
}
# Packages Slicer itself provides: the module must never pip-install them.
SLICER_PROVIDED = {"numpy", "simpleitk"}


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def _module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"), filename=str(MODULE_FILE))


def _imported_roots(statement: ast.stmt) -> list[str]:
    roots = []
    for node in ast.walk(statement):
        if isinstance(node, ast.Import):
            roots += [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.append(node.module.split(".")[0])
    return roots


def _file_scope_statements(tree: ast.Module):
    """Statements executed at import: the module body, looking inside top-level if/try blocks."""
    pending = list(tree.body)
    while pending:
        statement = pending.pop(0)
        if isinstance(statement, (ast.If, ast.Try)):
            pending = list(statement.body) + list(getattr(statement, "orelse", [])) + [
                s for handler in getattr(statement, "handlers", []) for s in handler.body
            ] + list(getattr(statement, "finalbody", [])) + pending
            continue
        yield statement


def _file_scope_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {root for s in _file_scope_statements(tree) if isinstance(s, (ast.Import, ast.ImportFrom)) for root in _imported_roots(s)}


def _parameter_node_class(tree: ast.Module) -> ast.ClassDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
            (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list
        ):
            return node
    raise AssertionError("DeepSalReg.py has no @parameterNodeWrapper class")


def _parameter_fields(tree: ast.Module) -> dict[str, str]:
    """Field name -> annotation source of the parameter node class."""
    cls = _parameter_node_class(tree)
    return {
        s.target.id: ast.unparse(s.annotation)
        for s in cls.body
        if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
    }


def _ui_root() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def _ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in _ui_root().iter("widget")}


def _widget_property(widget: ET.Element, name: str):
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            value = prop[0]
            if value.tag == "stringlist":
                return [s.text for s in value.findall("string")]
            return value.text
    return None


def _ui_parameter_bindings() -> dict[str, ET.Element]:
    bindings = {}
    for widget in _ui_root().iter("widget"):
        name = _widget_property(widget, "SlicerParameterName")
        if name is not None:
            assert name not in bindings, f"two widgets bind the parameter {name!r}"
            bindings[name] = widget
    return bindings


def _cmake_text(path: Path) -> str:
    """CMake source without comments (a ``#`` inside a quoted string, e.g. a URL fragment, is kept)."""
    return "\n".join(re.sub(r'^((?:[^"#]|"[^"]*")*)#.*$', r"\1", line) for line in path.read_text(encoding="utf-8").splitlines())


def _cmake_set(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\(\s*{variable}\b(.*?)\)", text, re.S | re.I)
    assert match, f"set({variable} ...) not found"
    return match.group(1).split()


def _cmake_string(text: str, variable: str) -> str:
    match = re.search(rf'set\(\s*{variable}\s+"([^"]*)"\s*\)', text, re.I)
    assert match, f'set({variable} "...") not found'
    return match.group(1)


def _git_ignored(paths: list[Path]) -> set[Path]:
    """Those of ``paths`` that git ignores (empty when git is unavailable)."""
    if not paths:
        return set()
    try:
        result = subprocess.run(["git", "check-ignore", "--stdin"], cwd=REPO, input="\n".join(str(p) for p in paths),
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return set()
    return {Path(line) for line in result.stdout.splitlines() if line.strip()}


def library_files() -> tuple[list[str], list[str]]:
    """``(scripts, resources)`` that ship with ``DeepSalRegLib/``, as paths relative to it (sorted).

    Everything in the folder except caches, hidden files, git-ignored files and the CMakeLists.txt itself.
    """
    files = [
        p for p in LIBRARY_DIR.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and not any(part.startswith(".") for part in p.relative_to(LIBRARY_DIR).parts)
        and p.suffix != ".pyc"
        and p != LIBRARY_DIR / "CMakeLists.txt"
    ]
    ignored = _git_ignored(files)
    relative = sorted(p.relative_to(LIBRARY_DIR).as_posix() for p in files if p not in ignored)
    return [r for r in relative if r.endswith(".py")], [r for r in relative if not r.endswith(".py")]


def library_cmake_text() -> str:
    """The DeepSalRegLib/CMakeLists.txt that lists the folder as it is now."""
    scripts, resources = library_files()
    lines = [
        "#-----------------------------------------------------------------------------",
        "# DeepSalRegLib: the registration library, installed as a package next to the DeepSalReg module",
        "# (lib/Slicer-X.Y/qt-scripted-modules/DeepSalRegLib, as Slicer's own DICOMLib), so that",
        "# `import DeepSalRegLib` works in Slicer and in PythonSlicer child processes.",
        "# Every file must be listed (unlisted files are not packaged); Testing/test_slicer_static.py compares",
        "# this list with the folder. Rewrite it with: python3 Testing/test_slicer_static.py --write-library-cmake",
        "set(MODULE_NAME DeepSalRegLib)",
        "",
        "#-----------------------------------------------------------------------------",
        "set(MODULE_PYTHON_SCRIPTS",
        *[f"  {s}" for s in scripts],
        "  )",
        "",
        "set(MODULE_PYTHON_RESOURCES",
        *[f"  {r}" for r in resources],
        "  )",
        "",
        "#-----------------------------------------------------------------------------",
        "slicerMacroBuildScriptedModule(",
        "  NAME ${MODULE_NAME}",
        "  SCRIPTS ${MODULE_PYTHON_SCRIPTS}",
        "  RESOURCES ${MODULE_PYTHON_RESOURCES}",
        "  WITH_SUBDIR",
        "  )",
    ]
    return "\n".join(lines) + "\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# ---------------------------------------------------------------------------------------------------------
# the module file
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [MODULE_FILE, BATCH_SCRIPT], ids=["module", "batch script"])
def test_slicer_python_files_compile(path):
    compile(path.read_text(encoding="utf-8"), str(path), "exec")


def test_module_file_imports_only_slicer_provided_packages_at_file_scope():
    imported = _file_scope_imports(MODULE_FILE)
    allowed = set(sys.stdlib_module_names) | FILE_SCOPE_ALLOWED
    assert imported - allowed == set(), f"third-party imports at file scope of DeepSalReg.py: {sorted(imported - allowed)}"
    # and the heavy parts come only inside functions
    assert not imported & {"torch", "DeepSalRegLib", "SimpleITK", "PyTorchUtils"}


def test_batch_script_imports_only_the_standard_library_at_file_scope():
    imported = _file_scope_imports(BATCH_SCRIPT)
    assert imported <= set(sys.stdlib_module_names), sorted(imported - set(sys.stdlib_module_names))


def test_module_file_runs_no_code_at_file_scope():
    """Only imports, constants, classes and functions at file scope: no calls, no installs, no downloads."""
    offending = []
    for statement in _file_scope_statements(_module_tree()):
        if isinstance(statement, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)):
            if isinstance(statement, ast.ClassDef):
                offending += [ast.unparse(d) for d in statement.decorator_list if not isinstance(d, ast.Name)]
            continue
        if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
            continue  # docstring
        if isinstance(statement, (ast.Assign, ast.AnnAssign)) and not any(
            isinstance(n, ast.Call) for n in ast.walk(statement)
        ):
            continue
        offending.append(ast.unparse(statement)[:80])
    assert offending == []


def test_module_file_has_module_widget_logic_and_test_classes():
    classes = {n.name: [ast.unparse(b) for b in n.bases] for n in _module_tree().body if isinstance(n, ast.ClassDef)}
    assert "ScriptedLoadableModule" in classes["DeepSalReg"]
    assert "ScriptedLoadableModuleWidget" in classes["DeepSalRegWidget"]
    assert "ScriptedLoadableModuleLogic" in classes["DeepSalRegLogic"]
    assert "ScriptedLoadableModuleTest" in classes["DeepSalRegTest"]
    test_class = next(n for n in _module_tree().body if isinstance(n, ast.ClassDef) and n.name == "DeepSalRegTest")
    assert "runTest" in {f.name for f in test_class.body if isinstance(f, ast.FunctionDef)}


def test_pip_requirements_are_what_the_child_process_needs_and_never_slicer_packages():
    """The module installs only what its child process imports: ``deepsalreg register --no-report
    --progress-lines`` needs neither matplotlib nor tqdm (``test_slicer_logic`` runs it with both blocked);
    torch comes from the PyTorch extension; Slicer's own packages are never reinstalled."""
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]

    def name(requirement: str) -> str:
        return re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0].lower()

    constants = {
        s.targets[0].id: ast.literal_eval(s.value)
        for s in _module_tree().body
        if isinstance(s, ast.Assign) and isinstance(s.targets[0], ast.Name)
    }
    assert constants["PIP_REQUIREMENTS"] == ()
    torch = next(r for r in declared if name(r) == "torch")
    assert "torch" + constants["TORCH_REQUIREMENT"] == torch.replace(" ", "")
    assert not {name(r) for r in constants["PIP_REQUIREMENTS"]} & (SLICER_PROVIDED | {"torch"})


# ---------------------------------------------------------------------------------------------------------
# the .ui file
# ---------------------------------------------------------------------------------------------------------


def test_every_ui_parameter_name_is_a_parameter_node_field():
    fields = _parameter_fields(_module_tree())
    bindings = _ui_parameter_bindings()
    assert set(bindings) - set(fields) == set(), "SlicerParameterName without a parameter-node field"
    # Every field has a widget, except the model, whose list is filled from the models folder at run time.
    assert set(fields) - set(bindings) == {"model"}
    assert "modelComboBox" in _ui_widgets()


def test_ui_widgets_fit_the_parameter_types():
    """The GUI connector Slicer picks depends on widget class and field type; a mismatch fails at connectGui."""
    fields = _parameter_fields(_module_tree())
    for parameter, widget in _ui_parameter_bindings().items():
        annotation = fields[parameter]
        cls = widget.get("class")
        if annotation.startswith("vtkMRML"):
            assert cls == "qMRMLNodeComboBox", parameter
            assert _widget_property(widget, "nodeTypes") == [annotation], parameter
        elif annotation == "bool":
            assert cls in ("QCheckBox", "ctkCheckBox"), parameter
        elif annotation.startswith("Annotated[int") or annotation == "int":
            assert cls in ("QSpinBox", "QSlider"), parameter
        elif annotation in ("Device", "Quality"):  # enums: a combo box filled with the members
            assert cls in ("QComboBox", "ctkComboBox"), parameter
        else:
            raise AssertionError(f"no widget rule for {parameter}: {annotation}")


def test_ui_node_selectors_get_the_scene():
    connected = {
        c.findtext("receiver")
        for c in _ui_root().iter("connection")
        if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)" and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    selectors = {n for n, w in _ui_widgets().items() if w.get("class") == "qMRMLNodeComboBox"}
    assert selectors and selectors <= connected


def test_ui_has_the_widgets_the_issue_asks_for_and_the_code_uses():
    widgets = _ui_widgets()
    used = set(re.findall(r"\bself\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    assert used - set(widgets) == set(), f"DeepSalReg.py uses widgets missing from the .ui: {sorted(used - set(widgets))}"
    for name in ("applyButton", "cancelButton", "progressBar", "statusLabel", "modelComboBox", "deviceComboBox",
                 "clearModelsFolderButton"):
        assert name in widgets
    assert widgets["DeepSalReg"].get("class") == "qMRMLWidget"


# ---------------------------------------------------------------------------------------------------------
# CMake lists
# ---------------------------------------------------------------------------------------------------------


def test_library_cmake_lists_every_file():
    text = _cmake_text(LIBRARY_DIR / "CMakeLists.txt")
    scripts, resources = library_files()
    listed_scripts = _cmake_set(text, "MODULE_PYTHON_SCRIPTS")
    listed_resources = _cmake_set(text, "MODULE_PYTHON_RESOURCES")
    not_listed = sorted(set(scripts + resources) - set(listed_scripts + listed_resources))
    absent = sorted(set(listed_scripts + listed_resources) - set(scripts + resources))
    assert not not_listed and not absent, (
        "DeepSalRegLib/CMakeLists.txt is out of date (unlisted files are not packaged into the extension): "
        f"not listed {not_listed}, listed but not on disk {absent}; "
        "run: python3 Testing/test_slicer_static.py --write-library-cmake"
    )
    assert sorted(listed_scripts) == scripts, "Python files go in MODULE_PYTHON_SCRIPTS"
    assert sorted(listed_resources) == resources, "other files go in MODULE_PYTHON_RESOURCES"
    assert re.search(r"slicerMacroBuildScriptedModule\(.*WITH_SUBDIR.*\)", text, re.S)


def test_module_cmake_lists_every_module_file():
    text = _cmake_text(MODULE_DIR / "CMakeLists.txt")
    name = re.search(r"set\(\s*MODULE_NAME\s+(\w+)\s*\)", text).group(1)
    assert name == "DeepSalReg"
    listed = {f.replace("${MODULE_NAME}", name) for f in _cmake_set(text, "MODULE_PYTHON_SCRIPTS") + _cmake_set(text, "MODULE_PYTHON_RESOURCES")}
    on_disk = {
        p.relative_to(MODULE_DIR).as_posix()
        for p in MODULE_DIR.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.name != "CMakeLists.txt" and "Testing" not in p.relative_to(MODULE_DIR).parts
    }
    assert listed == on_disk
    assert "WITH_GENERIC_TESTS" in text
    assert re.search(r"slicer_add_python_unittest\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py\s*\)", text)


def test_top_level_cmake_builds_both_folders():
    text = _cmake_text(REPO / "CMakeLists.txt")
    subdirectories = re.findall(r"add_subdirectory\(\s*(\w+)\s*\)", text)
    assert subdirectories == ["DeepSalRegLib", "DeepSalReg"]
    for required in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                     "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert required in text


# ---------------------------------------------------------------------------------------------------------
# catalog metadata (Extensions Index rules)
# ---------------------------------------------------------------------------------------------------------


def test_extension_metadata_follows_the_catalog_rules():
    text = _cmake_text(REPO / "CMakeLists.txt")
    project = re.search(r"project\s*\(\s*([^\s\)]+)", text, re.I).group(1)
    catalog = json.loads(CATALOG_FILE.read_text(encoding="utf-8"))

    assert project == CATALOG_FILE.stem == "DeepSalReg"
    assert not project.lower().startswith("slicer")
    assert {"$schema", "category", "scm_url"} <= set(catalog) <= CATALOG_SCHEMA_PROPERTIES
    assert re.fullmatch(r"https://raw\.githubusercontent\.com/Slicer/Slicer/main/Schemas/"
                        r"slicer-extension-catalog-entry-schema-v1\.0\.\d\.json#?", catalog["$schema"])
    assert catalog["category"] == _cmake_string(text, "EXTENSION_CATEGORY") in ACCEPTED_CATEGORIES
    assert catalog["category"] == "Registration"
    scm = re.fullmatch(r"https://github\.com/([\w.-]+)/([\w.-]+?)(\.git)?", catalog["scm_url"])
    assert scm and "slicer" in scm.group(2).lower(), "the repository name must contain 'Slicer'"
    assert catalog.get("scm_revision", "main") == "main"
    assert catalog.get("build_subdirectory", ".") == "."
    assert catalog["build_dependencies"] == _cmake_string(text, "EXTENSION_DEPENDS").split() == ["PyTorch"]

    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION"):
        assert _cmake_string(text, variable).strip()
    # Icon and screenshots: the Index validator downloads them; they must be PNG/JPEG files of this repository.
    icon = re.findall(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', text)
    screenshots = re.findall(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', text)
    assert len(icon) == 1 and len(screenshots) == 1
    raw = f"https://raw.githubusercontent.com/{scm.group(1)}/{scm.group(2)}/main/"
    for url in icon + screenshots[0].split():
        assert url.startswith(raw) and url.lower().endswith((".png", ".jpg", ".jpeg")), url
        assert (REPO / url[len(raw):]).is_file(), f"{url} names a file that is not in the repository"
    assert _png_size(REPO / icon[0][len(raw):]) == (128, 128)


def test_license_is_apache_2():
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_module_icon_is_a_png_where_slicer_looks_for_it():
    assert _png_size(MODULE_DIR / "Resources" / "Icons" / "DeepSalReg.png") == (128, 128)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-library-cmake"]:
        (LIBRARY_DIR / "CMakeLists.txt").write_text(library_cmake_text(), encoding="utf-8")
        print(f"wrote {LIBRARY_DIR / 'CMakeLists.txt'}")
    else:
        print(__doc__)

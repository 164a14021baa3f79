"""dvc.yaml and the layout: each stage depends on the folders of all the code it runs; imports run one way."""

from __future__ import annotations

import ast
import importlib.metadata
import sys
from pathlib import Path

import pytest
import yaml

from skin_lesion.registry.model_contents import ENTRY_FILE, MODEL_PACKAGES, model_code_files
from tests.conftest import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
REGISTRATION = REPO / "skin_lesion" / "registry" / "registration.py"
LIBRARY = sorted((REPO / "skin_lesion").rglob("*.py"))


def _all_imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module)
            # `from skin_lesion import files` imports skin_lesion/files.py (_module_file finds it or not).
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return modules


def _imports(path: Path) -> set[str]:
    """The project modules (stages.*, skin_lesion.*) that a file imports."""
    return {module for module in _all_imports(path) if module.split(".")[0] in ("stages", "skin_lesion")}


def _module_file(module: str) -> Path | None:
    """The file a project module's import runs: `a/b.py` or the package's `a/b/__init__.py`."""
    base = REPO / module.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _code_of(path: Path, seen: set[Path] | None = None) -> set[Path]:
    """`path` and every project file importing it runs, directly or not, package __init__ files included."""
    seen = seen if seen is not None else set()
    seen.add(path)
    for module in _imports(path):
        parts = module.split(".")
        # `import a.b.c` runs a/__init__.py and a/b/__init__.py before a/b/c.py.
        for imported in filter(None, (_module_file(".".join(parts[:n])) for n in range(1, len(parts) + 1))):
            if imported not in seen:
                _code_of(imported, seen)
    return seen


def _dependency(path: Path) -> str:
    """What dvc.yaml lists for a file a stage runs: a subpackage's folder, or the file itself."""
    relative = path.relative_to(REPO)
    if relative.parts[0] == "skin_lesion" and len(relative.parts) > 2:
        return "/".join(relative.parts[:2])
    return relative.as_posix()


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_depends_on_every_folder_it_imports(name: str) -> None:
    stage = STAGES[name]
    module = stage["cmd"].split("-m stages.", 1)[1].split()[0]
    code = _code_of(REPO / "stages" / f"{module}.py") - {REPO / "stages" / "__init__.py"}
    if REGISTRATION in code:
        code |= set(model_code_files())  # the code the model it registers ships, which it copies
    needed = {_dependency(path) for path in code}
    listed = {dep for dep in stage["deps"] if dep.startswith(("stages/", "skin_lesion/"))}
    assert needed - listed == set(), f"{name}: add these to its deps in dvc.yaml"
    assert listed - needed == set(), f"{name}: lists code it doesn't run"


@pytest.mark.parametrize("path", LIBRARY, ids=lambda path: path.relative_to(REPO).as_posix())
def test_library_never_imports_a_stage(path: Path) -> None:
    assert {module for module in _imports(path) if module.split(".")[0] == "stages"} == set()


def test_stages_folder_holds_only_the_dvc_stages() -> None:
    scripts = {path.stem for path in (REPO / "stages").glob("*.py")} - {"__init__"}
    assert scripts == set(STAGES)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_no_stage_runs_code_of_the_app_package(name: str) -> None:
    module = STAGES[name]["cmd"].split("-m stages.", 1)[1].split()[0]
    code = _code_of(REPO / "stages" / f"{module}.py")
    assert {path for path in code if "app" in path.relative_to(REPO).parts} == set()


def test_the_model_ships_exactly_the_code_loading_it_imports() -> None:
    assert _code_of(ENTRY_FILE) == set(model_code_files())


def test_the_model_pins_exactly_the_packages_its_code_imports() -> None:
    tops = {module.split(".")[0] for path in model_code_files() for module in _all_imports(path)}
    third_party = tops - set(sys.stdlib_module_names) - {"skin_lesion", "__future__"}
    # A module may come in several distributions (mlflow in mlflow and mlflow-skinny): one is pinned.
    distributions = importlib.metadata.packages_distributions()
    pinned = {top: {name.lower() for name in distributions[top]} & set(MODEL_PACKAGES) for top in third_party}
    assert all(pinned.values()), pinned
    assert set().union(*pinned.values()) == set(MODEL_PACKAGES)


def test_no_function_of_the_library_or_a_stage_is_longer_than_60_lines() -> None:
    code = [*LIBRARY, *sorted((REPO / "stages").glob("*.py"))]
    long = [
        f"{path.relative_to(REPO)}: {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in code
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 60
    ]
    assert long == []


def test_the_library_imports_absolutely() -> None:
    # The checks above read absolute imports only; a relative one would hide code from them.
    relative = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for path in LIBRARY
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and node.level
    ]
    assert relative == []

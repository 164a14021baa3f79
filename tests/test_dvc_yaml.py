"""dvc.yaml and the layout: every stage depends on all the code it runs, and imports run one way."""

from __future__ import annotations

import ast
import importlib.metadata
import sys
from pathlib import Path

import pytest
import yaml

from skin_lesion.packaging import MODEL_CODE, MODEL_PACKAGES
from tests.conftest import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
LIBRARY = sorted((REPO / "skin_lesion").rglob("*.py"))


def _all_imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return modules


def _imports(path: Path) -> set[str]:
    """The project modules (stages.*, skin_lesion.*) that a file imports."""
    return {module for module in _all_imports(path) if module.split(".")[0] in ("stages", "skin_lesion")}


def _code_of(path: Path, seen: set[Path] | None = None) -> set[Path]:
    """`path` and every project module it imports, directly or not (package __init__ files aside)."""
    seen = seen if seen is not None else set()
    seen.add(path)
    for module in _imports(path):
        imported = REPO / (module.replace(".", "/") + ".py")
        if imported.is_file() and imported not in seen:
            _code_of(imported, seen)
    return seen


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_depends_on_every_module_it_imports(name: str) -> None:
    stage = STAGES[name]
    module = stage["cmd"].split("-m stages.", 1)[1].split()[0]
    code = _code_of(REPO / "stages" / f"{module}.py")
    if REPO / "skin_lesion" / "packaging.py" in code and REPO / "skin_lesion" / "registry.py" in code:
        code |= {REPO / "skin_lesion" / name for name in MODEL_CODE}  # the code the model it logs ships
    needed = {path.relative_to(REPO).as_posix() for path in code}
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
    package = REPO / "skin_lesion"
    loaded = _code_of(package / "pyfunc_model.py") | _code_of(package / "__init__.py")
    assert {path.relative_to(package).as_posix() for path in loaded} == set(MODEL_CODE)


def test_the_model_pins_every_package_its_code_imports() -> None:
    code = [REPO / "skin_lesion" / name for name in MODEL_CODE]
    tops = {module.split(".")[0] for path in code for module in _all_imports(path)}
    third_party = tops - set(sys.stdlib_module_names) - {"skin_lesion", "__future__"}
    # A module may come in several distributions (mlflow in mlflow and mlflow-skinny): one is pinned.
    distributions = importlib.metadata.packages_distributions()
    pinned = {top: {name.lower() for name in distributions[top]} & set(MODEL_PACKAGES) for top in third_party}
    assert all(pinned.values()), pinned
    assert set().union(*pinned.values()) == set(MODEL_PACKAGES)

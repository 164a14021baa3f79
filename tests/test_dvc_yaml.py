"""dvc.yaml and the layout: every stage depends on all the code it runs, and imports run one way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
LIBRARY = sorted((REPO / "skin_lesion").rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """The project modules (stages.*, skin_lesion.*) that a file imports."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return {module for module in modules if module.split(".")[0] in ("stages", "skin_lesion")}


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
    needed = {path.relative_to(REPO).as_posix() for path in _code_of(REPO / "stages" / f"{module}.py")}
    listed = {dep for dep in stage["deps"] if dep.startswith(("stages/", "skin_lesion/"))}
    assert needed - listed == set(), f"{name}: add these to its deps in dvc.yaml"
    assert listed - needed == set(), f"{name}: lists code it doesn't run"


@pytest.mark.parametrize("path", LIBRARY, ids=lambda path: path.relative_to(REPO).as_posix())
def test_library_never_imports_a_stage(path: Path) -> None:
    assert {module for module in _imports(path) if module.split(".")[0] == "stages"} == set()


def test_stages_folder_holds_only_the_dvc_stages() -> None:
    scripts = {path.stem for path in (REPO / "stages").glob("*.py")} - {"__init__"}
    assert scripts == set(STAGES)

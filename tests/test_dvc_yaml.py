"""dvc.yaml: every stage depends on all the project code it runs, so DVC never reuses a stale output."""

from __future__ import annotations

import ast

import pytest
import yaml

from tests.conftest import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def _imported_modules(module: str, seen: set[str] | None = None) -> set[str]:
    """`module` and every stages.* module it imports, directly or not."""
    seen = seen if seen is not None else set()
    seen.add(module)
    tree = ast.parse((REPO / "stages" / f"{module}.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stages."):
            imported = node.module.split(".", 1)[1]
            if imported not in seen:
                _imported_modules(imported, seen)
    return seen


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_depends_on_every_module_it_imports(name: str) -> None:
    stage = STAGES[name]
    module = stage["cmd"].split("-m stages.", 1)[1].split()[0]
    needed = {f"stages/{imported}.py" for imported in _imported_modules(module)}
    listed = {dep for dep in stage["deps"] if isinstance(dep, str) and dep.startswith("stages/")}
    assert needed - listed == set(), f"{name}: add these to its deps in dvc.yaml"
    assert listed - needed == set(), f"{name}: lists code it doesn't run"

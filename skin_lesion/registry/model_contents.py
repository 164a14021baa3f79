"""What a logged model carries besides its weights: its name in the run, its code, its requirements.

A registered model is loaded where the pipeline may not be installed (`mlflow models serve` builds an
environment from the model's own requirements), so it carries the modules that loading it imports
and the versions the project's lock pins for the packages those modules import.
"""

from __future__ import annotations

import importlib.metadata
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from skin_lesion.errors import PipelineError

log = logging.getLogger("skin_lesion.registry.model_contents")

MLFLOW_MODEL_NAME = "model"  # the model's name inside its MLflow run
PACKAGE = Path(__file__).parents[1]  # skin_lesion/
MODEL_FOLDER = PACKAGE / "model"
ENTRY_FILE = MODEL_FOLDER / "entry.py"  # MLflow "models from code" runs it to get the pyfunc class
# The code a registered model ships (tests/test_dvc_yaml.py checks it equals what loading it imports):
# the model/ folder, and the four shared files it runs or needs: the package's __init__ (it quiets
# TensorFlow through quiet.py), the one exception type (errors.py) and image decoding (images.py).
PACKAGE_FILES = ("__init__.py", "quiet.py", "errors.py", "images.py")
# The distributions that code imports (tests/test_dvc_yaml.py checks this), and each backend's.
MODEL_PACKAGES = ("keras", "mlflow", "numpy", "pandas", "pillow")
BACKEND_PACKAGES = {
    "tensorflow": ("tensorflow", "tensorflow-cpu"),  # the lock holds the one for this platform
    "jax": ("jax", "jaxlib"),
    "torch": ("torch",),
}


def locked_versions(lock_text: str) -> dict[str, str]:
    """Name -> version of each `name==version` line of a pip requirements lock whose marker holds here."""
    # `packaging` reads one requirement, not a requirements file: the file's own syntax (a hashed
    # export continues each requirement over lines ending in a backslash) is undone here.
    lines = lock_text.replace("\\\n", " ").splitlines()
    versions = {}
    for line in lines:
        text = line.split(" --hash", 1)[0].split("#", 1)[0].strip()
        if not text:
            continue
        try:
            requirement = Requirement(text)
        except InvalidRequirement as err:
            raise PipelineError(f"the lock has a line pip cannot read: {text!r} ({err})") from None
        pins = [spec.version for spec in requirement.specifier if spec.operator == "=="]
        if pins and (requirement.marker is None or requirement.marker.evaluate()):
            versions[canonicalize_name(requirement.name)] = pins[0]
    return versions


def pip_requirements(backend: str, lock: Path) -> list[str]:
    """`name==version` for the model's packages and its Keras `backend`, as `lock` pins them here.

    A backend the lock does not hold (torch) is pinned at its installed version, with a warning.
    """
    try:
        pinned = locked_versions(lock.read_text(encoding="utf-8"))
    except OSError as err:
        raise PipelineError(f"{lock}: cannot read the lock ({err.strerror})") from None
    missing = [name for name in MODEL_PACKAGES if name not in pinned]
    if missing:
        raise PipelineError(f"{lock}: pins no version of {', '.join(missing)}, which the model imports")
    candidates = BACKEND_PACKAGES.get(backend, (backend,))
    backend_packages = [name for name in candidates if name in pinned]
    locked = (*MODEL_PACKAGES, *backend_packages)
    requirements = [f"{name}=={pinned[name]}" for name in locked]
    if not backend_packages:
        log.warning("%s does not pin the %s backend: the model pins the installed version", lock, backend)
        requirements += [f"{name}=={version}" for name, version in _installed(candidates)]
    _warn_when_installed_differs(dict(_installed(locked)), pinned, lock)
    return requirements


def model_code_files() -> list[Path]:
    """The files a registered model ships: PACKAGE_FILES and the model/ folder's modules."""
    return [PACKAGE / name for name in PACKAGE_FILES] + sorted(MODEL_FOLDER.glob("*.py"))


def model_code(folder: Path) -> Path:
    """Copy the model's code into `folder`/skin_lesion and return that package folder, for `code_paths`."""
    package = folder / PACKAGE.name
    for path in model_code_files():
        target = package / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return package


def _installed(names: Iterable[str]) -> list[tuple[str, str]]:
    found = []
    for name in names:
        try:
            found.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _warn_when_installed_differs(installed: dict[str, str], pinned: dict[str, str], lock: Path) -> None:
    # The model declares the lock's versions; one trained with others should say so.
    differ = [
        f"{name} {installed[name]} (lock: {pinned[name]})"
        for name in installed
        if installed[name] != pinned[name]
    ]
    if differ:
        log.warning("installed versions differ from %s: %s", lock, ", ".join(differ))

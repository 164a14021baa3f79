"""TensorFlow's start-up lines kept out of stage logs, where no setting of TensorFlow's removes them.

TensorFlow logs "oneDNN custom operations are on" once per native library it loads (twice per
process), through absl before absl's logging is initialised, so `TF_CPP_MIN_LOG_LEVEL` does not reach
it; only `TF_ENABLE_ONEDNN_OPTS=0` would, and that changes the numerics. So while `tensorflow` is
first imported, the process's stderr (file descriptor 2) runs through a child process that drops
those lines and passes every other line on at once. wurlitzer redirects native output too, but into
a thread of this process, which a crash inside the import takes down with its last words unread; a
child drains the pipe after this process is gone.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType

TENSORFLOW_START_UP_LINES = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on.",
)

_LINE_FILTER = """
import sys
drop = [fragment.encode() for fragment in sys.argv[1:]]
for line in sys.stdin.buffer:
    if not any(fragment in line for fragment in drop):
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
"""


@contextmanager
def stderr_without(fragments: Sequence[str]) -> Iterator[None]:
    """Within the block, drop lines of this process's stderr (native code's too) holding any fragment."""
    if sys.stderr is None or not sys.executable:  # no stderr (pythonw), or no interpreter for the filter
        yield
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # descriptor 2 is closed: there is nothing to filter
        yield
        return
    line_filter = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _LINE_FILTER, *fragments], stdin=subprocess.PIPE, stdout=saved
    )
    try:
        os.dup2(line_filter.stdin.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        line_filter.stdin.close()
        line_filter.wait()


class _QuietLoader(importlib.abc.Loader):
    """Runs another loader's module code with TensorFlow's start-up lines filtered out."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self.loader
        module.__spec__.loader = self.loader
        with stderr_without(TENSORFLOW_START_UP_LINES):
            self.loader.exec_module(module)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` the usual way, once, and hands its loader to _QuietLoader."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def quiet_tensorflow_import() -> None:
    """Filter TensorFlow's start-up lines when it is first imported (nothing if it already is)."""
    installed = any(isinstance(finder, _QuietTensorFlowImport) for finder in sys.meta_path)
    if "tensorflow" not in sys.modules and not installed:
        sys.meta_path.insert(0, _QuietTensorFlowImport())

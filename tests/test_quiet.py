"""TensorFlow's start-up lines are filtered from stderr; every other line, native or Python, still shows."""

from __future__ import annotations

import os
import subprocess
import sys

FILTERED = """
import os, sys
from skin_lesion.quiet import stderr_without
with stderr_without(["noise"]):
    os.write(2, b"noise from native code\\nreal warning\\n")
    print("python line", file=sys.stderr)
print("after", file=sys.stderr)
"""

CRASHING = """
import os
from skin_lesion.quiet import stderr_without
with stderr_without(["noise"]):
    os.write(2, b"noise\\nlast words\\n")
    os.abort()
"""

WITHOUT_STDERR = """
import os
from skin_lesion.quiet import stderr_without
os.close(2)  # as a daemon might run
with stderr_without(["noise"]):
    pass
"""


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter; stderr as text."""
    command = [sys.executable, "-c", code]
    return subprocess.run(command, check=False, capture_output=True, text=True, env={**os.environ, **env})


def test_filtered_lines_are_dropped_and_the_rest_keep_their_order() -> None:
    assert python(FILTERED).stderr == "real warning\npython line\nafter\n"


def test_a_crash_inside_the_filter_still_gets_its_last_words_out() -> None:
    result = python(CRASHING)
    assert result.returncode != 0
    assert result.stderr == "last words\n"


def test_a_process_without_stderr_imports_as_usual() -> None:
    assert python(WITHOUT_STDERR).returncode == 0


def test_tensorflow_starts_without_its_banner_but_keeps_its_warnings() -> None:
    # An unreadable setting makes TensorFlow warn at start-up, before absl's logging is initialised.
    result = python("import skin_lesion, keras", KERAS_BACKEND="tensorflow", TF_ENABLE_ONEDNN_OPTS="maybe")
    assert result.returncode == 0, result.stderr
    assert "TF_ENABLE_ONEDNN_OPTS is not set to either" in result.stderr
    assert "oneDNN custom operations are on" not in result.stderr
    assert "absl::InitializeLog" not in result.stderr

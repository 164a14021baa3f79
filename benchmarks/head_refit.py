"""How long a change of the probe's head takes end to end, once the backbone's embeddings are cached.

Runs `dvc exp run -S <param>=<value>` in a pipeline workspace that has run once with the same data
and backbone (so that every embedding, the test split's stressed copies' included, is in
data/cache), and prints the wall time of the whole experiment and of each stage it ran, from the
timestamps of DVC's "Running stage" lines.

    python benchmarks/head_refit.py --workspace <clone> -S site.weight=10
    python benchmarks/head_refit.py --workspace <clone> -S train.probe_c=0.003
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    """Run the experiment and print its timings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, required=True, help="pipeline folder that ran once")
    parser.add_argument("-S", dest="changes", action="append", required=True, help="param=value, as dvc")
    args = parser.parse_args()
    command = ["dvc", "exp", "run", *[item for change in args.changes for item in ("-S", change)]]
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=args.workspace, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    stages: list[tuple[str, float]] = []
    for line in process.stdout or []:
        if line.startswith("Running stage '"):
            stages.append((line.split("'")[1], time.perf_counter() - started))
    if process.wait() != 0:
        sys.exit(f"{' '.join(command)} failed")
    total = time.perf_counter() - started
    print(f"{' '.join(command)}: {total:.1f} s in all")
    ends = [start for _, start in stages[1:]] + [total]
    for (name, start), end in zip(stages, ends, strict=True):
        print(f"  {name:<12} {end - start:6.1f} s")


if __name__ == "__main__":
    main()

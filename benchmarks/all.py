"""`python -m benchmarks.all [--quick] [--out DIR] [--functions N]`: every benchmark, one after another.

The main run (`python -m benchmarks`), then `benchmarks.bucket`, `queues`, `shards`, `http` and `idle`, each in a
process of its own with its own nats-server, each writing its results into DIR (default: benchmarks/results).
One failing does not stop the others; the exit status says whether all ran. How long each took goes to stderr and
to DIR/runs.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

RUNS = [
    "benchmarks",
    "benchmarks.bucket",
    "benchmarks.queues",
    "benchmarks.shards",
    "benchmarks.http",
    "benchmarks.idle",
]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.all", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="each benchmark's quick run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="where results go")
    parser.add_argument("--functions", type=int, default=None, help="idle functions for benchmarks.idle")
    parser.add_argument("--only", default=",".join(RUNS), help="comma-separated modules to run (default: all)")
    args = parser.parse_args()
    wanted = [m.strip() for m in args.only.split(",") if m.strip()]
    took: list[tuple[str, float, int]] = []
    for module in wanted:
        command = [sys.executable, "-m", module, "--out", str(args.out), *(["--quick"] if args.quick else [])]
        if module == "benchmarks.idle" and args.functions:
            command += ["--functions", str(args.functions)]
        sys.stderr.write(f"== {' '.join(command[1:])}\n")
        begin = time.perf_counter()
        code = subprocess.run(command, cwd=Path(__file__).parent.parent).returncode
        took.append((module, time.perf_counter() - begin, code))
        sys.stderr.write(f"== {module}: {took[-1][1]:.0f} s, exit {code}\n")
    lines = ["| run | seconds | exit |", "|---|---|---|", *(f"| `python -m {m}` | {s:.0f} | {c} |" for m, s, c in took)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runs.md").write_text("\n".join(lines) + "\n")
    sys.stderr.write("\n".join(lines) + "\n")
    sys.exit(0 if all(code == 0 for _, _, code in took) else 1)


if __name__ == "__main__":
    main()

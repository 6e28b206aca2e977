"""Benchmark: wall-clock time of quick ``zsbir`` commands, from process start to exit.

Each command runs ``--repeat`` times as a fresh ``python -m zsbir.cli ...`` process (what
a user waits for after pressing Enter); the script prints the median and the minimum.
``--tree DIR`` runs another checkout's code (``PYTHONPATH=DIR``), e.g. the commit before a
change, extracted with ``git archive COMMIT | tar -x -C DIR``, for a before/after figure.

Usage (from the repository root)::

    python benchmarks/bench_cli_startup.py
    python benchmarks/bench_cli_startup.py --tree /tmp/before --repeat 5

Recorded figures: benchmarks/README.md ("CLI start-up").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = (
    ("--help",),
    ("list",),
    ("list", "losses"),
    ("describe", "losses", "sake"),
    ("list", "backbones"),
    ("list", "backbones", "--weights"),  # checks the weights on disk: imports torch, timm
)


def time_command(args: tuple[str, ...], tree: Path, repeat: int) -> list[float] | None:
    """Wall seconds of each run, or None when the command fails there (e.g. an option
    the other checkout does not have)."""
    env = dict(os.environ, PYTHONPATH=str(tree), COLUMNS="200")
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "zsbir.cli", *args], cwd=tree, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            print(f"zsbir {' '.join(args)} fails in {tree}: {proc.stderr.strip()[-200:]}")
            return None
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", type=Path, default=ROOT, help="the checkout to run (PYTHONPATH)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    print(f"# bench_cli_startup: {datetime.date.today()}, tree {args.tree}, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, {args.repeat} runs each")
    figures = {}
    for cmd in COMMANDS:
        times = time_command(cmd, args.tree.resolve(), args.repeat)
        name = "zsbir " + " ".join(cmd)
        if times is None:
            continue
        figures[name] = {"median_s": statistics.median(times), "min_s": min(times)}
        print(f"{name:34s} median {statistics.median(times):6.2f} s   min {min(times):6.2f} s",
              flush=True)
    print(f"# load at end {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

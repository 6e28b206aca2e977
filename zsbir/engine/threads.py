"""CPU thread policy: how many threads each part of a zsbir process uses.

Counted from the CPUs the process may really use, not from ``os.cpu_count()``: the CPU
affinity mask (``sched_getaffinity``: taskset, container cpusets, SLURM) and the cgroup
CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``; Docker
``--cpus``, Kubernetes limits), the smaller of the two, rounded down, at least 1
(:func:`usable_cpus`). Those CPUs are divided among the processes of a data-parallel
run on this machine (``--nproc N`` / torchrun's ``LOCAL_WORLD_SIZE``): a process's
*share*.

Within a share (:func:`plan_threads`):

- **loader workers** (``data.workers = -1``): on the CPU one worker when the share has
  two or more CPUs (decoding overlaps compute), none on one CPU; with CUDA one per CPU
  of the share, at most 8. Each worker runs one torch thread (:func:`worker_init`).
- **intra-op threads while loader workers decode** (training, embedding, ``zsbir
  index``): on the CPU the whole share; with CUDA the share minus the CPUs the workers
  need (``share - workers``, at least 1: the workers decode, one thread drives the GPU).
  The collapse of the old default beside other work came from OpenMP's active wait: with
  more runnable threads than cores, its barriers spin waiting for a descheduled thread at
  every parallel operation; with the passive wait below, the whole share beside the
  worker measured fastest alone and beside a busy process, and share - workers fastest
  for two runs at once (benchmarks/README.md, "CPU threads": both are recorded there).
- **intra-op threads for scoring** (evaluation after embedding, ``zsbir search``,
  ``zsbir serve``, whose model calls run one at a time): the whole share, nothing else
  runs beside them.
- **inter-op threads**: 1 (zsbir forks no TorchScript tasks; fewer idle threads).
- **OpenMP wait policy**: ``OMP_WAIT_POLICY=PASSIVE`` and ``KMP_BLOCKTIME=0`` (waiting
  threads sleep rather than spin, so they do not take the CPU from the thread they wait
  for). The OpenMP runtime reads them when it loads, so they reach this process only when
  set before torch is imported (:func:`prepare_environment`, first thing the CLI does),
  and always reach the processes it starts.

Overrides, strongest first: ``ZSBIR_THREADS`` (intra-op threads; ``off`` leaves every
thread setting to torch's own defaults, as before this policy), ``OMP_NUM_THREADS``,
``MKL_NUM_THREADS``, then the manifest's ``run.threads`` (0: this policy). An override
fixes the intra-op threads of every phase; loader workers stay ``data.workers``'s.
A user's ``OMP_WAIT_POLICY`` / ``KMP_BLOCKTIME`` are never replaced.

The plan is logged once per run (:func:`ThreadPlan.describe`) and recorded in
``metrics.json`` under ``threads`` (:meth:`ThreadPlan.to_dict`).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["CpuBudget", "ThreadPlan", "ThreadsError", "apply_plan", "cgroup_cpu_limit",
           "current_plan", "launcher_env", "loader_workers", "phase", "plan_threads",
           "prepare_environment", "restore", "snapshot", "usable_cpus", "use_threads",
           "worker_init"]

#: environment variables that fix the intra-op threads, strongest first
ENV_OVERRIDES = ("ZSBIR_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: the wait behaviour the policy asks of OpenMP runtimes (GNU: the first; Intel: both)
WAIT_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
#: set by :func:`prepare_environment`: the wait variables were zsbir's, not the user's
_MARK = "ZSBIR_WAIT_POLICY_SET"
#: the OMP_NUM_THREADS value zsbir's ``--nproc`` launcher set (not the user's)
_LAUNCHER_OMP = "ZSBIR_LAUNCHER_OMP"
#: most loader workers the automatic count gives a CUDA process
MAX_CUDA_WORKERS = 8


class ThreadsError(ValueError):
    """A thread setting in the environment that cannot be used (named in the message)."""


# ------------------------------------------------------------------------------ CPUs
@dataclass(frozen=True)
class CpuBudget:
    """The CPUs this process may use: ``cpus`` = min(affinity, floor(quota)), >= 1."""

    cpus: int
    affinity: int
    quota: float | None  # CPUs the cgroup quota allows (None: no quota)
    quota_source: str  # the file the quota came from ("" without one)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _ancestors(mount: Path, rel: str) -> list[Path]:
    """``mount/rel`` and its parents up to ``mount`` (a quota may sit on any of them).
    Inside a container the process's path may not exist under the mount (it names the
    host's hierarchy): then the mount itself, which is the container's cgroup."""
    here = mount / rel.lstrip("/")
    if not here.is_dir():
        return [mount]
    out = [here]
    while here != mount and mount in here.parents:
        here = here.parent
        out.append(here)
    return out


def cgroup_cpu_limit(root: str | Path = "/sys/fs/cgroup",
                     proc_cgroup: str | Path = "/proc/self/cgroup") -> tuple[float | None, str]:
    """CPUs the cgroup quota allows this process (``quota / period``, the smallest along
    its cgroup path), and the file it was read from; ``(None, "")`` without a quota.

    cgroup v2: ``cpu.max`` ("max 100000" or "150000 100000"), path from the ``0::`` line
    of /proc/self/cgroup. v1: ``cpu.cfs_quota_us`` (-1: none) / ``cpu.cfs_period_us`` in
    the ``cpu`` controller's hierarchy (mounted as ``cpu,cpuacct``, ``cpu`` or ...)."""
    root, lines = Path(root), (_read(Path(proc_cgroup)) or "").splitlines()
    best: tuple[float | None, str] = (None, "")

    def consider(cpus: float, path: Path) -> None:
        nonlocal best
        if cpus > 0 and (best[0] is None or cpus < best[0]):
            best = (cpus, str(path))

    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":  # v2 unified hierarchy
            for d in _ancestors(root, rel):
                fields = (_read(d / "cpu.max") or "").split()
                if len(fields) == 2 and fields[0] != "max":
                    try:
                        consider(int(fields[0]) / int(fields[1]), d / "cpu.max")
                    except (ValueError, ZeroDivisionError):
                        continue
        elif "cpu" in controllers.split(","):
            mounts = [root / controllers, root / "cpu,cpuacct", root / "cpu"]
            mount = next((m for m in mounts if m.is_dir()), None)
            if mount is None:
                continue
            for d in _ancestors(mount, rel):
                try:
                    quota = int(_read(d / "cpu.cfs_quota_us") or "-1")
                    period = int(_read(d / "cpu.cfs_period_us") or "0")
                except ValueError:
                    continue
                if quota > 0 and period > 0:
                    consider(quota / period, d / "cpu.cfs_quota_us")
    return best


def _affinity() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def usable_cpus(root: str | Path = "/sys/fs/cgroup",
                proc_cgroup: str | Path = "/proc/self/cgroup") -> CpuBudget:
    """The CPUs this process may use (affinity and cgroup quota; see the module)."""
    affinity = _affinity()
    quota, source = cgroup_cpu_limit(root, proc_cgroup)
    cpus = affinity if quota is None else min(affinity, max(1, math.floor(quota + 1e-9)))
    return CpuBudget(cpus=cpus, affinity=affinity, quota=quota, quota_source=source)


# ------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class ThreadPlan:
    """What every part of the process uses (see the module docstring)."""

    cpus: int  # usable CPUs of the machine for this process (CpuBudget.cpus)
    affinity: int
    quota: float | None
    processes: int  # processes of this run sharing the CPUs (--nproc / LOCAL_WORLD_SIZE)
    share: int  # CPUs of this process: cpus // processes, >= 1
    device: str  # "cpu", "cuda", ...
    loader_workers: int  # for data.workers = -1
    worker_threads: int  # torch threads in each loader worker
    train_threads: int  # intra-op threads while loader workers decode
    eval_threads: int  # intra-op threads for scoring (evaluation, search, serve)
    interop_threads: int
    wait_policy: str  # OMP_WAIT_POLICY this process's children get ("" : unchanged)
    source: str  # "policy", "run.threads", "ZSBIR_THREADS", "OMP_NUM_THREADS", "off", ...

    @property
    def enabled(self) -> bool:
        return self.source != "off"

    def threads_for(self, name: str) -> int:
        """Intra-op threads of a phase: ``"train"`` (loader workers running: training,
        embedding, index builds) or ``"evaluate"`` (scoring, search, serve)."""
        if name not in ("train", "evaluate"):
            raise ValueError(f"unknown thread phase {name!r} (train, evaluate)")
        return self.train_threads if name == "train" else self.eval_threads

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``metrics.json``."""
        return asdict(self)

    def describe(self) -> str:
        """One line for log.txt."""
        if not self.enabled:
            return ("threads: ZSBIR_THREADS=off, torch's defaults (intra-op "
                    f"{self.train_threads}, inter-op {self.interop_threads}); "
                    f"{self.cpus} usable CPUs")
        quota = "no cgroup quota" if self.quota is None else f"cgroup quota {self.quota:g}"
        procs = f", {self.processes} processes -> {self.share} each" \
            if self.processes > 1 else ""
        how = "policy" if self.source == "policy" else f"set by {self.source}"
        wait = f"OpenMP wait {self.wait_policy}" if self.wait_policy else "OpenMP wait unchanged"
        return (f"threads: {self.cpus} usable CPUs (affinity {self.affinity}, {quota}{procs}); "
                f"intra-op {self.train_threads} while {self.loader_workers} loader worker(s) "
                f"decode ({self.worker_threads} thread each), {self.eval_threads} when scoring "
                f"({how}); inter-op {self.interop_threads}; {wait}")


def _env_threads(env: Mapping[str, str]) -> tuple[int | str | None, str]:
    """The strongest environment override: (count or "off", variable) or (None, "")."""
    for name in ENV_OVERRIDES:
        raw = env.get(name, "").strip()
        if not raw or (name == "OMP_NUM_THREADS" and raw == env.get(_LAUNCHER_OMP)):
            continue  # unset, or set by zsbir's own launcher (see launcher_env)
        if name == "ZSBIR_THREADS" and raw.lower() == "off":
            return "off", name
        first = raw.split(",")[0]  # OMP_NUM_THREADS may list per-level counts "4,2"
        try:
            value = int(first)
        except ValueError:
            value = 0
        if value < 1:
            raise ThreadsError(f"environment variable {name}={raw!r} is not a positive "
                               "integer" + (" or 'off'" if name == "ZSBIR_THREADS" else ""))
        return value, name
    return None, ""


def _processes(env: Mapping[str, str]) -> int:
    """Processes of this run on this machine: torchrun's LOCAL_WORLD_SIZE (``--nproc``)."""
    try:
        return max(1, int(env.get("LOCAL_WORLD_SIZE", "1") or "1"))
    except ValueError:
        return 1


def loader_workers(share: int, device_type: str) -> int:
    """The automatic loader-worker count of a process with ``share`` CPUs."""
    if share <= 1:
        return 0
    return min(share, MAX_CUDA_WORKERS) if device_type == "cuda" else 1


def plan_threads(device: Any = "cpu", requested: int = 0, workers: int = -1, *,
                 processes: int | None = None, env: Mapping[str, str] | None = None,
                 budget: CpuBudget | None = None) -> ThreadPlan:
    """The thread plan for a process on ``device`` (a torch.device or its type name).

    ``requested``: ``run.threads`` (0: automatic); ``workers``: ``data.workers`` (-1:
    automatic); ``processes``: processes sharing the CPUs (default: torchrun's
    ``LOCAL_WORLD_SIZE``, else 1); ``env`` (default ``os.environ``) and ``budget``
    (default :func:`usable_cpus`) are parameters for tests."""
    env = os.environ if env is None else env
    budget = budget or usable_cpus()
    dtype = getattr(device, "type", str(device).split(":")[0])
    procs = processes or _processes(env)
    share = max(1, budget.cpus // procs)
    auto_workers = loader_workers(share, dtype)
    n_workers = workers if workers >= 0 else auto_workers
    override, source = _env_threads(env)
    if override is None and requested > 0:
        override, source = requested, "run.threads"
    user_wait = env.get("OMP_WAIT_POLICY", "") if env.get(_MARK) != "1" else ""
    common = dict(cpus=budget.cpus, affinity=budget.affinity, quota=budget.quota,
                  processes=procs, share=share, device=dtype, loader_workers=n_workers,
                  worker_threads=1)
    if override == "off":  # torch's defaults: one thread per core, everywhere
        cores = os.cpu_count() or 1
        return ThreadPlan(**common, train_threads=cores, eval_threads=cores,
                          interop_threads=cores, wait_policy=user_wait, source="off")
    if isinstance(override, int):
        train = evaluate = override
    else:
        source = "policy"
        evaluate = share
        # CUDA: the workers decode, one thread drives the GPU; CPU: the passive wait lets
        # the whole share compute beside the worker (measured: benchmarks/README.md)
        train = max(1, share - n_workers) if dtype == "cuda" else share
    return ThreadPlan(**common, train_threads=train, eval_threads=evaluate,
                      interop_threads=1, wait_policy=user_wait or WAIT_ENV["OMP_WAIT_POLICY"],
                      source=source)


def launcher_env(nproc: int, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Variables for the ``nproc`` processes ``zsbir run --nproc`` starts: the wait
    policy, and an OMP_NUM_THREADS of this policy's share (torchrun would otherwise set 1),
    marked as zsbir's so each process still applies its own plan (and logs its source)."""
    env = dict(os.environ if env is None else env)
    prepare_environment(env)
    if "OMP_NUM_THREADS" not in env:
        share = max(1, usable_cpus().cpus // max(1, nproc))
        env["OMP_NUM_THREADS"] = env[_LAUNCHER_OMP] = str(share)
    return env


# ------------------------------------------------------------------------------ apply
_CURRENT: ThreadPlan | None = None


def prepare_environment(env: dict[str, str] | None = None) -> None:
    """Set the OpenMP wait variables (:data:`WAIT_ENV`) unless the user did, or
    ``ZSBIR_THREADS=off``. Call it before torch is imported (the CLI does, first): the
    OpenMP runtime reads them once, when it loads; processes started later inherit them."""
    env = os.environ if env is None else env
    if env.get("ZSBIR_THREADS", "").strip().lower() == "off":
        return
    if any(k in env for k in WAIT_ENV) and env.get(_MARK) != "1":
        return  # the user's choice
    for k, v in WAIT_ENV.items():
        env.setdefault(k, v)
    env[_MARK] = "1"


def apply_plan(plan: ThreadPlan, name: str = "train") -> ThreadPlan:
    """Make ``plan`` the process's plan and set torch's threads for phase ``name``
    (``"train"`` or ``"evaluate"``). Returns ``plan`` (callers log ``plan.describe()``)."""
    import torch

    global _CURRENT
    _CURRENT = plan
    if not plan.enabled:
        return plan
    prepare_environment()  # for processes started from here on
    torch.set_num_threads(plan.threads_for(name))
    if torch.get_num_interop_threads() != plan.interop_threads:
        try:  # allowed only before any inter-op work started in this process
            torch.set_num_interop_threads(plan.interop_threads)
        except RuntimeError:
            pass
    return plan


def use_threads(name: str, device: Any = "cpu", requested: int = 0,
                workers: int = -1) -> ThreadPlan:
    """:func:`apply_plan` of :func:`plan_threads` in one call (``zsbir index``, ``search``,
    ``serve``, benchmarks)."""
    return apply_plan(plan_threads(device, requested, workers), name)


def snapshot() -> tuple[int, ThreadPlan | None]:
    """The process's intra-op threads and plan, for :func:`restore` (a run called from
    Python leaves the caller's settings as they were; inter-op threads cannot change back)."""
    import torch

    return torch.get_num_threads(), _CURRENT


def restore(saved: tuple[int, ThreadPlan | None]) -> None:
    import torch

    global _CURRENT
    torch.set_num_threads(saved[0])
    _CURRENT = saved[1]


def current_plan(device: Any = "cpu") -> ThreadPlan:
    """The plan :func:`apply_plan` set last, else the automatic plan for ``device``."""
    return _CURRENT if _CURRENT is not None else plan_threads(device)


@contextlib.contextmanager
def phase(name: str, device: Any = "cpu") -> Iterator[ThreadPlan]:
    """Run a block with the current plan's intra-op threads for phase ``name``; the
    previous count is restored after it."""
    import torch

    plan = current_plan(device)
    before = torch.get_num_threads()
    if plan.enabled:
        torch.set_num_threads(plan.threads_for(name))
    try:
        yield plan
    finally:
        torch.set_num_threads(before)


def worker_init(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's signature
    """DataLoader ``worker_init_fn``: the plan's torch threads in a loader worker (the
    worker inherits the plan from the process that forked it)."""
    import torch

    plan = current_plan()
    if plan.enabled:
        torch.set_num_threads(plan.worker_threads)

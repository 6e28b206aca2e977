"""CPU thread policy: how many threads each part of a zsbir process uses.

Counted from the CPUs the process may really use, not from ``os.cpu_count()``: the CPU
affinity mask (``sched_getaffinity``: taskset, container cpusets, SLURM) and the cgroup
CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``; Docker
``--cpus``, Kubernetes limits), the smaller of the two, rounded down, at least 1
(:func:`usable_cpus`). Those CPUs are divided among the processes of a data-parallel
run on this machine (``--nproc N`` / torchrun's ``LOCAL_WORLD_SIZE``): a process's
*share*. They are also divided among the other zsbir processes computing on the same
CPUs at the same time, like ``make``'s job server (:func:`acquire_lease`,
:func:`count_peers`): a process that trains, embeds or evaluates holds a *lease*, a locked
file in a per-user directory (``/dev/shm/zsbir-cpu-leases-<uid>``; ``ZSBIR_CPU_LEASES``
names another one, or ``off``), and its intra-op threads follow the number of live leases
on its CPUs, re-counted at most once a second between training steps and embedding
batches (:func:`refresh`): two seeds started together on 2 CPUs compute with one thread
each, and the one left goes back to two when the other ends. A lease is released when
the run ends; one left by a killed process is unlocked, and the next count removes it.
``zsbir serve`` and ``zsbir search`` take none (they mostly wait) but divide by the
processes computing when they start. The division changes a run's thread count, hence
its last bits: a fixed count (below) or ``ZSBIR_CPU_LEASES=off`` keeps reruns
bit-identical whatever else runs.

Within a share (:func:`plan_threads`):

- **loader workers** (``data.workers = -1``): counted from ``cpus // processes`` (not
  the other zsbir processes: their number changes, the workers' does not); on the CPU one
  worker from two CPUs (decoding overlaps compute), none on one CPU; with CUDA one per CPU
  of the share, at most 8. Each worker runs one torch thread (:func:`worker_init`).
- **intra-op threads while loader workers decode** (training, embedding, ``zsbir
  index``): on the CPU the whole share; with CUDA the share minus the CPUs the workers
  need (``share - workers``, at least 1: the workers decode, one thread drives the GPU).
  The collapse of the old default beside other work came from OpenMP's active wait: with
  more runnable threads than cores, its barriers spin waiting for a descheduled thread at
  every parallel operation; with the passive wait below, the whole share beside the
  worker measured fastest alone and beside a busy process, and share - workers fastest
  for two runs at once (benchmarks/README.md, "CPU threads": both are recorded there), which
  the division among concurrent zsbir processes gives them.
- **intra-op threads for scoring** (evaluation after embedding, ``zsbir evaluate``,
  ``zsbir search``, ``zsbir serve``, whose model and search run one request at a time
  under the index's lock): the whole share, nothing else runs beside them.
- **inter-op threads**: 1 (zsbir forks no TorchScript tasks; fewer idle threads).
- **OpenMP wait policy**: ``OMP_WAIT_POLICY=PASSIVE`` and ``KMP_BLOCKTIME=0`` (waiting
  threads sleep rather than spin, so they do not take the CPU from the thread they wait
  for). The OpenMP runtime reads them when it loads, so they reach this process only when
  set before torch is imported (:func:`prepare_environment`, first thing the CLI does),
  and always reach the processes it starts.

Overrides, strongest first: ``ZSBIR_THREADS`` (intra-op threads; ``off`` leaves every
thread setting to torch's own defaults, as before this policy), ``OMP_NUM_THREADS``,
``MKL_NUM_THREADS``, then the manifest's ``run.threads`` (0: this policy). An override
fixes the intra-op threads of every phase (other processes do not change it); loader
workers stay ``data.workers``'s. Faiss has its own OpenMP runtime: :func:`faiss_threads`
gives it the torch count of the thread that searches.
A user's ``OMP_WAIT_POLICY`` / ``KMP_BLOCKTIME`` are never replaced.

The plan is logged once per run (:func:`ThreadPlan.describe`; later changes of the number of
zsbir processes one line each, in log.txt only) and recorded in ``metrics.json`` under
``threads`` (:func:`report`: the plan at the start and its ``changes``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

__all__ = ["CpuBudget", "Lease", "ThreadPlan", "ThreadsError", "acquire_lease", "apply_plan",
           "cgroup_cpu_limit", "count_peers", "current_plan", "faiss_threads", "launcher_env",
           "lease_dir", "loader_workers", "phase", "plan_threads", "prepare_environment",
           "refresh", "report", "restore", "snapshot", "usable_cpus", "use_threads",
           "with_peers", "worker_init"]

log = logging.getLogger(__name__)

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
#: the lease directory (a path, or ``off``: no division among concurrent processes)
LEASE_ENV = "ZSBIR_CPU_LEASES"
#: seconds between two counts of the concurrent zsbir processes (:func:`refresh`)
REFRESH_S = 1.0


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


def _cpu_set() -> frozenset[int]:
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return frozenset(range(os.cpu_count() or 1))


# ------------------------------------------------------------------------------ leases
def lease_dir(env: Mapping[str, str] | None = None) -> Path | None:
    """The directory of this user's CPU leases (``None``: ``ZSBIR_CPU_LEASES=off``, or no
    ``fcntl`` on this system). Per user: ``/dev/shm`` where it exists (memory, one per
    machine or container), else the temporary directory."""
    env = os.environ if env is None else env
    raw = env.get(LEASE_ENV, "").strip()
    if raw.lower() == "off" or sys.platform == "win32":
        return None
    if raw:
        return Path(raw)
    import tempfile

    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / f"zsbir-cpu-leases-{os.getuid()}"


class Lease:
    """A held lease: the file ``path`` (JSON: pid, CPUs), locked (``flock``) through
    ``fd`` for as long as this process (or a loader worker forked from it) lives."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    def release(self) -> None:
        """Remove the file and drop the lock (idempotent)."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = -1


def _private_dir(directory: Path) -> bool:
    """Create ``directory`` (mode 700) if needed; ``True`` when it is a directory of this
    user (not a link): another user's leases are neither read nor written."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(directory)
    except OSError:
        return False
    import stat

    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()


def acquire_lease(directory: Path | None, cpus: frozenset[int] | None = None) -> Lease | None:
    """Announce that this process computes on ``cpus`` (default: its affinity mask):
    a file written and locked under a temporary name, then renamed into place, so a count
    never sees an unlocked live lease. ``None`` (and no error: the division is a courtesy)
    without a usable directory."""
    if directory is None or not _private_dir(directory):
        return None
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    cpus = _cpu_set() if cpus is None else cpus
    name = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp, final = directory / f".{name}.tmp", directory / f"{name}.lease"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, json.dumps({"pid": os.getpid(), "cpus": sorted(cpus)}).encode())
        os.rename(tmp, final)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        os.close(fd)
        return None
    return Lease(final, fd)


def count_peers(directory: Path | None, cpus: frozenset[int] | None = None,
                own: Lease | None = None) -> int:
    """zsbir processes computing on CPUs that overlap ``cpus`` (default: the affinity
    mask), this one included (counted once, leased or not). A lease file nobody holds
    locked was left by a process that died: it is removed."""
    if directory is None:
        return 1
    try:
        import fcntl

        entries = list(os.scandir(directory))
    except (ImportError, OSError):
        return 1
    cpus = _cpu_set() if cpus is None else cpus
    n = 1
    for entry in entries:
        if not entry.name.endswith(".lease") or (own is not None and entry.path == str(own.path)):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # released meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # held: a live process
                try:
                    theirs = set(json.loads(os.read(fd, 65536) or b"{}").get("cpus") or ())
                except (OSError, ValueError, AttributeError):
                    theirs = set()
                n += 1 if not theirs or theirs & cpus else 0
            else:  # nobody holds it: its process died without releasing it
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
        except OSError:
            continue
        finally:
            os.close(fd)
    return n


# ------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class ThreadPlan:
    """What every part of the process uses (see the module docstring)."""

    cpus: int  # usable CPUs of the machine for this process (CpuBudget.cpus)
    affinity: int
    quota: float | None
    processes: int  # processes of this run sharing the CPUs (--nproc / LOCAL_WORLD_SIZE)
    share: int  # CPUs of this process: cpus // max(processes, peers), >= 1
    device: str  # "cpu", "cuda", ...
    loader_workers: int  # for data.workers = -1
    worker_threads: int  # torch threads in each loader worker
    train_threads: int  # intra-op threads while loader workers decode
    eval_threads: int  # intra-op threads for scoring (evaluation, search, serve)
    interop_threads: int
    wait_policy: str  # OMP_WAIT_POLICY this process's children get ("" : unchanged)
    source: str  # "policy", "run.threads", "ZSBIR_THREADS", "OMP_NUM_THREADS", "off", ...
    peers: int = 1  # zsbir processes computing on these CPUs now, this one included

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
        procs = f", {max(self.processes, self.peers)} processes -> {self.share} each" \
            if max(self.processes, self.peers) > 1 else ""
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
                 budget: CpuBudget | None = None, peers: int = 1) -> ThreadPlan:
    """The thread plan for a process on ``device`` (a torch.device or its type name).

    ``requested``: ``run.threads`` (0: automatic); ``workers``: ``data.workers`` (-1:
    automatic); ``processes``: processes sharing the CPUs (default: torchrun's
    ``LOCAL_WORLD_SIZE``, else 1); ``peers``: zsbir processes computing on these CPUs,
    this one included (:func:`count_peers`; :func:`apply_plan` counts them); ``env``
    (default ``os.environ``) and ``budget`` (default :func:`usable_cpus`) are parameters
    for tests."""
    env = os.environ if env is None else env
    budget = budget or usable_cpus()
    dtype = getattr(device, "type", str(device).split(":")[0])
    procs = processes or _processes(env)
    share = max(1, budget.cpus // max(procs, peers))
    auto_workers = loader_workers(max(1, budget.cpus // procs), dtype)
    n_workers = workers if workers >= 0 else auto_workers
    override, source = _env_threads(env)
    if override is None and requested > 0:
        override, source = requested, "run.threads"
    user_wait = env.get("OMP_WAIT_POLICY", "") if env.get(_MARK) != "1" else ""
    common = dict(cpus=budget.cpus, affinity=budget.affinity, quota=budget.quota,
                  processes=procs, share=share, device=dtype, loader_workers=n_workers,
                  worker_threads=1, peers=max(1, peers))
    if override == "off":  # torch's defaults: one thread per core, everywhere
        cores = os.cpu_count() or 1
        return ThreadPlan(**common, train_threads=cores, eval_threads=cores,
                          interop_threads=cores, wait_policy=user_wait, source="off")
    if isinstance(override, int):
        train = evaluate = override
    else:
        source = "policy"
        train, evaluate = _policy_threads(share, n_workers, dtype)
    return ThreadPlan(**common, train_threads=train, eval_threads=evaluate,
                      interop_threads=1, wait_policy=user_wait or WAIT_ENV["OMP_WAIT_POLICY"],
                      source=source)


def _policy_threads(share: int, workers: int, device_type: str) -> tuple[int, int]:
    """(train, evaluate) intra-op threads of the policy for a share. CUDA: the workers
    decode, one thread drives the GPU; CPU: the passive wait lets the whole share compute
    beside the worker (measured: benchmarks/README.md)."""
    train = max(1, share - workers) if device_type == "cuda" else share
    return train, share


def with_peers(plan: ThreadPlan, peers: int) -> ThreadPlan:
    """``plan`` once ``peers`` zsbir processes compute on its CPUs: the policy's threads
    from the new share; the loader workers (already started) and a user's fixed count
    stay."""
    peers = max(1, peers)
    if not plan.enabled or peers == plan.peers:
        return plan
    share = max(1, plan.cpus // max(plan.processes, peers))
    if plan.source != "policy":
        return replace(plan, peers=peers, share=share)
    train, evaluate = _policy_threads(share, plan.loader_workers, plan.device)
    return replace(plan, peers=peers, share=share, train_threads=train,
                   eval_threads=evaluate)


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
_CURRENT: ThreadPlan | None = None  # the plan in force (its peers follow refresh())
_INITIAL: ThreadPlan | None = None  # the plan apply_plan set (metrics.json)
_LEASE: Lease | None = None
_PHASE = "train"
_CHANGES: list[dict[str, Any]] = []
_T0 = _LAST_COUNT = 0.0


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


def apply_plan(plan: ThreadPlan, name: str = "train", lease: bool = True) -> ThreadPlan:
    """Make ``plan`` the process's plan and set torch's threads for phase ``name``
    (``"train"`` or ``"evaluate"``). With ``lease`` the process takes a CPU lease (kept
    until :func:`restore` or its exit) and the plan is divided among the zsbir processes
    computing beside it. Returns the plan in force (callers log ``plan.describe()``)."""
    import torch

    global _CURRENT, _INITIAL, _LEASE, _PHASE, _CHANGES, _T0, _LAST_COUNT
    plan.threads_for(name)  # a known phase
    if plan.enabled:
        directory = lease_dir()
        if lease and _LEASE is None:
            _LEASE = acquire_lease(directory)
            if _LEASE is not None:
                import atexit

                atexit.register(_LEASE.release)
        plan = with_peers(plan, count_peers(directory, own=_LEASE))
    _CURRENT = _INITIAL = plan
    _PHASE, _CHANGES, _T0 = name, [], time.monotonic()
    _LAST_COUNT = _T0
    if not plan.enabled:
        return plan
    prepare_environment()  # for processes started from here on
    torch.set_num_threads(plan.threads_for(name))
    faiss_threads()
    if torch.get_num_interop_threads() != plan.interop_threads:
        try:  # allowed only before any inter-op work started in this process
            torch.set_num_interop_threads(plan.interop_threads)
        except RuntimeError:
            pass
    return plan


def refresh(force: bool = False) -> ThreadPlan | None:
    """Re-count the zsbir processes computing on this process's CPUs (at most every
    :data:`REFRESH_S` seconds unless ``force``) and, when their number changed, set the
    threads of the current phase from the new share (one line in log.txt). Called from
    the thread that computes (torch's thread counts are per thread): between training
    steps and embedding batches. Returns the plan in force."""
    global _CURRENT, _LAST_COUNT
    plan = _CURRENT
    if plan is None or not plan.enabled:
        return plan
    now = time.monotonic()
    if not force and now - _LAST_COUNT < REFRESH_S:
        return plan
    _LAST_COUNT = now
    new = with_peers(plan, count_peers(lease_dir(), own=_LEASE))
    if new is plan:
        return plan
    import torch

    _CURRENT = new
    threads = new.threads_for(_PHASE)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    _CHANGES.append({"after_s": round(now - _T0, 1), "peers": new.peers, "share": new.share,
                     "train_threads": new.train_threads, "eval_threads": new.eval_threads})
    log.info("threads: %d zsbir process(es) now compute on these %d CPUs: intra-op %d "
             "(%s)", new.peers, new.cpus, threads, _PHASE, extra={"console": False})
    return new


def use_threads(name: str, device: Any = "cpu", requested: int = 0,
                workers: int = -1, lease: bool = True) -> ThreadPlan:
    """:func:`apply_plan` of :func:`plan_threads` in one call (``zsbir index``, ``search``,
    ``serve``, benchmarks). ``lease=False`` for a process that mostly waits (``zsbir
    serve``, a one-off ``zsbir search``): it divides by the processes computing when it
    starts, and takes no share from them."""
    return apply_plan(plan_threads(device, requested, workers), name, lease=lease)


def report() -> dict[str, Any]:
    """``metrics.json``'s ``threads``: the plan :func:`apply_plan` set, and the changes of
    the number of concurrent zsbir processes after it (``changes``, seconds after the
    start, the new count and threads)."""
    plan = _INITIAL if _INITIAL is not None else current_plan()
    return {**plan.to_dict(), "changes": list(_CHANGES)}


def snapshot() -> tuple[Any, ...]:
    """The process's intra-op threads, plan and lease, for :func:`restore` (a run called
    from Python leaves the caller's settings as they were; inter-op threads cannot change
    back)."""
    import torch

    return torch.get_num_threads(), _CURRENT, _INITIAL, _LEASE, _PHASE, list(_CHANGES)


def restore(saved: tuple[Any, ...]) -> None:
    """Undo what happened since :func:`snapshot`; a lease taken since is released."""
    import torch

    global _CURRENT, _INITIAL, _LEASE, _PHASE, _CHANGES
    threads, _CURRENT, _INITIAL, lease, _PHASE, _CHANGES = saved
    if _LEASE is not None and _LEASE is not lease:
        _LEASE.release()
    _LEASE = lease
    torch.set_num_threads(threads)
    faiss_threads()


def current_plan(device: Any = "cpu") -> ThreadPlan:
    """The plan in force (:func:`apply_plan`, :func:`refresh`), else the automatic plan
    for ``device``."""
    return _CURRENT if _CURRENT is not None else plan_threads(device)


@contextlib.contextmanager
def phase(name: str, device: Any = "cpu") -> Iterator[ThreadPlan]:
    """Run a block with the current plan's intra-op threads for phase ``name``; the
    previous count is restored after it."""
    import torch

    global _PHASE
    before, before_phase = torch.get_num_threads(), _PHASE
    _PHASE = name
    plan = refresh() or current_plan(device)
    if plan.enabled:
        torch.set_num_threads(plan.threads_for(name))
    try:
        yield plan
    finally:
        _PHASE = before_phase
        now = _CURRENT  # the number of processes may have changed meanwhile
        torch.set_num_threads(now.threads_for(before_phase)
                              if now is not None and now.enabled and now is not plan
                              else before)


def faiss_threads() -> None:
    """Give faiss (its own OpenMP runtime, which torch's count does not reach) the
    calling thread's torch intra-op threads, once a plan is applied and faiss is loaded;
    called before faiss searches (``zsbir.hashing``)."""
    faiss = sys.modules.get("faiss")
    if faiss is None or _CURRENT is None or not _CURRENT.enabled:
        return
    import torch

    n = torch.get_num_threads()
    with contextlib.suppress(AttributeError):
        if faiss.omp_get_max_threads() != n:
            faiss.omp_set_num_threads(n)


def worker_init(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's signature
    """DataLoader ``worker_init_fn``: the plan's torch threads in a loader worker (the
    worker inherits the plan from the process that forked it)."""
    import torch

    plan = current_plan()
    if plan.enabled:
        torch.set_num_threads(plan.worker_threads)

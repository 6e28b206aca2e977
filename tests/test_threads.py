"""The CPU thread policy (zsbir.engine.threads): CPUs from affinity and cgroup quota, the
plan's arithmetic, overrides, and a run recording its plan."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from zsbir.engine import threads as T
from zsbir.engine.threads import CpuBudget, ThreadsError, plan_threads

ENV_KEYS = ("ZSBIR_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "LOCAL_WORLD_SIZE",
            "OMP_WAIT_POLICY", "KMP_BLOCKTIME", "ZSBIR_WAIT_POLICY_SET", "ZSBIR_LAUNCHER_OMP")
CPU_SET = frozenset(os.sched_getaffinity(0))


def budget(cpus: int) -> CpuBudget:
    return CpuBudget(cpus=cpus, affinity=cpus, quota=None, quota_source="")


@pytest.fixture
def torch_threads():
    """Any plan applied in a test is undone after it."""
    saved = T.snapshot()
    yield
    T.restore(saved)


def write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ------------------------------------------------------------------------------ cgroups
def test_cgroup_v2_smallest_quota_along_the_path(tmp_path):
    root, proc = tmp_path / "cg", tmp_path / "cgroup"
    write(proc, "0::/user.slice/job.scope\n")
    write(root / "cpu.max", "max 100000\n")
    write(root / "user.slice" / "cpu.max", "250000 100000\n")  # 2.5 CPUs
    write(root / "user.slice" / "job.scope" / "cpu.max", "150000 100000\n")  # 1.5 CPUs
    quota, source = T.cgroup_cpu_limit(root, proc)
    assert quota == 1.5 and source.endswith("job.scope/cpu.max")
    write(root / "user.slice" / "cpu.max", "50000 100000\n")  # the parent is tighter
    assert T.cgroup_cpu_limit(root, proc)[0] == 0.5


def test_cgroup_v2_without_quota_and_container_paths(tmp_path):
    root, proc = tmp_path / "cg", tmp_path / "cgroup"
    write(proc, "0::/\n")
    write(root / "cpu.max", "max 100000\n")
    assert T.cgroup_cpu_limit(root, proc) == (None, "")
    # inside a container the host's path is absent under the mount: the mount is the cgroup
    write(proc, "0::/kubepods/pod1/abc\n")
    write(root / "cpu.max", "300000 100000\n")
    assert T.cgroup_cpu_limit(root, proc)[0] == 3.0
    assert T.cgroup_cpu_limit(root, tmp_path / "absent") == (None, "")


def test_cgroup_v1_cfs_quota(tmp_path):
    root, proc = tmp_path / "cg", tmp_path / "cgroup"
    write(proc, "12:memory:/docker/x\n4:cpu,cpuacct:/docker/x\n")
    d = root / "cpu,cpuacct" / "docker" / "x"
    write(d / "cpu.cfs_quota_us", "200000\n")
    write(d / "cpu.cfs_period_us", "100000\n")
    write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    assert T.cgroup_cpu_limit(root, proc)[0] == 2.0
    write(d / "cpu.cfs_quota_us", "-1\n")  # no quota
    assert T.cgroup_cpu_limit(root, proc) == (None, "")


def test_usable_cpus_is_affinity_capped_by_the_quota(tmp_path, monkeypatch):
    root, proc = tmp_path / "cg", tmp_path / "cgroup"
    write(proc, "0::/\n")
    write(root / "cpu.max", "max 100000\n")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    assert T.usable_cpus(root, proc) == CpuBudget(8, 8, None, "")
    write(root / "cpu.max", "350000 100000\n")  # 3.5 CPUs: 3 threads, not 8 or 4
    b = T.usable_cpus(root, proc)
    assert (b.cpus, b.affinity, b.quota) == (3, 8, 3.5)
    write(root / "cpu.max", "20000 100000\n")  # 0.2 CPUs: still one thread
    assert T.usable_cpus(root, proc).cpus == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})  # taskset -c 3
    write(root / "cpu.max", "max 100000\n")
    assert T.usable_cpus(root, proc).cpus == 1


# ------------------------------------------------------------------------------ plan
@pytest.mark.parametrize(("cpus", "procs", "device", "share", "workers", "train", "evaluate"), [
    (2, 1, "cpu", 2, 1, 2, 2),     # this VM: one worker decodes beside 2 compute threads
    (1, 1, "cpu", 1, 0, 1, 1),     # one CPU: decode in the main process
    (2, 2, "cpu", 1, 0, 1, 1),     # --nproc 2 on 2 CPUs
    (16, 1, "cpu", 16, 1, 16, 16),
    (16, 3, "cpu", 5, 1, 5, 5),    # 16 // 3
    (32, 1, "cuda", 32, 8, 24, 32),
    (32, 4, "cuda", 8, 8, 1, 8),   # 8 workers fill the share; one thread drives the GPU
    (6, 2, "cuda", 3, 3, 1, 3),
])
def test_plan_arithmetic(cpus, procs, device, share, workers, train, evaluate):
    p = plan_threads(device, budget=budget(cpus), processes=procs, env={})
    assert (p.share, p.loader_workers, p.train_threads, p.eval_threads) == (
        share, workers, train, evaluate)
    assert (p.interop_threads, p.worker_threads, p.source) == (1, 1, "policy")
    assert p.wait_policy == "PASSIVE"


def test_plan_with_explicit_workers_and_torchrun_processes():
    p = plan_threads("cpu", workers=3, budget=budget(8), env={})
    assert (p.loader_workers, p.train_threads, p.eval_threads) == (3, 8, 8)
    p = plan_threads("cuda", workers=3, budget=budget(8), env={})
    assert (p.loader_workers, p.train_threads, p.eval_threads) == (3, 5, 8)
    p = plan_threads("cpu", budget=budget(8), env={"LOCAL_WORLD_SIZE": "4"})
    assert (p.processes, p.share, p.train_threads) == (4, 2, 2)


def test_overrides_environment_wins_over_manifest():
    b = budget(8)
    assert plan_threads("cpu", requested=3, budget=b, env={}).train_threads == 3
    p = plan_threads("cpu", requested=3, budget=b, env={"MKL_NUM_THREADS": "5"})
    assert (p.train_threads, p.eval_threads, p.source) == (5, 5, "MKL_NUM_THREADS")
    p = plan_threads("cpu", requested=3, budget=b,
                     env={"MKL_NUM_THREADS": "5", "OMP_NUM_THREADS": "4,2"})
    assert (p.train_threads, p.source) == (4, "OMP_NUM_THREADS")
    p = plan_threads("cpu", requested=3, budget=b,
                     env={"OMP_NUM_THREADS": "4", "ZSBIR_THREADS": "6"})
    assert (p.train_threads, p.eval_threads, p.source) == (6, 6, "ZSBIR_THREADS")
    p = plan_threads("cpu", requested=3, budget=b, env={"OMP_WAIT_POLICY": "ACTIVE"})
    assert (p.source, p.wait_policy) == ("run.threads", "ACTIVE")  # the user's, kept
    off = plan_threads("cpu", requested=3, budget=b, env={"ZSBIR_THREADS": "off"})
    assert off.source == "off" and not off.enabled and off.wait_policy == ""


@pytest.mark.parametrize("env", [{"OMP_NUM_THREADS": "zero"}, {"ZSBIR_THREADS": "0"},
                                 {"MKL_NUM_THREADS": "-2"}])
def test_bad_environment_value_is_one_clear_error(env):
    name = next(iter(env))
    with pytest.raises(ThreadsError, match=f"^environment variable {name}=.* is not a "
                                           "positive integer"):
        plan_threads("cpu", budget=budget(2), env=env)


def test_launcher_divides_and_marks_its_own_omp_value(monkeypatch):
    monkeypatch.setattr(T, "usable_cpus", lambda *a: budget(8))
    env = T.launcher_env(2, env={})
    assert env["OMP_NUM_THREADS"] == "4" and env["ZSBIR_LAUNCHER_OMP"] == "4"
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["KMP_BLOCKTIME"] == "0"
    child = plan_threads("cpu", budget=budget(8), env={**env, "LOCAL_WORLD_SIZE": "2"})
    assert (child.source, child.share, child.train_threads, child.eval_threads) == (
        "policy", 4, 4, 4)
    user = T.launcher_env(2, env={"OMP_NUM_THREADS": "2"})  # the user's choice is passed on
    assert user["OMP_NUM_THREADS"] == "2" and "ZSBIR_LAUNCHER_OMP" not in user
    assert plan_threads("cpu", budget=budget(8), env=user).source == "OMP_NUM_THREADS"


def test_prepare_environment_keeps_the_users_wait_policy():
    env: dict[str, str] = {}
    T.prepare_environment(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0",
                   "ZSBIR_WAIT_POLICY_SET": "1"}
    mine = {"OMP_WAIT_POLICY": "ACTIVE"}
    T.prepare_environment(mine)
    assert mine == {"OMP_WAIT_POLICY": "ACTIVE"}
    off = {"ZSBIR_THREADS": "off"}
    T.prepare_environment(off)
    assert off == {"ZSBIR_THREADS": "off"}


def test_apply_phase_and_worker_init(torch_threads):
    p = plan_threads("cuda", workers=1, budget=budget(3), env={})  # 2 beside the worker
    T.apply_plan(p)
    assert torch.get_num_threads() == 2 and T.current_plan() is p
    with T.phase("evaluate"):
        assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == 2
    T.worker_init(0)
    assert torch.get_num_threads() == 1
    with pytest.raises(ValueError, match="unknown thread phase"):
        p.threads_for("serve")


def test_loaders_get_the_worker_init(tmp_path, torch_threads):
    from zsbir.data.base import Split
    from zsbir.data.loading import ImageDataset, Transform, make_loader, worker_count

    T.apply_plan(plan_threads("cpu", budget=budget(1), env={}))
    assert worker_count(-1, torch.device("cpu")) == 0
    T.apply_plan(plan_threads("cuda", budget=budget(4), env={}))
    assert worker_count(-1, torch.device("cuda")) == 4 and worker_count(2) == 2
    ds = ImageDataset(Split([], [], []), lambda p: None, Transform(16))
    assert make_loader(ds, [], 1).worker_init_fn is T.worker_init
    assert make_loader(ds, [], 0).worker_init_fn is None


# ------------------------------------------------------------------------------ runs
def test_tiny_run_records_its_plan(tiny_run):
    """metrics.json's ``threads`` is the plan the policy gives this process; log.txt
    states it once."""
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    recorded = metrics["threads"]
    assert recorded.pop("changes") == []  # no other process (the tests' leases are off)
    expected = plan_threads("cpu", workers=0).to_dict()  # TINY: data.workers = 0
    assert recorded == expected
    lines = [ln for ln in (tiny_run / "log.txt").read_text().splitlines() if "threads: " in ln]
    assert len(lines) == 1
    assert lines[0].endswith(T.ThreadPlan(**recorded).describe())


def test_manifest_threads_through_the_cli(tmp_path, monkeypatch, torch_threads):
    """``run.threads`` reaches the plan (``zsbir bench train`` records it); a bad value
    is a manifest error (exit 2); a bad OMP_NUM_THREADS is a one-line error (exit 1)."""
    import importlib.util
    from pathlib import Path

    from click.testing import CliRunner

    from zsbir.cli import main

    for k in ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    spec = importlib.util.spec_from_file_location("_e2e", Path(__file__).with_name("test_e2e.py"))
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    sets = [a for kv in e2e.TINY for a in ("--set", kv)]
    manifest = str(e2e.EXAMPLES / "quickstart.toml")
    out = tmp_path / "b.json"
    r = CliRunner().invoke(main, ["bench", "train", manifest, *sets, "--set", "run.threads=1",
                                  "--set", "data.workers=0", "--steps", "1", "--warmup", "0",
                                  "--json", str(out)])
    assert r.exit_code == 0, r.output
    rec = json.loads(out.read_text())["threads"]
    assert (rec["source"], rec["train_threads"], rec["loader_workers"]) == ("run.threads", 1, 0)
    r = CliRunner().invoke(main, ["validate", manifest, "--set", "run.threads=-1"])
    assert r.exit_code == 2 and "run.threads" in r.output
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    r = CliRunner().invoke(main, ["bench", "train", manifest, *sets, "--steps", "1"])
    assert r.exit_code == 1, r.output
    assert "environment variable OMP_NUM_THREADS='lots' is not a positive integer" in r.output
    assert "Traceback" not in r.output


# ------------------------------------------------------------------------------ leases
def test_lease_directory_from_the_environment(tmp_path):
    assert T.lease_dir({"ZSBIR_CPU_LEASES": "off"}) is None
    assert T.lease_dir({"ZSBIR_CPU_LEASES": str(tmp_path)}) == tmp_path
    default = T.lease_dir({})
    assert default.name == f"zsbir-cpu-leases-{os.getuid()}"


def test_leases_are_counted_on_overlapping_cpus_and_released(tmp_path):
    d = tmp_path / "leases"
    assert T.count_peers(d, CPU_SET) == 1  # no directory yet: this process alone
    mine = T.acquire_lease(d)
    assert mine is not None and mine.path.parent == d and (d.stat().st_mode & 0o777) == 0o700
    assert json.loads(mine.path.read_text()) == {"pid": os.getpid(), "cpus": sorted(CPU_SET)}
    assert T.count_peers(d, CPU_SET, own=mine) == 1
    other = T.acquire_lease(d)  # another holder (a lock of its own: counted as live)
    assert T.count_peers(d, CPU_SET, own=mine) == 2
    assert T.count_peers(d, CPU_SET) == 3  # a process without a lease counts itself too
    elsewhere = T.acquire_lease(d, frozenset({max(CPU_SET) + 100}))  # taskset elsewhere
    assert T.count_peers(d, CPU_SET, own=mine) == 2
    for lease in (other, elsewhere, mine):
        lease.release()
        lease.release()  # idempotent
    assert list(d.iterdir()) == []


def test_a_killed_processs_lease_is_removed_by_the_next_count(tmp_path):
    """A process that took a lease and died by SIGKILL (no clean-up) leaves an unlocked
    file: the next count does not count it and removes it."""
    code = ("import sys, time; from pathlib import Path; from zsbir.engine import threads as T;"
            "lease = T.acquire_lease(Path(sys.argv[1])); print('held', flush=True);"
            "time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        (held,) = tmp_path.glob("*.lease")
        assert T.count_peers(tmp_path, CPU_SET) == 2  # alive, locked: counted
        assert held.exists()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert held.exists()  # nobody cleaned up after the killed process ...
    (tmp_path / "unlocked.lease").write_text("{}")  # ... nor after this one
    assert T.count_peers(tmp_path, CPU_SET) == 1
    assert list(tmp_path.iterdir()) == []


def test_another_users_directory_is_left_alone(tmp_path, monkeypatch):
    d = tmp_path / "theirs"
    d.mkdir()
    monkeypatch.setattr(os, "getuid", lambda: os.stat(d).st_uid + 1)
    assert T.acquire_lease(d) is None and list(d.iterdir()) == []
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    monkeypatch.undo()
    assert T.acquire_lease(link) is None


@pytest.mark.parametrize(("device", "cpus", "workers", "peers", "share", "train", "evaluate"), [
    ("cpu", 2, 1, 2, 1, 1, 1),      # two seeds on this VM: one thread each, the worker stays
    ("cpu", 2, 1, 5, 1, 1, 1),      # never below one
    ("cpu", 16, 1, 3, 5, 5, 5),
    ("cuda", 32, 8, 2, 16, 8, 16),  # share - workers, as for --nproc
])
def test_with_peers_divides_the_policys_threads(device, cpus, workers, peers, share, train,
                                                evaluate):
    p = plan_threads(device, budget=budget(cpus), env={})
    assert p.peers == 1 and p.loader_workers == workers
    q = T.with_peers(p, peers)
    assert (q.peers, q.share, q.train_threads, q.eval_threads, q.loader_workers) == (
        peers, share, train, evaluate, workers)
    assert T.with_peers(q, 1) == p  # back when the others end
    assert plan_threads(device, budget=budget(cpus), env={}, peers=peers) == q


def test_with_peers_keeps_a_users_count_and_the_launchers_division():
    fixed = plan_threads("cpu", requested=2, budget=budget(8), env={})
    q = T.with_peers(fixed, 4)
    assert (q.train_threads, q.eval_threads, q.peers, q.share) == (2, 2, 4, 2)
    off = plan_threads("cpu", budget=budget(8), env={"ZSBIR_THREADS": "off"})
    assert T.with_peers(off, 4) is off
    nproc = plan_threads("cpu", budget=budget(8), processes=4, env={})  # --nproc 4
    assert T.with_peers(nproc, 3).share == 2  # its own processes hold leases too
    assert T.with_peers(nproc, 8).share == 1


def test_apply_refresh_and_restore_follow_the_other_processes(tmp_path, monkeypatch,
                                                                torch_threads):
    """A plan applied with a lease divides the CPUs among the live leases, is re-counted
    by refresh() (rate-limited, forced here), records each change for metrics.json, and
    restore() releases the lease."""
    monkeypatch.setenv("ZSBIR_CPU_LEASES", str(tmp_path))
    monkeypatch.setattr(T, "_cpu_set", lambda: frozenset({0, 1}))
    plan = plan_threads("cpu", budget=budget(2), env={})
    saved = T.snapshot()
    applied = T.apply_plan(plan)
    assert applied == plan and torch.get_num_threads() == 2
    assert len(list(tmp_path.glob("*.lease"))) == 1
    other = T.acquire_lease(tmp_path, frozenset({0, 1}))  # a second seed starts
    assert T.refresh() is applied  # counted at most once a second
    now = T.refresh(force=True)
    assert (now.peers, now.train_threads, torch.get_num_threads()) == (2, 1, 1)
    assert T.current_plan() is now
    with T.phase("evaluate"):
        assert torch.get_num_threads() == 1
        other.release()  # the other seed ends during scoring
        T.refresh(force=True)
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 2  # back in training, with the whole share again
    rep = T.report()
    assert rep["peers"] == 1 and rep["train_threads"] == 2  # the plan at the start
    assert [(c["peers"], c["train_threads"]) for c in rep["changes"]] == [(2, 1), (1, 2)]
    T.restore(saved)
    assert list(tmp_path.iterdir()) == []


def test_a_process_that_mostly_waits_takes_no_lease(tmp_path, monkeypatch, torch_threads):
    monkeypatch.setenv("ZSBIR_CPU_LEASES", str(tmp_path))
    monkeypatch.setattr(T, "_cpu_set", lambda: frozenset({0, 1}))
    monkeypatch.setattr(T, "usable_cpus", lambda *a: budget(2))
    for k in ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    other = T.acquire_lease(tmp_path, frozenset({0, 1}))
    plan = T.use_threads("evaluate", lease=False)  # zsbir serve, zsbir search
    assert (plan.peers, plan.eval_threads, torch.get_num_threads()) == (2, 1, 1)
    assert list(tmp_path.glob("*.lease")) == [other.path]
    other.release()


def test_loader_workers_do_not_follow_the_other_processes(monkeypatch, torch_threads):
    from zsbir.data.loading import worker_count

    monkeypatch.setattr(T, "count_peers", lambda *a, **k: 2)  # another seed computes
    T.apply_plan(plan_threads("cpu", budget=budget(2), env={}), lease=False)
    assert T.current_plan().share == 1
    assert worker_count(-1, torch.device("cpu")) == 1  # from the 2 CPUs, as alone


def test_faiss_gets_the_plans_threads(torch_threads):
    faiss = pytest.importorskip("faiss")
    before = faiss.omp_get_max_threads()
    try:
        T.apply_plan(plan_threads("cpu", requested=1, budget=budget(2), env={}), lease=False)
        assert faiss.omp_get_max_threads() == 1
    finally:
        faiss.omp_set_num_threads(before)


def test_evaluate_run_records_its_plan(tiny_run, torch_threads):
    from zsbir.engine.evaluate_run import evaluate_run

    results, out = evaluate_run(tiny_run)
    recorded = json.loads((out / "metrics.json").read_text())["threads"]
    assert recorded == results["threads"]
    assert recorded["source"] in ("policy", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                  "ZSBIR_THREADS") and recorded["changes"] == []


def test_serve_request_threads_get_the_plans_count(tmp_path, monkeypatch, torch_threads):
    """``zsbir serve`` applies the plan in its main thread and answers on worker threads
    (anyio's), one search at a time under the index's lock: a thread started after the
    plan computes with the plan's count, and faiss there follows torch's."""
    import threading

    faiss = pytest.importorskip("faiss")
    monkeypatch.setenv("ZSBIR_CPU_LEASES", "off")
    monkeypatch.setattr(T, "usable_cpus", lambda *a: budget(1))  # e.g. a 1-CPU quota
    for k in ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    before = faiss.omp_get_max_threads()
    seen: dict[str, int] = {}

    def request() -> None:
        seen["torch"] = torch.get_num_threads()
        T.faiss_threads()  # what zsbir.hashing does before a faiss search
        seen["faiss"] = faiss.omp_get_max_threads()

    try:
        assert T.use_threads("evaluate", lease=False).eval_threads == 1
        t = threading.Thread(target=request)
        t.start()
        t.join()
    finally:
        faiss.omp_set_num_threads(before)
    assert seen == {"torch": 1, "faiss": 1}


def test_index_build_structures_use_the_plans_threads(tiny_run, tmp_path, monkeypatch,
                                                      torch_threads):
    """After the embedding (which applies its own plan and restores the previous one),
    `zsbir index build` builds its faiss structure with the plan's threads: under a 1-CPU
    quota faiss and torch compute with 1 thread there, not with every core."""
    from click.testing import CliRunner
    from PIL import Image

    import zsbir.search.faiss_index as fi
    from zsbir.cli import main
    from zsbir.data.synthetic import render

    faiss = pytest.importorskip("faiss")
    for k in ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(T, "usable_cpus", lambda *a: budget(1))
    for c in range(2):
        for i in range(3):
            (tmp_path / "p" / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(render(c, 0, i, 7, 32)).save(tmp_path / "p" / f"c{c}" / f"{i}.png")
    seen: list[tuple[int, int]] = []
    real = fi.make_faiss

    def recording(*a, **k):
        seen.append((faiss.omp_get_max_threads(), torch.get_num_threads()))
        return real(*a, **k)

    monkeypatch.setattr(fi, "make_faiss", recording)
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)  # what faiss's default would be on this 2-core machine
    try:
        res = CliRunner().invoke(main, ["index", "build", str(tiny_run), str(tmp_path / "p"),
                                        str(tmp_path / "idx"), "--workers", "0"])
        assert res.exit_code == 0, res.output
    finally:
        faiss.omp_set_num_threads(before)
    assert seen == [(1, 1)]

"""The process group: joining it (torchrun's environment), launching N local processes,
this process's rank and world size, and leaving the group cleanly.

Every query is a no-op answer (rank 0 of 1) in a single process, so code calls them
unconditionally.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "barrier", "init_distributed", "is_distributed", "is_main",
           "launch_torchrun", "rank", "shutdown", "world_size"]


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: ``rank`` of ``world``, its ``local_rank`` on the node,
    the ``backend`` ("nccl", "gloo", or "" for a single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); a no-op for one process.

    Backend: NCCL when the run uses CUDA (``device`` "auto" with a GPU, or "cuda..."),
    gloo otherwise. With NCCL the process's GPU is ``cuda:LOCAL_RANK``.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistEnv()
    r, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local % torch.cuda.device_count())
    if not dist.is_initialized():
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(key):
                raise ValueError(f"WORLD_SIZE={world} but {key} is not set; launch with "
                                 "torchrun (or zsbir run --nproc N)")
        dist.init_process_group(backend, rank=r, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistEnv(rank=r, world=world, local_rank=local, backend=dist.get_backend())


def launch_torchrun(nproc: int, zsbir_args: Sequence[str]) -> int:
    """Run ``zsbir ZSBIR_ARGS`` as ``nproc`` processes on this machine through torchrun
    (``--standalone``: a local rendezvous on a free port); returns torchrun's exit status
    (non-zero when any process failed: torchrun then stops the others)."""
    import subprocess
    import sys

    if _env_int("WORLD_SIZE", 1) > 1:
        raise ValueError("--nproc inside a torchrun process: launch either with torchrun "
                         "or with zsbir run --nproc, not both")
    from zsbir.engine.threads import launcher_env

    cmd = [sys.executable, "-c", _LAUNCHER, "--standalone", f"--nproc-per-node={nproc}",
           "-m", "zsbir", *zsbir_args]
    return subprocess.call(cmd, env=launcher_env(nproc))  # CPUs divided among them


#: torchrun, with its failure report cut to one line: the failing process has printed its
#: own error already (a user error in one line), so torchrun's traceback only adds noise
_LAUNCHER = """\
import sys
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run
try:
    run(get_args_parser().parse_args(sys.argv[1:]))
except ChildFailedError as exc:
    codes = ", ".join(f"rank {r}: exit {f.exitcode}" for r, f in sorted(exc.failures.items()))
    print(f"zsbir: data-parallel run failed ({codes}); the other processes were stopped",
          file=sys.stderr)
    sys.exit(1)
"""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one process that writes files."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown(clean: bool = True) -> None:
    """Leave the process group. After a clean finish every rank first waits at a barrier:
    a rank that tears its connections down while another still has collectives in
    flight makes gloo abort that process ("terminate called without an active
    exception"). After an error no barrier (the other ranks may be gone). DDP wrappers
    must be gone by then (their reducer outliving the group aborts the same way): the
    caller drops its references, and a collection here frees any held in cycles."""
    if not is_distributed():
        return
    import gc

    gc.collect()
    if clean:
        dist.barrier()
    dist.destroy_process_group()

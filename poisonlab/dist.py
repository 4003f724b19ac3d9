"""Several processes (`accelerate launch --num_processes N`, `torchrun`): who trains, who writes.

Under a launcher every process runs the whole pipeline. Training splits each micro-batch
across the processes (`train.train_sft`); everything else is computed once, by the main
process, and handed to the others (`main_computes`), and only the main process writes files.
With one process every helper here is a no-op and no process group is ever started.

The process group is created lazily, on the first call that needs it, from the environment
the launcher sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK): NCCL when CUDA is
available, gloo otherwise (or with ACCELERATE_USE_CPU=true).
"""

from __future__ import annotations

import atexit
import functools
import os
from datetime import timedelta

import torch
import torch.distributed as tdist

from poisonlab import PoisonlabError

# The other processes wait inside a collective while the main process evaluates or writes;
# the default limit (10 min for NCCL) would abort a long evaluation of a large model.
TIMEOUT = timedelta(hours=4)

_solo = 0  # > 0 while the main process runs a `main_computes` function on its own


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def _group() -> bool:
    """True when this process is one of several (initialising the process group if needed)."""
    if _solo:
        return False
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not tdist.is_available():
        raise PoisonlabError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if torch.cuda.is_available() and not _env_flag("ACCELERATE_USE_CPU"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    tdist.init_process_group(backend=backend, timeout=TIMEOUT)
    atexit.register(_shutdown)
    return tdist.get_world_size() > 1


def shutdown() -> None:
    """Leave the process group once every process is done (a no-op with one process).

    Call it at the end of a program that ran under a launcher: the barrier makes sure no
    process tears its connections down while another still completes a collective, and the
    explicit teardown joins gloo's worker threads while the interpreter is fully alive.
    Left to the interpreter's own teardown, those threads can still hold work with tensors,
    and the process aborts after it has done all its work ("terminate called without an
    active exception", exit -6), which the launcher reports as a failed run.
    """
    if _solo == 0 and tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def _shutdown() -> None:
    """At exit, without the barrier (another process may have failed): the teardown alone."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def launched() -> bool:
    """True under a multi-process launcher, even while the main process computes alone."""
    return (int(os.environ.get("WORLD_SIZE", "1")) > 1
            or (tdist.is_available() and tdist.is_initialized()))


def world_size() -> int:
    """Number of processes (1 without a launcher)."""
    return tdist.get_world_size() if _group() else 1


def rank() -> int:
    """This process's index, 0 on the main process."""
    return tdist.get_rank() if _group() else 0


def is_main() -> bool:
    """True on the process that evaluates and writes (the only one without a launcher)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process gets here (nothing with one process)."""
    if _group():
        tdist.barrier()


def broadcast_object(obj):
    """The main process's `obj` on every process (any picklable object); identity alone."""
    if not _group():
        return obj
    box = [obj if is_main() else None]
    tdist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def main_computes(fn):
    """`fn` runs on the main process only; every process returns the main process's result.

    Every process must call the wrapper (it is a collective). While `fn` runs, the main
    process counts as the only one, so what `fn` calls (training, writes, nested
    `main_computes`) runs there alone. An error in `fn` is raised on every process instead
    of leaving the others waiting.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _solo
        if not _group():
            return fn(*args, **kwargs)
        result, error = None, None
        if is_main():
            _solo += 1
            try:
                result = fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - re-raised below, after telling the others
                error = e
            finally:
                _solo -= 1
        failed = None if error is None else f"{type(error).__name__}: {error}"
        failed, result = broadcast_object((failed, result))
        if error is not None:
            raise error
        if failed is not None:
            raise PoisonlabError(f"{fn.__name__} failed on the main process: {failed}")
        return result
    return wrapper


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum `tensors` in place across the processes (one collective per dtype and device)."""
    _flat_collective(tensors, tdist.all_reduce)


def broadcast_tensors(tensors: list[torch.Tensor]) -> None:
    """Overwrite `tensors` in place with the main process's values."""
    _flat_collective(tensors, lambda flat: tdist.broadcast(flat, src=0))


def _flat_collective(tensors: list[torch.Tensor], op) -> None:
    if not _group():
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for members in groups.values():
        flat = torch.cat([t.reshape(-1) for t in members])
        op(flat)
        o = 0
        for t in members:
            t.copy_(flat[o:o + t.numel()].view_as(t))
            o += t.numel()


def _comm_device() -> torch.device:
    """Where object collectives stage their bytes: the current GPU for NCCL, else the CPU."""
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

"""Process-group helpers that also work with no process group (plain `python`, unit tests).

Everything that talks to other ranks goes through here, so the same code path serves 1 and N processes.
Nothing happens at import time (upstream creates the process group when train_v2.py is imported).
"""
import atexit
import datetime
import gc
import os
import pickle
import shutil
import tempfile

import torch
import torch.distributed as dist


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def get_local_rank():
    return int(os.environ.get("LOCAL_RANK", 0))


def get_local_world_size():
    """Processes of this job on this machine (torchrun's LOCAL_WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


_RENDEZVOUS = []  # temp folders of single-process groups, removed at teardown (and at exit)


def init_distributed(backend=None, device_type="cpu", timeout_s=None):
    """Join the torchrun group, or make a group of one when launched with plain python.

    Partial FC is written for a process group, so single-process runs get a real group of size 1
    (gloo, file rendezvous in a fresh temp dir, removed again at teardown) instead of a separate code path.
    timeout_s bounds every collective: a rank that stopped or died makes the others fail after it, not hang.
    """
    if is_dist():
        return get_rank(), get_world_size()
    if backend is None:
        backend = "nccl" if device_type == "cuda" else "gloo"
    kwargs = {"timeout": datetime.timedelta(seconds=float(timeout_s))} if timeout_s else {}
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, init_method="env://", **kwargs)
    else:
        folder = tempfile.mkdtemp(prefix="ukd_pg_")
        _RENDEZVOUS.append(folder)
        dist.init_process_group(backend=backend, init_method=f"file://{os.path.join(folder, 'rendezvous')}",
                                rank=0, world_size=1, **kwargs)
    return get_rank(), get_world_size()


def _remove_rendezvous():
    while _RENDEZVOUS:
        shutil.rmtree(_RENDEZVOUS.pop(), ignore_errors=True)


atexit.register(_remove_rendezvous)


def is_timeout(exc):
    """Whether an exception from a collective means that another rank did not take part in time."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("timed out" in text or "timeout" in text)


def teardown(failed=False):
    """Destroy the group. Callers must drop every reference to their DDP-wrapped modules first: a live DDP
    reducer at destroy time makes gloo abort at exit about one run in six. After a failure there is no final
    barrier: the other ranks may be waiting in another collective, and the launcher stops them once this one exits."""
    gc.collect()
    if is_dist():
        try:
            if not failed:
                dist.barrier()
        finally:
            dist.destroy_process_group()
    _remove_rendezvous()


@torch.no_grad()
def all_gather_nograd(tensor):
    """Concatenate a tensor from every rank along dim 0 (same shape on every rank); no gradient."""
    if get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(tensor):
    """In-place sum over ranks (no gradient); returns the tensor for chaining."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor):
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_object(obj, src=0):
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier():
    if get_world_size() > 1:
        dist.barrier()


def on_rank0(fn, *args, **kwargs):
    """fn(*args, **kwargs) on rank 0 only; every rank returns its result or raises the exception it raised.

    For work one rank must do alone (read a file, evaluate a model) whose outcome all ranks must act on: the
    exception object itself travels, so every rank stops with the same error type and message, instead of one
    rank raising while the others wait in the next collective. Rank 0 re-raises the original, traceback and all.
    """
    outcome = None
    if get_rank() == 0:
        try:
            outcome = (True, fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            outcome = (False, exc)
    if get_world_size() > 1:
        sent = outcome
        if get_rank() == 0:
            try:
                pickle.dumps(outcome)
            except Exception as err:  # noqa: BLE001 - the other ranks must hear something
                sent = (False, RuntimeError(f"rank 0: {outcome[1]!r} (its {'result' if outcome[0] else 'error'} "
                                            f"could not be sent to the other ranks: {err})"))
        received = broadcast_object(sent)
        if get_rank() != 0:
            outcome = received
    ok, value = outcome
    if ok:
        return value
    raise value


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] (picklable objects; a list of one without a group)."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def raise_together(exc=None):
    """Every rank calls this, passing the exception its own checks raised (or None). If any rank has one, every
    rank raises: its own, or the first other rank's (same type, message prefixed with that rank), so that one
    rank's bad file never leaves the others waiting in the next collective."""
    reports = all_gather_object(None if exc is None else (type(exc), str(exc)))
    if exc is not None:
        raise exc
    for rank, report in enumerate(reports):
        if report is not None:
            kind, message = report
            try:
                other = kind(f"rank {rank}: {message}")
            except Exception:  # noqa: BLE001 - a type that does not take one message
                other = RuntimeError(f"rank {rank}: {kind.__name__}: {message}")
            raise other

"""Process-group helpers that also work with no process group (plain `python`, unit tests).

Everything that talks to other ranks goes through here, so the same code path serves 1 and N processes.
Nothing happens at import time (upstream creates the process group when train_v2.py is imported).
"""
import gc
import os
import pickle
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


def init_distributed(backend=None, device_type="cpu"):
    """Join the torchrun group, or make a group of one when launched with plain python.

    Partial FC is written for a process group, so single-process runs get a real group of size 1
    (gloo, file rendezvous in a fresh temp dir) instead of a separate code path.
    """
    if is_dist():
        return get_rank(), get_world_size()
    if backend is None:
        backend = "nccl" if device_type == "cuda" else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, init_method="env://")
    else:
        rendezvous = os.path.join(tempfile.mkdtemp(prefix="ukd_pg_"), "rendezvous")
        dist.init_process_group(backend=backend, init_method=f"file://{rendezvous}", rank=0, world_size=1)
    return get_rank(), get_world_size()


def teardown():
    """Destroy the group. Callers must drop every reference to their DDP-wrapped modules first: a live DDP
    reducer at destroy time makes gloo abort at exit about one run in six."""
    gc.collect()
    if is_dist():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


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

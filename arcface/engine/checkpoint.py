"""Checkpoints with arcface_torch's names and keys, written atomically as one generation across ranks, loaded
without running code from the file, and checked before they are trusted.

- model.pt: the bare backbone state_dict (no 'module.' prefix), what inference / ONNX / IJB tools load.
- checkpoint_gpu_<rank>.pt: upstream's keys (epoch, global_step, state_dict_backbone, state_dict_softmax_fc,
  state_optimizer, state_lr_scheduler) plus ours (grad scaler, plugin states, RNG states as tensors, the batch
  reached inside the epoch, world size, class count, optimizer and schedule for the resume checks).
- checkpoint_commit.json: the step of the last generation every rank has written.

A generation is written in two phases, so that a job killed at any moment leaves ranks that agree:
every rank writes checkpoint_gpu_<rank>.pt.next (itself through a temp file and a rename); a barrier; rank 0
records the step in checkpoint_commit.json (the commit point); every rank renames its .next over its .pt. On resume
a .next of the committed step finishes its rename, an uncommitted one is discarded, and ranks whose checkpoints
disagree on the step are refused.
"""
import errno
import json
import os
import pickle
import random
import re
import shutil

import numpy as np
import torch

from ..errors import CheckpointError
from ..partial_fc import shard_range
from . import distributed as D

COMMIT_FILE = "checkpoint_commit.json"
_TMP = re.compile(r"\.tmp\.(\d+)$")


def _no_space(exc):
    text = str(exc)
    return (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left" in text or \
        "unexpected pos" in text  # what torch's zip writer says when the disk fills mid-file


def atomic_save(obj, path):
    """torch.save to a temp file in the same folder, then rename: a crash never leaves half a file. A full disk
    is a CheckpointError that says so and names the path; the file being replaced is left as it was."""
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        if _no_space(exc):
            free = shutil.disk_usage(folder).free / 2 ** 20
            raise CheckpointError(f"no space left on the device writing {path} ({free:.0f} MB free); the previous "
                                  "file there is intact: free some space and resume") from exc
        raise CheckpointError(f"writing {path} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(obj, path):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_path(output, rank):
    return os.path.join(output, f"checkpoint_gpu_{rank}.pt")


def remove_orphans(output):
    """Temp files of writes that were killed (`<name>.tmp.<pid>` of a process that is gone), as big as a
    checkpoint each; returns the names removed."""
    removed = []
    if not os.path.isdir(output):
        return removed
    for name in os.listdir(output):
        match = _TMP.search(name)
        if not match or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue  # its writer is still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        os.remove(os.path.join(output, name))
        removed.append(name)
    return removed


# ---- RNG states, as tensors and plain types (loadable with weights_only=True) ------------------------------

def rng_state():
    version, keys, gauss = random.getstate()
    kind, np_keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "keys": torch.tensor(keys, dtype=torch.int64), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    if not state:
        return
    py, n = state["python"], state["numpy"]
    # each part as this version writes it (plain types), or as earlier versions did (the generators' own objects)
    if isinstance(py, dict):
        py = (py["version"], tuple(int(k) for k in py["keys"].tolist()), py["gauss"])
    random.setstate(py)
    if isinstance(n, dict):
        n = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.set_state(n)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- writing a generation ------------------------------------------------------------------------------------

def save_generation(state, output, rank, global_step):
    """Every rank calls this with its state: .next files, barrier, commit record, rename, barrier."""
    path = checkpoint_path(output, rank)
    atomic_save(state, path + ".next")
    D.barrier()
    if rank == 0:
        write_json({"global_step": int(global_step), "world_size": D.get_world_size()},
                   os.path.join(output, COMMIT_FILE))
    D.barrier()
    os.replace(path + ".next", path)
    D.barrier()


def committed_step(output):
    path = os.path.join(output, COMMIT_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"resume: {path} is unreadable ({exc}); it records which checkpoint generation every "
                              "rank finished") from None


# ---- loading --------------------------------------------------------------------------------------------------

def rank_checkpoints(output):
    """Names of the per-rank checkpoint files in an output folder (no temp files), sorted."""
    if not os.path.isdir(output):
        return []
    return sorted(f for f in os.listdir(output) if f.startswith("checkpoint_gpu_") and f.endswith(".pt"))


def read_checkpoint(path, allow_pickle=False):
    """torch.load with weights_only=True: tensors and plain containers only, so no code in the file runs.
    Checkpoints of earlier versions (python RNG objects inside) need allow_pickle (config resume_unsafe_pickle)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not allow_pickle:
            raise CheckpointError(f"resume: {path} holds pickled python objects beyond tensors and plain types "
                                  "(written by an earlier version, or not by this engine); reading it could run code "
                                  "from the file. If you trust it, set resume_unsafe_pickle=True once to resume "
                                  f"(the next checkpoint is written in the safe form). ({exc})".strip()) from None
    except Exception as exc:
        raise CheckpointError(f"resume: {path} cannot be read ({type(exc).__name__}: {exc})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"resume: {path} cannot be read ({type(exc).__name__}: {exc})") from exc


def _finish_generation(output, rank):
    """A .next file left by a killed save: finish its rename when its generation was committed, else drop it."""
    nxt = checkpoint_path(output, rank) + ".next"
    if not os.path.isfile(nxt):
        return
    step = committed_step(output)
    try:
        nxt_step = int(torch.load(nxt, map_location="cpu", weights_only=True)["global_step"])
    except Exception:  # unreadable: it cannot be the committed one
        nxt_step = None
    if step is not None and nxt_step == step:
        os.replace(nxt, checkpoint_path(output, rank))
    else:
        os.remove(nxt)


def load_checkpoint(output, rank, world_size, num_classes, allow_pickle=False):
    """Load this rank's checkpoint and refuse one from another world size or class count (insightface#1811), one
    that is not the committed generation, or ranks that disagree on the step. Collective: a problem on one rank
    stops every rank with that rank's message."""
    ckpt, error = None, None
    try:
        _finish_generation(output, rank)
        ckpt = _checked(output, rank, world_size, num_classes, allow_pickle)
    except CheckpointError as exc:
        error = exc
    D.raise_together(error)
    step = int(ckpt["global_step"])
    steps = D.all_gather_object(step)
    if len(set(steps)) > 1:
        raise CheckpointError(f"resume: the ranks' checkpoints in {output} are of different steps ({steps} for ranks "
                              "0..): the job was killed while writing them; no consistent generation to resume from "
                              "(start from model.pt with pretrained_backbone, or from a copy of an earlier "
                              "generation)")
    committed = committed_step(output)
    if committed is not None and committed != step:
        raise CheckpointError(f"resume: {checkpoint_path(output, rank)} is of global step {step} but "
                              f"{os.path.join(output, COMMIT_FILE)} records step {committed} as the last generation "
                              "every rank wrote")
    return ckpt


def _checked(output, rank, world_size, num_classes, allow_pickle):
    path = checkpoint_path(output, rank)
    if not os.path.isfile(path):
        others = rank_checkpoints(output)
        hint = f" (found {', '.join(others)})" if others else " (set save_all_states=True to write them)"
        raise CheckpointError(f"resume: {path} does not exist{hint}")
    ckpt = read_checkpoint(path, allow_pickle)
    required = ["epoch", "global_step", "state_dict_backbone", "state_dict_softmax_fc", "state_optimizer"]
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise CheckpointError(f"resume: {path} lacks {missing}; is it a model.pt/backbone.pth? "
                              "Use pretrained_backbone to start from a bare backbone")
    saved_world = ckpt.get("world_size")
    if saved_world is not None and saved_world != world_size:
        raise CheckpointError(f"resume: {path} was written by a run with {saved_world} processes, this run has "
                              f"{world_size}; Partial FC centres are sharded per rank, so resume with "
                              f"--nproc_per_node={saved_world} (or start from model.pt with pretrained_backbone)")
    others = rank_checkpoints(output)
    if saved_world is None and len(others) != world_size:
        raise CheckpointError(f"resume: {output} holds {len(others)} per-rank checkpoints but this run has "
                              f"{world_size} processes")
    shard = ckpt["state_dict_softmax_fc"].get("weight")
    _, num_local = shard_range(num_classes, rank, world_size)
    if shard is None or shard.shape[0] != num_local:
        got = None if shard is None else tuple(shard.shape)
        raise CheckpointError(f"resume: {path} holds a Partial FC shard of shape {got}, expected {num_local} rows "
                              f"for num_classes={num_classes} over {world_size} processes")
    return ckpt

"""Checkpoints with arcface_torch's names and keys, written atomically, checked before they are trusted.

- model.pt: the bare backbone state_dict (no 'module.' prefix), what inference / ONNX / IJB tools load.
- checkpoint_gpu_<rank>.pt: upstream's keys (epoch, global_step, state_dict_backbone, state_dict_softmax_fc,
  state_optimizer, state_lr_scheduler) plus ours (grad scaler, plugin states, RNG states, the batch reached
  inside the epoch, world size and class count for the compatibility check).
"""
import os
import random

import numpy as np
import torch

from ..errors import CheckpointError
from ..partial_fc import shard_range


def atomic_save(obj, path):
    """torch.save to a temp file in the same folder, then rename: a crash never leaves half a file."""
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def checkpoint_path(output, rank):
    return os.path.join(output, f"checkpoint_gpu_{rank}.pt")


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    if not state:
        return
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_checkpoints(output):
    """Names of the per-rank checkpoint files in an output folder (no temp files), sorted."""
    if not os.path.isdir(output):
        return []
    return sorted(f for f in os.listdir(output) if f.startswith("checkpoint_gpu_") and f.endswith(".pt"))


def load_checkpoint(output, rank, world_size, num_classes):
    """Load this rank's checkpoint and refuse one from another world size or class count (insightface#1811)."""
    path = checkpoint_path(output, rank)
    if not os.path.isfile(path):
        others = rank_checkpoints(output)
        hint = f" (found {', '.join(others)})" if others else " (set save_all_states=True to write them)"
        raise CheckpointError(f"resume: {path} does not exist{hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"resume: {path} cannot be read ({type(exc).__name__}: {exc})") from exc
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

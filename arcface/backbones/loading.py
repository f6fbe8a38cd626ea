"""Load backbone weights from insightface-style files, failing loudly on any mismatch.

Accepted: `model.pt` / `backbone.pth` (a plain state dict, what arcface_torch writes and the model zoo
ships), a training checkpoint holding `state_dict_backbone` (`checkpoint_gpu_<rank>.pt`, ours and
upstream's), or an in-memory state dict. Keys saved through DistributedDataParallel (`module.`) or
torch.compile (`_orig_mod.`) are accepted. A missing file, a file that is not a PyTorch checkpoint,
missing / unexpected keys or a shape mismatch raise CheckpointError naming the file and the network.
"""
import os
import pickle
from collections import namedtuple
from collections.abc import Mapping

import torch

from ..errors import CheckpointError

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
SHOWN = 5  # keys listed per kind of problem; the rest are counted

BackboneState = namedtuple("BackboneState", ["source", "state"])


def read_backbone_state(path_or_state_dict, what="backbone"):
    """The backbone's state dict of a file or dict (checkpoint unwrapped, wrapper prefixes stripped), with the
    name of where it came from; pass it to load_backbone_weights to look at a file before loading it once."""
    if isinstance(path_or_state_dict, BackboneState):
        return path_or_state_dict
    source, loaded = _read(path_or_state_dict, what)
    return BackboneState(source, _strip_wrappers(_backbone_part(loaded, source, what)))


def load_backbone_weights(model, path_or_state_dict, strict=True, what="backbone"):
    """Copy weights into `model`; returns torch's (missing_keys, unexpected_keys) of the final load.

    strict=False tolerates missing and unexpected keys, never a shape mismatch. A missing BatchNorm
    `num_batches_tracked` (files converted from other frameworks) is never an error: it is a counter,
    not a weight.
    """
    model = _unwrap_model(model)
    source, state = read_backbone_state(path_or_state_dict, what)
    network = getattr(model, "network", type(model).__name__)

    expected = model.state_dict()
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: file {list(state[k].shape)} vs model {list(expected[k].shape)}"
                  for k in state if k in expected and isinstance(state[k], torch.Tensor)
                  and state[k].shape != expected[k].shape]

    problems = []
    if not_tensors:
        problems.append(_listing("entries that are not tensors", not_tensors))
    if mismatched:
        problems.append(_listing("shape mismatches", mismatched))
    if strict and missing:
        problems.append(_listing("missing keys", missing))
    if strict and unexpected:
        problems.append(_listing("unexpected keys", unexpected))
    if problems:
        raise CheckpointError(f"cannot load {what} weights from {source} into {network}: "
                              + "; ".join(problems) + _hint(expected, state, mismatched))
    usable = {k: v for k, v in state.items() if k in expected}
    return model.load_state_dict(usable, strict=False)


def _unwrap_model(model):
    """Load into the network itself when given its DistributedDataParallel / DataParallel / compiled wrapper."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _read(path_or_state_dict, what):
    if isinstance(path_or_state_dict, Mapping):
        return "<in-memory state dict>", path_or_state_dict
    path = os.fspath(path_or_state_dict)
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} weights file {path} does not exist"
                              + (" (it is a directory)" if os.path.isdir(path) else ""))
    if not _looks_like_torch_save(path):
        raise CheckpointError(f"{what} weights file {path} is not a PyTorch checkpoint (neither the zip format "
                              f"of torch.save nor the legacy pickle format)")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{what} weights file {path} holds pickled Python objects, not just tensors, so it is not loaded "
            f"(a whole nn.Module saved with torch.save(model)?). If you trust it, load it yourself with "
            f"torch.load(..., weights_only=False) and pass its state_dict(). ({_gist(err)})") from err
    except Exception as err:  # truncated or corrupt files: RuntimeError, EOFError, ...
        raise CheckpointError(f"{what} weights file {path} is not a readable PyTorch checkpoint "
                              f"({type(err).__name__}: {_gist(err)})") from err
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{what} weights file {path} holds a {type(loaded).__name__}, "
                              f"expected a state dict or a dict with 'state_dict_backbone'")
    return path, loaded


def _looks_like_torch_save(path):
    with open(path, "rb") as handle:
        magic = handle.read(4)
    return magic == b"PK\x03\x04" or magic[:1] == b"\x80"  # zip (torch >= 1.6) or pickle protocol >= 2


def _gist(err):
    """torch's load errors run to a page; keep the line that names the problem."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line or "GLOBAL" in line:
            return line
    return lines[0] if lines else type(err).__name__


def _backbone_part(loaded, source, what):
    if "state_dict_backbone" in loaded:
        inner = loaded["state_dict_backbone"]
        if not isinstance(inner, Mapping):
            raise CheckpointError(f"{what} weights in {source}: 'state_dict_backbone' is a "
                                  f"{type(inner).__name__}, expected a state dict")
        return inner
    if loaded and not any(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{what} weights in {source}: a dict without tensors and without "
                              f"'state_dict_backbone' (keys: {', '.join(map(str, list(loaded)[:10]))})")
    return loaded


def _strip_wrappers(state):
    stripped = {}
    for key, value in state.items():
        key = str(key)
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped


def _listing(kind, items):
    shown = ", ".join(items[:SHOWN])
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return f"{len(items)} {kind} ({shown}{more})"


def _hint(expected, state, mismatched):
    shared = sum(1 for k in expected if k in state)
    if shared < len(expected) / 2:
        return ". The file seems to hold a different network (fewer than half of the model's keys are in it)"
    if mismatched:
        return (". Same network family: check num_features (embedding_size), input_size and width against "
                "the run that wrote the file")
    return ""
